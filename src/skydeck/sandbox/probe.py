"""S5: can this host make a sandbox? Asked once at start-up, before any turn.

It runs ``<bwrap> --version`` and then a real sandbox with the turns' own
namespaces and system rows around ``/usr/bin/true`` (`plan.probe_argv`): a
kernel that refuses user namespaces, an AppArmor profile that forbids them, a
bwrap too old for ``--disable-userns``, all show up here as one readable
reason, instead of as every turn failing later.
"""

from __future__ import annotations

import os
import re
import subprocess

from .modes import Availability
from .plan import HostLayout, probe_argv

DEFAULT_BWRAP = "/usr/bin/bwrap"
PROBE_TIMEOUT_S = 5.0
#: ``--disable-userns`` (S8) came with 0.8.0.
MIN_VERSION = (0, 8, 0)
USERNS_HINT = (
    "are user namespaces disabled? check user.max_user_namespaces, "
    "kernel.unprivileged_userns_clone, kernel.apparmor_restrict_unprivileged_userns"
)


def bwrap_path(configured: str | None) -> str:
    """S4: `SKYDECK_BWRAP` when set (it must be absolute), else /usr/bin/bwrap; never a
    PATH lookup, since a poisoned PATH entry would run outside any sandbox."""
    if not configured:
        return DEFAULT_BWRAP
    if not os.path.isabs(configured):
        raise ValueError(f"SKYDECK_BWRAP must be an absolute path, not {configured!r}")
    return configured


def parse_version(text: str) -> tuple[int, ...] | None:
    """``bubblewrap 0.8.0`` -> (0, 8, 0)."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def probe(bwrap: str, layout: HostLayout | None = None) -> Availability:
    """Run the two checks (each within `PROBE_TIMEOUT_S`) and say what was found."""
    if not os.path.isfile(bwrap) or not os.access(bwrap, os.X_OK):
        missing = f"bwrap not found at {bwrap} (install the bubblewrap package)"
        return Availability(bwrap, reason=missing)
    try:
        shown = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Availability(bwrap, reason=f"bwrap cannot create a sandbox: {exc} ({USERNS_HINT})")
    found = parse_version(shown.stdout)
    label = ".".join(map(str, found)) if found else shown.stdout.strip() or "unknown"
    if found is None or found < MIN_VERSION:
        return Availability(
            bwrap,
            label,
            f"bwrap {label} is too old: 0.8.0 or newer is needed (--disable-userns)",
        )
    try:
        ran = subprocess.run(
            probe_argv(bwrap, layout or HostLayout.read()),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Availability(bwrap, label, f"bwrap cannot create a sandbox: {exc} ({USERNS_HINT})")
    if ran.returncode != 0:
        why = _first_line(ran.stderr)
        return Availability(bwrap, label, f"bwrap cannot create a sandbox: {why} ({USERNS_HINT})")
    return Availability(bwrap, label)
