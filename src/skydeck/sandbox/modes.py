"""Sandbox modes, the daemon policy and the ``egress`` list: the decisions, no I/O.

An agent's ``sandbox`` field is ``None`` (the daemon decides), ``off``,
``workspace`` or ``strict`` (S1); the daemon's ``--sandbox`` policy decides for
``None`` agents and may forbid ``off`` (S3). Every rule here is a pure function
of the agent, the policy and whether the start-up probe passed, so the HTTP
layer, the backends and the tests all ask the same question the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..model import SANDBOX_MODES, SandboxMode

#: S1's agent field (defined with the record, `model.AgentSpec`).
Mode = SandboxMode
MODES = SANDBOX_MODES

Policy = Literal["auto", "off", "workspace", "strict", "required"]
POLICIES: tuple[Policy, ...] = ("auto", "off", "workspace", "strict", "required")

#: S2: at most this many extra targets per agent.
MAX_EGRESS = 32
OFF_REQUIRED = "sandbox off is not allowed: the daemon runs with --sandbox required"
EGRESS_NEEDS_WORKSPACE = "egress needs sandbox workspace (or null)"
EGRESS_NAMES_SKYDECK = "egress cannot name skydeck itself"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")


def parse_policy(raw: str) -> Policy:
    """S3: the ``--sandbox`` value, or a `ValueError` with the sentence to print."""
    value = raw.strip().lower()
    for policy in POLICIES:
        if value == policy:
            return policy
    raise ValueError(f"--sandbox must be one of: {', '.join(POLICIES)}")


def parse_target(text: str) -> str:
    """S2: one egress entry as ``host:port`` (a bare host means 443), or a `ValueError`.

    The host is a DNS name, an IPv4 address or a bracketed IPv6 address; no
    scheme, path or wildcard. Names are lower-cased: the gateway matches the name
    the client sent, and DNS names do not care about case.
    """
    entry = text.strip()
    if entry.startswith("["):
        close = entry.find("]")
        host, rest = entry[: close + 1], entry[close + 1 :]
        if close < 0 or not _is_ipv6(host[1:-1]) or (rest and not rest.startswith(":")):
            raise ValueError(entry)
        port_text = rest[1:] if rest else "443"
    else:
        host, colon, port_text = entry.partition(":")
        if not _DNS_NAME.match(host):
            raise ValueError(entry)
        port_text = port_text if colon else "443"
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(entry)
    return f"{host.lower()}:{int(port_text)}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` (as `parse_target` makes them) -> (host without brackets, port)."""
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def is_local_host(host: str) -> bool:
    """A loopback or unspecified address, or ``localhost``: where skydeck itself listens."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return is_local_address(address)


def is_local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback or unspecified, also written as an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.1`` reaches 127.0.0.1, and Python 3.11 does not call it loopback)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def names_daemon(targets: Iterable[str], daemon_port: int | None) -> bool:
    """S2/S19: does a target name the daemon's own port on a loopback address?"""
    if daemon_port is None:
        return False
    return any(
        port == daemon_port and is_local_host(host) for host, port in map(split_target, targets)
    )


@dataclass(frozen=True, slots=True)
class Availability:
    """What the start-up probe found (S5): a usable bwrap, or the reason there is none."""

    bwrap: str
    version: str | None = None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class Decision:
    """How one agent's next turn runs: its mode, or the reason it cannot run at all."""

    mode: Mode
    refusal: str | None = None


def default_mode(policy: Policy, probe: Availability) -> Mode:
    """S3: the mode of an agent whose ``sandbox`` is null."""
    if policy == "auto":
        return "workspace" if probe.available else "off"
    if policy == "required":
        return "workspace"
    return policy


def decide(sandbox: Mode | None, policy: Policy, probe: Availability) -> Decision:
    """S3/S6: the mode a turn uses, and why it must fail instead of running (never a
    silent unsandboxed run): ``off`` under ``required``, or a sandbox without bwrap."""
    mode = sandbox or default_mode(policy, probe)
    if mode == "off":
        return Decision(mode, OFF_REQUIRED if policy == "required" else None)
    if not probe.available:
        return Decision(mode, f"sandbox unavailable: {probe.reason}")
    return Decision(mode)
