"""The bwrap command line and the sandboxed child's environment, from decisions: no I/O.

What the host looks like (which of ``/bin``, ``/lib``... are symlinks) is read
once by `HostLayout.read`; everything else is a pure function of a `Plan`, so a
unit test pins every flag and its order (S7-S9), and `probe_argv` runs the very
same rows the turns use (S5).

    <bwrap> <S8 namespaces and flags> <S9 mounts 1-8> --chdir <ws>
            --json-status-fd <fd> --remount-ro / -- [<relay> --] <backend argv>
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .modes import Mode

#: S8: every namespace bwrap can make, no capabilities, no nested user namespaces.
NAMESPACE_FLAGS = (
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup",
    "--unshare-net",
    "--hostname",
    "skydeck",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--disable-userns",
)
#: S9 row 2: the top-level directories a distribution may make symlinks into /usr.
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: S9 row 3: the only parts of /etc a sandbox sees (never shadow, ssh keys, ...).
ETC = (
    "ssl",
    "ca-certificates",
    "pki",
    "alternatives",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "localtime",
    "ld.so.cache",
    "os-release",
)
#: S9 row 5: the private /tmp's size cap (S14: the only limit a sandbox has).
TMP_BYTES = 512 * 1024 * 1024
#: Where the relay and the gateway socket appear inside (S9 row 7).
RELAY_PATH = "/run/skydeck/relay.py"
SOCKET_PATH = "/run/skydeck/gateway.sock"
RELAY_PORT = 3128
#: S11: what the sandbox's programs use to reach the gateway.
PROXY_URL = f"http://127.0.0.1:{RELAY_PORT}"
PROXY_KEYS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
NO_PROXY_KEYS = ("NO_PROXY", "no_proxy")
#: S11: the credential a strict claude sandbox holds instead of the real one.
PLACEHOLDER = "skydeck-sandbox-placeholder"
CREDENTIAL_KEYS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")


@dataclass(frozen=True, slots=True)
class HostLayout:
    """S9 row 2 as found on this host: ``(path, symlink target or None for a directory)``."""

    top_level: tuple[tuple[str, str | None], ...]

    @classmethod
    def read(cls, root: Path = Path("/")) -> HostLayout:
        found: list[tuple[str, str | None]] = []
        for path in TOP_LEVEL:
            here = root / path.lstrip("/")
            if here.is_symlink():
                found.append((path, os.readlink(here)))
            elif here.is_dir():
                found.append((path, None))
        return cls(tuple(found))


@dataclass(frozen=True, slots=True)
class Relay:
    """S16: the in-sandbox relay, its interpreter and the gateway socket it pipes to."""

    python: str
    script: Path
    socket: Path
    #: `sys.base_prefix`, bound read-only when it is outside /usr (a non-Debian Python).
    base_prefix: str

    def argv(self) -> list[str]:
        return [self.python, "-I", "-S", RELAY_PATH, str(RELAY_PORT), SOCKET_PATH, "--"]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one sandbox is made of (S7-S9)."""

    bwrap: str
    layout: HostLayout
    data_dir: Path
    workspace: Path
    #: Row 6: the program's executable, bound at its own path (None: under /usr or the workspace).
    program: str | None
    relay: Relay | None
    status_fd: int
    #: Row 8: the turn's M24 MCP file, bound read-only (when the agent has MCP).
    mcp_file: Path | None = None


def _system_rows(layout: HostLayout) -> list[str]:
    """S9 rows 1 and 2."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for path, target in layout.top_level:
        argv += ["--symlink", target, path] if target is not None else ["--ro-bind", path, path]
    return argv


def _private_rows() -> list[str]:
    """S9 rows 4 and 5."""
    return ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]


def probe_argv(bwrap: str, layout: HostLayout) -> list[str]:
    """S5: the S8 flags with rows 1, 2, 4, 5 and ``--remount-ro /``, running ``true``."""
    return [
        bwrap,
        *NAMESPACE_FLAGS,
        *_system_rows(layout),
        *_private_rows(),
        "--remount-ro",
        "/",
        "--",
        "/usr/bin/true",
    ]


def bwrap_argv(plan: Plan, argv: list[str]) -> list[str]:
    """S7: the whole command line; ``argv`` (the backend's, R30/R31) comes last, unchanged."""
    out = [plan.bwrap, *NAMESPACE_FLAGS, *_system_rows(plan.layout)]
    for name in ETC:
        out += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    out += _private_rows()
    if plan.program is not None:
        out += ["--ro-bind", plan.program, plan.program]
    relay = plan.relay
    if relay is not None:
        out += ["--ro-bind", str(relay.script), RELAY_PATH]
        out += ["--ro-bind", str(relay.socket), SOCKET_PATH]
        if not _under(relay.base_prefix, "/usr"):
            out += ["--ro-bind", relay.base_prefix, relay.base_prefix]
    data, workspace = str(plan.data_dir), str(plan.workspace)
    out += ["--tmpfs", data, "--bind", workspace, workspace]
    if plan.mcp_file is not None:
        out += ["--ro-bind", str(plan.mcp_file), str(plan.mcp_file)]
    out += ["--remount-ro", data]
    out += ["--chdir", workspace, "--json-status-fd", str(plan.status_fd), "--remount-ro", "/"]
    out.append("--")
    if relay is not None:
        out += relay.argv()
    return [*out, *argv]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def program_to_bind(executable: str, workspace: Path) -> str | None:
    """S9 row 6: None when the sandbox sees ``executable`` at that path already (under
    /usr, a row-2 directory such as /bin, or the workspace); else the path itself.
    ``--ro-bind`` follows a symlink, so a venv's ``bin/python`` is bound as the file
    it points to, at the venv's path."""
    for visible in ("/usr", *TOP_LEVEL, str(workspace)):
        if _under(executable, visible):
            return None
    return executable


def sandbox_env(
    env: Mapping[str, str],
    *,
    mode: Mode,
    claude: bool,
    relay: bool,
    credential: str | None,
) -> dict[str, str]:
    """S11: the child's environment, which is also bwrap's own (``/proc/1/environ`` is
    readable inside, so bwrap must hold nothing the child may not see).

    ``env`` is R30/R31's (the agent's ``env`` applied already); these are set after
    it, so an agent's ``env`` cannot override them. ``credential`` is the daemon's
    credential variable a strict claude sandbox gets the placeholder in.
    """
    out = dict(env)
    if claude:
        out["IS_SANDBOX"] = "1"
    if mode == "workspace" and relay:
        out.update(dict.fromkeys(PROXY_KEYS, PROXY_URL))
        out.update(dict.fromkeys(NO_PROXY_KEYS, ""))
    if mode == "strict" and claude:
        for key in CREDENTIAL_KEYS:
            out.pop(key, None)
        out["ANTHROPIC_BASE_URL"] = PROXY_URL
        if credential is not None:
            out[credential] = PLACEHOLDER
    return out


def decode_exit(returncode: int) -> int:
    """S12: bwrap reports a child killed by signal N as 128+N; as a Python return code
    that is -N, so R31's wording and R33's "killed by a signal" read it as before."""
    if 128 < returncode <= 192:
        return -(returncode - 128)
    return returncode
