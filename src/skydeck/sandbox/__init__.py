"""Sandboxed turns: every agent process inside bubblewrap (``shared/spec/sandbox.md``).

modes.py    the agent field, the daemon policy, egress entries (pure)
plan.py     the bwrap argv and the child's environment (pure)
probe.py    S5: can this host make a sandbox?
jail.py     `Sandbox` (the daemon's settings) and `Jail` (one process's sandbox)
gateway.py  the daemon side of a sandbox's network (S17)
relay.py    the in-sandbox side (stdlib only, never imported)
"""

from .jail import Jail, Sandbox
from .modes import MODES, POLICIES, Availability, Mode, Policy, parse_policy, parse_target
from .probe import bwrap_path, probe

__all__ = [
    "MODES",
    "POLICIES",
    "Availability",
    "Jail",
    "Mode",
    "Policy",
    "Sandbox",
    "bwrap_path",
    "parse_policy",
    "parse_target",
    "probe",
]
