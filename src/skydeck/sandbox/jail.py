"""The daemon's sandboxing: what each turn's process runs in, and the I/O around it.

`Sandbox` is made once by the service from ``--sandbox`` and the start-up probe
(S3-S5). For a turn, a backend asks it for a `Jail` (`Sandbox.jail`): None when
the turn runs unsandboxed (``off``), a `BackendError` when it must not run at all
(S6), else the plan of one sandbox. `process.open_group_process` then runs the
program through it:

    reaper (procs.under_reaper)                        the daemon's child
    └── bwrap  (the sandbox's process group, S13)      `Jail.running` gives its argv
        └── bwrap's init (pid 1 inside)                dies with bwrap; so does every pid inside
            └── [relay 127.0.0.1:3128 -> gateway.sock] (S16) when the sandbox has a network use
                └── the backend's argv                 unchanged (R30, R31)

`Jail.running` creates the 0700 socket directory, starts the gateway task
listening *before* bwrap starts (S17, S20), and, once the process is waited for,
stops the task and removes the socket (S13). bwrap's ``--json-status-fd`` pipe
tells a program's exit (S12) from a sandbox that never started (S6).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from ..errors import BackendError, BadRequest
from ..mcp.wiring import base_url
from ..model import AgentSpec
from ..procs import Launch
from .gateway import Gateway, Routes
from .modes import (
    EGRESS_NAMES_SKYDECK,
    OFF_REQUIRED,
    Availability,
    Decision,
    Mode,
    Policy,
    decide,
    default_mode,
    names_daemon,
)
from .plan import (
    PROXY_URL,
    HostLayout,
    Plan,
    Relay,
    bwrap_argv,
    decode_exit,
    program_to_bind,
    sandbox_env,
)

#: The relay's source, bound read-only into every sandbox that has one (S9 row 7).
RELAY_SCRIPT = Path(__file__).with_name("relay.py")
DEFAULT_API = "https://api.anthropic.com"
OAUTH_ONLY = (
    "strict sandbox needs ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN "
    "(an OAuth token cannot be injected)"
)


def api_target(base_url: str) -> str:
    """S18: the model API's ``host:port`` from an ``ANTHROPIC_BASE_URL``."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def strict_credential(env: Mapping[str, str]) -> tuple[str, tuple[str, str]] | None:
    """S11/S17 (b): the daemon's credential variable and the header that carries it."""
    if env.get("ANTHROPIC_API_KEY"):
        return "ANTHROPIC_API_KEY", ("x-api-key", env["ANTHROPIC_API_KEY"])
    if env.get("ANTHROPIC_AUTH_TOKEN"):
        token = env["ANTHROPIC_AUTH_TOKEN"]
        return "ANTHROPIC_AUTH_TOKEN", ("authorization", f"Bearer {token}")
    return None


def _first_bwrap_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("bwrap:")), lines[0] if lines else "")


@dataclass(eq=False)
class Jail:
    """One sandbox for one process (a cold turn, or a warm process's whole life)."""

    sandbox: Sandbox
    mode: Mode
    #: The child's final environment, which is bwrap's own too (S11).
    env: dict[str, str]
    workspace: Path
    program: str | None
    routes: Routes | None
    mcp_file: Path | None = None
    _status: int | None = field(default=None, repr=False)
    _status_w: int | None = field(default=None, repr=False)
    #: The ``--json-status-fd`` records read so far (S12; ``pid-namespace`` names the sandbox).
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """Processes between the reaper and the program: bwrap, its init, the relay."""
        return 2 + (self.routes is not None)

    @property
    def fingerprint(self) -> tuple[str, ...]:
        """W11: a warm process started in this sandbox serves only turns with the same one."""
        allow = sorted(self.routes.allow) if self.routes is not None else []
        return (f"sandbox={self.mode}", f"egress={','.join(allow)}")

    @asynccontextmanager
    async def running(self, argv: list[str]) -> AsyncIterator[Launch]:
        """The sandboxed `Launch` of ``argv``, with its gateway serving while it runs."""
        directory = Path(tempfile.mkdtemp(prefix="skydeck-sbx-"))  # 0700: strict holds a key
        self._status, self._status_w = os.pipe()
        os.set_blocking(self._status, False)
        try:
            relay = None
            gateway = None
            if self.routes is not None:
                routes = await self.sandbox.routes_now(self.routes)
                socket_path = directory / f"{self.sandbox.next_socket()}.sock"
                gateway = Gateway(
                    routes, socket_path, self.sandbox.client(), self.sandbox.on_denied
                )
                gateway.listen()
                relay = Relay(
                    python=self.sandbox.python,
                    script=RELAY_SCRIPT,
                    socket=socket_path,
                    base_prefix=sys.base_prefix,
                )
            plan = Plan(
                bwrap=self.sandbox.bwrap,
                layout=self.sandbox.layout,
                data_dir=self.sandbox.data_dir,
                workspace=self.workspace,
                program=self.program,
                relay=relay,
                status_fd=self._status_w,
                mcp_file=self.mcp_file,
            )
            async with trio.open_nursery() as nursery:
                if gateway is not None:
                    await nursery.start(gateway.serve)
                self.sandbox.running += 1
                try:
                    yield Launch(bwrap_argv(plan, argv), (self._status_w,))
                finally:
                    self.sandbox.running -= 1
                    nursery.cancel_scope.cancel()
        finally:
            self.spawned()
            self._read_records()  # the process has been waited for: all of them are there
            os.close(self._status)
            self._status = None
            shutil.rmtree(directory, ignore_errors=True)

    def spawned(self) -> None:
        """The process has its copy of the status pipe: ours goes, so EOF means it ended."""
        if self._status_w is not None:
            os.close(self._status_w)
            self._status_w = None

    def _read_records(self) -> None:
        if self._status is None:
            return
        chunks = []
        try:
            while chunk := os.read(self._status, 65536):
                chunks.append(chunk)
        except (BlockingIOError, OSError):
            pass
        decoder = json.JSONDecoder()
        text = b"".join(chunks).decode("utf-8", "replace")
        at = 0
        while (at := _skip_space(text, at)) < len(text):
            try:
                record, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                break
            if isinstance(record, dict):
                self.records.append(record)

    def exit_code(self) -> int | None:
        """The program's exit as bwrap reported it, or None: the sandbox never ran it."""
        self._read_records()
        codes = [r["exit-code"] for r in self.records if isinstance(r.get("exit-code"), int)]
        return codes[-1] if codes else None

    def returncode(self, returncode: int) -> int:
        """S12: what the program's exit means (128+N is "killed by signal N")."""
        code = self.exit_code()
        return returncode if code is None else decode_exit(code)

    def judge(self, returncode: int, stderr: str) -> int:
        """`returncode`, or S6's `BackendError` when bwrap never started the program."""
        code = self.exit_code()
        if code is None and returncode >= 0:
            raise BackendError(f"sandbox failed to start: {_first_bwrap_line(stderr)}")
        return returncode if code is None else decode_exit(code)


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


class Sandbox:
    """The daemon's sandbox settings, its probe result and the shared pieces (S3-S5, S20)."""

    def __init__(
        self,
        policy: Policy,
        probe: Availability,
        *,
        data_dir: Path,
        layout: HostLayout | None = None,
        environ: Mapping[str, str] | None = None,
        on_denied: Callable[[str, str], None] | None = None,
        await_listener: bool = False,
    ) -> None:
        """``await_listener``: a daemon's sandbox, whose port is known only once its
        server listens; a networked sandbox waits for it (S18/S19 need the port)."""
        self.policy = policy
        self.probe = probe
        self.bwrap = probe.bwrap
        self.data_dir = data_dir.resolve()
        self.layout = layout or HostLayout.read()
        self.environ = os.environ if environ is None else environ
        #: S16: the relay's interpreter, outside the venv (which the sandbox does not see).
        self.python = os.path.realpath(sys.executable)
        self.on_denied = on_denied
        #: The daemon's own address, once it listens (S18, S19; the M24 base of (a)).
        self.daemon_base: str | None = None
        self.daemon_port: int | None = None
        self.await_listener = await_listener
        self._listener = trio.Event()
        #: Sandboxes alive now (``skydeck_sandbox_processes``).
        self.running = 0
        self._sockets = 0
        self._client: httpx.AsyncClient | None = None

    # -- decisions ------------------------------------------------------------------

    @property
    def default(self) -> Mode:
        return default_mode(self.policy, self.probe)

    def decide(self, agent: AgentSpec) -> Decision:
        return decide(agent.sandbox, self.policy, self.probe)

    def effective(self, agent: AgentSpec) -> Mode:
        """S1's ``sandbox_effective``: the mode the agent's next turn uses."""
        return self.decide(agent).mode

    def check_agent(self, agent: AgentSpec) -> None:
        """S2/S3: what only the daemon can say about a POST/PATCH (a 400)."""
        if agent.sandbox == "off" and self.policy == "required":
            raise BadRequest(OFF_REQUIRED, field="sandbox")
        if names_daemon(agent.egress, self.daemon_port):
            raise BadRequest(EGRESS_NAMES_SKYDECK, field="egress")

    def health(self) -> dict[str, Any]:
        """S5: /health's ``sandbox`` object."""
        where: dict[str, str] = (
            {"bwrap": f"bwrap {self.probe.version} at {self.bwrap}"}
            if self.probe.available
            else {"reason": self.probe.reason or ""}
        )
        return {
            "available": self.probe.available,
            "default": self.default,
            "required": self.policy == "required",
            **where,
        }

    def banner(self) -> str:
        """S5: the start-up line."""
        if self.default == "off":
            reason = self.probe.reason or "--sandbox off"
            return f"sandbox: OFF for agents without their own setting: {reason}"
        if not self.probe.available:  # S6: asked for, so their turns fail instead
            return (
                f"sandbox: {self.default} for agents without their own setting, "
                f"but unavailable, so their turns fail: {self.probe.reason}"
            )
        return (
            f"sandbox: {self.default} for agents without their own setting "
            f"(bwrap {self.probe.version} at {self.bwrap})"
        )

    # -- turns ----------------------------------------------------------------------

    def jail(
        self,
        agent: AgentSpec,
        *,
        workspace: Path,
        env: dict[str, str],
        executable: str,
        claude: bool,
        mcp_channel: str | None = None,
        mcp_file: Path | None = None,
    ) -> Jail | None:
        """The sandbox ``agent``'s process runs in (None: unsandboxed), or S6's refusal.

        ``executable`` is the program as the host resolves it (S9 row 6).
        ``mcp_channel``/``mcp_file``: the agent's own MCP route (S17 a) and M24 file,
        for the backend to pass once the agent has MCP turned on.
        """
        decision = self.decide(agent)
        if decision.refusal is not None:
            raise BackendError(decision.refusal)
        mode = decision.mode
        if mode == "off":
            return None
        credential = strict_credential(self.environ) if mode == "strict" and claude else None
        oauth_only = credential is None and bool(self.environ.get("CLAUDE_CODE_OAUTH_TOKEN"))
        if mode == "strict" and claude and oauth_only:
            raise BackendError(OAUTH_ONLY)
        routes = None
        if claude or agent.egress or mcp_channel is not None:  # S16: who gets a relay
            allow: set[str] = set()
            if mode == "workspace":
                allow.update(agent.egress)
                if claude:
                    allow.add(api_target(self.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_API))
            routes = Routes(
                agent=agent.name,
                mode=mode,
                allow=frozenset(allow),
                daemon_port=self.daemon_port,
                mcp_channel=mcp_channel,
                daemon_base=self.daemon_base,
                upstream=(self.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_API)
                if mode == "strict" and claude
                else None,
                credential=credential[1] if credential is not None else None,
            )
        final_env = sandbox_env(
            env,
            mode=mode,
            claude=claude,
            relay=routes is not None,
            credential=credential[0] if credential is not None else None,
        )
        return Jail(
            sandbox=self,
            mode=mode,
            env=final_env,
            workspace=workspace.resolve(),
            program=program_to_bind(executable, workspace.resolve()),
            routes=routes,
            mcp_file=mcp_file,
        )

    def listening(self, bind: str) -> None:
        """The daemon's own address, known once Hypercorn has bound it (its first bind,
        as the loopback URL the MCP endpoint is reached at, M24)."""
        self.daemon_base = base_url(bind)
        self.daemon_port = urlsplit(bind).port
        self._listener.set()

    async def routes_now(self, routes: Routes) -> Routes:
        """``routes`` with the daemon's port, waiting for the server to listen first
        when the port is not known yet (a turn replayed at start runs before it)."""
        if self.await_listener:
            await self._listener.wait()
        return replace(routes, daemon_port=self.daemon_port, daemon_base=self.daemon_base)

    def mcp_base(self, agent: AgentSpec) -> str | None:
        """S11: the M24 ``<base>`` of a sandboxed agent is its relay; None: the daemon's."""
        decision = self.decide(agent)
        if agent.backend == "echo" or decision.mode == "off" or decision.refusal is not None:
            return None
        return PROXY_URL

    def next_socket(self) -> int:
        self._sockets += 1
        return self._sockets

    def client(self) -> httpx.AsyncClient:
        """The pooled client the gateways forward with (never the environment's proxies)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False, timeout=httpx.Timeout(None, connect=30.0)
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
