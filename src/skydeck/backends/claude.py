"""R30: the real Claude Code CLI: a warm process per single-threaded agent, else
one ``claude -p`` process per turn.

The CLI's wire facts (flags, stream lines, error shapes) are in
``shared/spec/claude-cli.md``; `claude_stream` parses the stream, this module
runs processes and decides what a failure means:

- resume of a conversation that no longer exists -> once more with a fresh
  session id (R18: the channel heals);
- API 5xx/overloaded, an API error with no status (network), or the process
  killed by a signal we did not send -> retried up to 2 more times, 2 s then
  5 s apart, inside the turn and its timeout (R33);
- anything else (401, other 4xx, a bad flag) -> the turn fails at once with a
  readable reason.

Stopping a turn (timeout, deregister, interrupt, shutdown) is cancellation:
the process tree is stopped by `open_group_process`, and nothing is retried,
because no return code is ever looked at.

Warm mode (`claude_warm`, ``shared/spec/claude-warm.md``): a single-threaded
agent's turn leases the agent's long-lived process from the `WarmPool` and
writes one stdin line; the result is judged exactly as a cold one (W5), and an
R33 retry writes the same line to the same process. Any protocol surprise
drops the process; before the turn's ``system/init`` the turn then runs cold
as if nothing happened, after it the cold rules apply and the rest of the turn
runs cold (W6). A multi-threaded agent, or a turn the pool cannot take (cap
reached with every process busy), runs cold.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import trio

from ..errors import BackendError
from ..model import AgentSpec, ToolAccess, TurnResult, TurnSession
from ..procs import ProcessRegistry
from ..sandbox import Jail, Sandbox
from .base import Emit
from .claude_stream import StreamOutcome, StreamParser
from .claude_warm import WarmConfig, WarmPool, WarmSpec
from .claude_warm_protocol import Fingerprint, Stopped, Surprise
from .output import Overlong, TailBuffer
from .process import (
    STDERR_TAIL,
    describe_exit,
    iter_lines,
    minimal_env,
    open_group_process,
    pump,
    run_until_exit,
    workspace_for,
)

log = logging.getLogger(__name__)

#: R33: the waits before the 2nd and the 3rd attempt.
RETRY_DELAYS_S = (2.0, 5.0)
#: Credentials and endpoint the CLI needs from the daemon's environment.
CREDENTIAL_KEYS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
)
#: mcp.md M24: the one MCP server a turn may use, allowed without a permission prompt.
MCP_TOOLS = "mcp__skydeck"
#: Where `make test` / `make run` install the pinned CLI, relative to the checkout.
LOCAL_INSTALL = Path(".tools/claude/node_modules/.bin/claude")


def find_claude() -> str | None:
    """`SKYDECK_CLAUDE_BIN`, else the project-local install, else ``claude`` on PATH."""
    explicit = os.environ.get("SKYDECK_CLAUDE_BIN")
    if explicit:
        return explicit
    checkout = Path(__file__).resolve().parents[3]
    local = checkout / LOCAL_INSTALL
    if local.exists():
        return str(local)
    return shutil.which("claude")


def has_credentials() -> bool:
    return any(os.environ.get(key) for key in CREDENTIAL_KEYS[:3])


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, outcome: StreamOutcome) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome


class _ResumeNotFound(Exception):
    pass


class _RunCold(Exception):
    """W6: a surprise before the turn's init; the turn runs cold, no R33 attempt counted."""


@dataclass(slots=True)
class _Plan:
    """How the rest of one turn runs: warm until a surprise says otherwise (W6)."""

    warm: bool


class ClaudeBackend:
    def __init__(
        self,
        executable: str | None,
        workspaces: Path,
        *,
        retry_delays: Sequence[float] = RETRY_DELAYS_S,
        on_retry: Callable[[], None] | None = None,
        processes: ProcessRegistry | None = None,
        warm: WarmConfig | None = None,
        on_warm_spawn: Callable[[str], None] | None = None,
        on_cold_fallback: Callable[[str], None] | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.executable = executable
        self.sandbox = sandbox
        self.workspaces = workspaces
        self.processes = processes
        self.retry_delays = tuple(retry_delays)
        self.on_retry = on_retry
        #: Runs in the service nursery (`Service.run`); None when warm mode is off.
        self.pool: WarmPool | None = None
        if warm is not None and warm.active and executable is not None:
            self.pool = WarmPool(
                warm, processes=processes, on_spawn=on_warm_spawn, on_fallback=on_cold_fallback
            )

    def release(self, agent_name: str, reason: str) -> None:
        """W13/W15: the registry reset, removed or moved the agent; its process goes."""
        if self.pool is not None:
            self.pool.release(agent_name, reason)

    async def deliver(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        *,
        tools: ToolAccess | None = None,
    ) -> TurnResult:
        if self.executable is None:
            raise BackendError(
                "no claude executable found: run `make test` (installs the pinned CLI) "
                "or set SKYDECK_CLAUDE_BIN"
            )
        plan = _Plan(warm=self.pool is not None and agent.mode == "single-threaded")
        if self.pool is not None and not plan.warm:
            self.pool.release(agent.name, "the agent is multi-threaded")  # W1
        delays = iter(self.retry_delays)
        healed = False
        while True:
            try:
                if plan.warm:
                    try:
                        return await self._warm_attempt(agent, prompt, session, emit, plan, tools)
                    except _RunCold:
                        continue
                return await self._attempt(agent, prompt, session, emit, tools)
            except _ResumeNotFound:
                if healed:
                    raise BackendError("claude could not resume or start a session") from None
                healed = True
                log.warning(
                    "session not found, starting a fresh one",
                    extra={"agent": agent.name, "session": session.id},
                )
                session = TurnSession(id=str(uuid.uuid4()), resume=False)
            except _Retry as failure:
                delay = next(delays, None)
                echoed = failure.outcome.session_id
                if delay is None:
                    raise BackendError(failure.reason, session_id=echoed) from None
                log.warning(
                    "claude attempt failed, retrying",
                    extra={"agent": agent.name, "reason": failure.reason, "delay_s": delay},
                )
                if self.on_retry is not None:
                    self.on_retry()
                if echoed is not None:
                    # The session exists now: reusing the id with --session-id would
                    # be refused ("already in use"), so continue it instead.
                    session = TurnSession(id=echoed, resume=True)
                await trio.sleep(delay)

    def available(self) -> bool:
        """A claude executable resolves (a path set to a missing file does not)."""
        return self.executable is not None and shutil.which(self.executable) is not None

    def argv(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        tools: ToolAccess | None = None,
    ) -> list[str]:
        """A cold turn's argv: R30, the session flag, ``--`` and the prompt."""
        flag = "--resume" if session.resume else "--session-id"
        config = str(tools.config) if tools is not None and tools.config is not None else None
        return [*self.base_argv(agent, config), flag, session.id, "--", prompt]

    def base_argv(self, agent: AgentSpec, mcp_config: str | None = None) -> list[str]:
        """R30's argv without the session and the prompt.

        ``mcp_config``: the path of the turn's skydeck MCP config (mcp.md M24), else
        no MCP server at all. Either way ``--strict-mcp-config``: an agent reaches no
        MCP server but skydeck's, whatever its workspace or HOME holds.
        """
        assert self.executable is not None
        argv = [
            self.executable,
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--mcp-config",
            mcp_config or json.dumps({"mcpServers": {}}),
            "--strict-mcp-config",
        ]
        if agent.mcp:
            argv += ["--allowedTools", MCP_TOOLS]
        argv += ["--permission-mode", "bypassPermissions"]
        if agent.model:
            argv += ["--model", agent.model]
        if agent.system_prompt:
            argv += ["--system-prompt", agent.system_prompt]
        return argv

    def warm_spec(self, agent: AgentSpec, session: TurnSession) -> WarmSpec:
        """W2/W11: the warm argv (claude-warm.md §1) and its fingerprint, for this turn."""
        assert self.executable is not None
        home = workspace_for(self.workspaces, agent)
        argv = [*self.base_argv(agent), "--input-format", "stream-json"]
        env = self.env(agent, home)
        jail = self.jail(agent, home, env)
        if jail is not None:
            env = jail.env
        stat = _stat(self.executable, env)
        sandbox = jail.fingerprint if jail is not None else ()
        fingerprint = Fingerprint.of(self.executable, stat, [*sandbox, *argv], env, str(home))
        return WarmSpec(agent, argv, env, home, session, fingerprint, jail)

    def jail(
        self, agent: AgentSpec, home: Path, env: dict[str, str], mcp_file: Path | None = None
    ) -> Jail | None:
        """The sandbox of the agent's process (`sandbox.Sandbox.jail`), None when off.

        With MCP on, the sandbox's gateway routes ``/mcp/<channel>`` to the daemon
        (S17 a) for the process's whole life (a warm one gets each turn's token on
        stdin); a cold turn's M24 config file is bound in read-only.
        """
        if self.sandbox is None:
            return None
        assert self.executable is not None
        found = shutil.which(self.executable, path=env.get("PATH")) or self.executable
        return self.sandbox.jail(
            agent,
            workspace=home,
            env=env,
            executable=os.path.abspath(found),
            claude=True,
            mcp_channel=agent.channel if agent.mcp else None,
            mcp_file=mcp_file,
        )

    def env(self, agent: AgentSpec, home: Path) -> dict[str, str]:
        defaults = {
            # skydeck owns the retry policy (R33) and the timeout (R14).
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        if os.geteuid() == 0:
            # As root the CLI refuses bypassPermissions unless told it is sandboxed;
            # each agent runs in its own workspace with a minimal environment.
            defaults["IS_SANDBOX"] = "1"
        return minimal_env(agent, home, passthrough=CREDENTIAL_KEYS, defaults=defaults)

    async def _warm_attempt(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        plan: _Plan,
        tools: ToolAccess | None,
    ) -> TurnResult:
        """One attempt on the agent's warm process (W3-W6), or cold if the pool says so."""
        pool = self.pool
        assert pool is not None
        async with pool.lease(self.warm_spec(agent, session)) as proc:
            if proc is None:
                return await self._attempt(agent, prompt, session, emit, tools)
            verdict = await pool.turn(
                proc,
                prompt,
                emit,
                max_reply_bytes=agent.max_reply_bytes,
                servers={"skydeck": tools.server} if tools is not None else None,
            )
            if isinstance(verdict, Stopped):
                raise BackendError(verdict.reason)
            if isinstance(verdict, Surprise):
                plan.warm = False
                if verdict.before_init:
                    pool.fallback("surprise")
                    raise _RunCold()
                outcome = verdict.outcome or StreamOutcome()
                if verdict.returncode is not None:
                    # It exited on its own: judged as a cold process would be.
                    return self._judge(outcome, verdict.returncode, "", session)
                raise _Retry(f"the warm claude process {verdict.reason}", outcome)
            outcome = verdict.outcome
            if outcome.api_status in (401, 403):
                pool.close_after_turn(proc, "auth")  # W5: the next spawn reads them again
            return replace(self._judge(outcome, 0, "", session), usage=verdict.usage)

    async def _attempt(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        tools: ToolAccess | None,
    ) -> TurnResult:
        home = workspace_for(self.workspaces, agent)
        parser = StreamParser(max_reply_bytes=agent.max_reply_bytes)
        stderr = TailBuffer.for_chars(STDERR_TAIL)

        async def read_stream(stdout: trio.abc.ReceiveStream) -> None:
            async for line in iter_lines(stdout):
                events = (
                    parser.overlong(line.size) if isinstance(line, Overlong) else parser.feed(line)
                )
                for kind, data in events:
                    emit(kind, data)

        env = self.env(agent, home)
        jail = self.jail(agent, home, env, tools.config if tools is not None else None)
        async with open_group_process(
            self.argv(agent, prompt, session, tools),
            env=env if jail is None else jail.env,
            cwd=home,
            processes=self.processes,
            owner=agent,
            jail=jail,
        ) as process:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.aclose()
            returncode = await run_until_exit(
                process,
                partial(read_stream, process.stdout),
                partial(pump, process.stderr, stderr.add),
            )
        if jail is not None:
            returncode = jail.judge(returncode, stderr.tail(STDERR_TAIL))
        return self._judge(parser.outcome, returncode, stderr.tail(STDERR_TAIL), session)

    def _judge(
        self, outcome: StreamOutcome, returncode: int, stderr: str, session: TurnSession
    ) -> TurnResult:
        if outcome.ok:
            return TurnResult(
                reply=outcome.reply, session_id=outcome.session_id, usage=outcome.usage
            )
        if outcome.result is not None:
            if session.resume and outcome.resume_not_found:
                raise _ResumeNotFound()
            status = outcome.api_status
            api_failure = outcome.result.get("subtype") == "success"
            if (status is not None and status >= 500) or (status is None and api_failure):
                raise _Retry(outcome.error_text, outcome)
            raise BackendError(outcome.error_text, session_id=outcome.session_id)
        if returncode < 0:
            raise _Retry(f"claude was {describe_exit(returncode)}", outcome)
        raise BackendError(
            stderr.strip() or f"claude {describe_exit(returncode)} without a result",
            session_id=outcome.session_id,
        )


def _stat(executable: str, env: Mapping[str, str]) -> os.stat_result | None:
    """The binary on disk (W11: a new CLI from `make claude` restarts warm processes)."""
    path = executable if "/" in executable else shutil.which(executable, path=env.get("PATH"))
    try:
        return os.stat(path) if path else None
    except OSError:
        return None
