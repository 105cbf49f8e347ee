"""Warm claude processes: one long-lived ``claude -p --input-format stream-json`` per
single-threaded agent, kept by a `WarmPool` that runs in the service nursery (W2).

Why: a cold turn pays the CLI's start-up (0.5-1 s here, 2-5 s against the real
API) on every message; a warm process answers in 30-50 ms and keeps the
conversation in memory (``shared/spec/claude-warm.md`` §3).

    WarmPool.run (nursery)                 started by Service.run, closed after the registry
    └── warm:<agent>                       one per process, under the reaper (process.py)
        ├── stdout -> WarmProtocol.feed    the turn's events, its verdict, or a surprise
        ├── stderr                         any output is a surprise (W6)
        ├── idle timer                     W9
        └── closer                         stdin EOF, CLOSE_WAIT_S, then the group is stopped

A turn *leases* its agent's process (`WarmPool.lease`): the lease is the
process's lock, so one line is in flight at a time (W3), and a process that is
leased is never evicted or timed out. What a process may do is decided in
`claude_warm_protocol`; this module only runs processes and pipes, and keeps the
rules on when they start and end:

- at most ``max_processes`` alive, counting those still closing; at the cap the
  least recently used idle one is closed, and if none is idle the turn runs cold (W10);
- at most one process per agent, ever: a new one starts only after the old one
  has been reaped (W12), so two processes never write one session;
- a turn that is stopped (timeout, interrupt, removal) kills its process (W7,
  W8); closing an idle one is stdin EOF, then SIGTERM/SIGKILL after
  `CLOSE_WAIT_S` (W9, W13, W16);
- every process is recorded in the `ProcessRegistry` for its whole life, so a
  daemon killed with SIGKILL leaves nothing that the next start does not kill
  before it replays (W17, via `ProcessRegistry.kill_leftovers`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..model import AgentSpec, TurnSession
from ..procs import ProcessRegistry, all_processes
from ..sandbox import Jail
from .base import Emit, EventKind
from .claude_warm_protocol import (
    RECYCLE_RSS_BYTES,
    RECYCLE_TURNS,
    Fingerprint,
    Stopped,
    Surprise,
    SurpriseLog,
    Verdict,
    WarmProtocol,
    pick_lru,
    recycle_reason,
    servers_line,
)
from .process import CHUNK, EXIT_GRACE_S, iter_lines, open_group_process

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


class WarmState(StrEnum):
    """What a warm process is doing (`/health`)."""

    BUSY = "busy"
    IDLE = "idle"
    CLOSING = "closing"


class Ending(StrEnum):
    """Why the pool closed a warm process (logs, the next spawn's reason); a
    definition or session mismatch, or an auth failure, names its own."""

    SHUTDOWN = "shutdown"
    RELEASED = "released"
    STOPPED = "stopped"
    SURPRISE = "surprise"
    RECYCLED = "recycled"
    EVICTED = "evicted"
    IDLE = "idle"


DEFAULT_WARM_MAX = 4
DEFAULT_WARM_IDLE_S = 600.0
#: W9/W16: how long a process gets to exit after stdin EOF (it takes ~30 ms).
CLOSE_WAIT_S = 3.0
#: A turn whose line could not be written waits this long for what the CLI said before it went.
WRITE_FAILED_WAIT_S = 1.0

_ON = ("on", "1", "true", "yes")
_OFF = ("off", "0", "false", "no")


@dataclass(frozen=True, slots=True)
class WarmConfig:
    """The settings (README): `SKYDECK_CLAUDE_WARM`, `_MAX` (0 = off) and `_IDLE_S`."""

    enabled: bool = True
    max_processes: int = DEFAULT_WARM_MAX
    idle_s: float = DEFAULT_WARM_IDLE_S

    @property
    def active(self) -> bool:
        return self.enabled and self.max_processes > 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WarmConfig:
        """Read the three variables; a bad value is a `ValueError` naming it."""
        raw = env.get("SKYDECK_CLAUDE_WARM", "on").strip().lower()
        if raw not in (*_ON, *_OFF):
            raise ValueError(f"SKYDECK_CLAUDE_WARM must be on or off, not {raw!r}")
        max_raw = env.get("SKYDECK_CLAUDE_WARM_MAX", str(DEFAULT_WARM_MAX))
        idle_raw = env.get("SKYDECK_CLAUDE_WARM_IDLE_S", str(DEFAULT_WARM_IDLE_S))
        try:
            max_processes = int(max_raw)
        except ValueError:
            max_processes = -1
        if max_processes < 0:
            raise ValueError(f"SKYDECK_CLAUDE_WARM_MAX must be an integer >= 0, not {max_raw!r}")
        try:
            idle_s = float(idle_raw)
        except ValueError:
            idle_s = math.nan
        if not idle_s > 0 or math.isinf(idle_s):
            raise ValueError(
                f"SKYDECK_CLAUDE_WARM_IDLE_S must be a number of seconds > 0, not {idle_raw!r}"
            )
        return cls(enabled=raw in _ON, max_processes=max_processes, idle_s=idle_s)


@dataclass(frozen=True, slots=True)
class WarmSpec:
    """What one agent's process is started with, computed by the backend before every turn."""

    agent: AgentSpec
    #: The warm argv without the session flags (those are `session`).
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    session: TurnSession
    fingerprint: Fingerprint
    #: The sandbox the process lives in for its whole life (S20), None when off.
    jail: Jail | None = None

    def command(self) -> list[str]:
        """R11/W2: ``--resume <id>`` or ``--session-id <id>``; never a positional prompt."""
        flag = "--resume" if self.session.resume else "--session-id"
        return [*self.argv, flag, self.session.id]


class WarmProcess:
    """One warm CLI and what the pool knows about it."""

    def __init__(self, spec: WarmSpec, spawn_reason: str) -> None:
        self.spec = spec
        self.agent = spec.agent.name
        self.spawn_reason = spawn_reason
        self.protocol = WarmProtocol(spec.session.id)
        #: Held by the turn that leases the process.
        self.lock = trio.Lock()
        #: Cancelled = the process group is stopped at once (the reaper's SIGTERM/SIGKILL).
        self.scope = trio.CancelScope()
        self.close_asked = trio.Event()
        self.gone = trio.Event()
        #: Why it is being closed (a metric label), once it is.
        self.closing: str | None = None
        self.stop_detail = ""
        self.process: trio.Process | None = None
        self.claude_pid: int | None = None
        self.last_used = trio.current_time()
        self.idle_deadline = math.inf
        self.idle_scope: trio.CancelScope | None = None
        self.emit: Emit | None = None
        self.verdict: Verdict | None = None
        self.done = trio.Event()

    @property
    def evictable(self) -> bool:
        return self.closing is None and not self.lock.locked()

    @property
    def pid(self) -> int | None:
        """The CLI's own pid (the reaper's first child), for /health and RSS."""
        if self.claude_pid is None and self.process is not None:
            pid: int | None = self.process.pid
            # Sandboxed: bwrap, its init and the relay come first (`Jail.depth`).
            for _ in range(1 + (self.spec.jail.depth if self.spec.jail is not None else 0)):
                pid = first_child(pid) if pid is not None else None
            self.claude_pid = pid
        return self.claude_pid

    def mismatch(self, spec: WarmSpec) -> str | None:
        """W11/W12: why this process cannot run a turn of ``spec``, or None."""
        if spec.fingerprint != self.spec.fingerprint:
            return "definition"
        if spec.session.id != self.spec.session.id:
            return "session"
        return None

    def set_idle_deadline(self, deadline: float) -> None:
        self.idle_deadline = deadline
        if self.idle_scope is not None:
            self.idle_scope.deadline = deadline

    def begin(self, emit: Emit) -> None:
        self.emit = emit
        self.verdict = None
        self.done = trio.Event()

    def finish(self, verdict: Verdict) -> None:
        """The turn in flight ended (the first verdict wins)."""
        if self.verdict is None:
            self.verdict = verdict
            self.done.set()


class WarmPool:
    """The warm processes of one claude backend (W2, W9, W10, W12, W16)."""

    def __init__(
        self,
        config: WarmConfig,
        *,
        processes: ProcessRegistry | None = None,
        on_spawn: Callable[[str], None] | None = None,
        on_fallback: Callable[[str], None] | None = None,
        recycle_turns: int = RECYCLE_TURNS,
        recycle_rss_bytes: int = RECYCLE_RSS_BYTES,
    ) -> None:
        self.config = config
        self.processes = processes
        self.on_spawn = on_spawn
        self.on_fallback = on_fallback
        self.recycle_turns = recycle_turns
        self.recycle_rss_bytes = recycle_rss_bytes
        self.surprises = SurpriseLog()
        #: Every process not reaped yet, closing ones included: at most one per agent (W12).
        self._by_agent: dict[str, WarmProcess] = {}
        #: Why each agent's last process ended: the reason label of its next spawn.
        self._ended: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._closed = trio.Event()

    @property
    def count(self) -> int:
        return len(self._by_agent)

    # -- lifetime -------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the processes until `close` (or cancellation, which stops them all)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._closed.wait()
        finally:
            self._nursery = None

    async def close(self) -> None:
        """W16: stdin EOF to every idle process and a kill for a busy one, all at once;
        each gets `CLOSE_WAIT_S`, then its group is stopped. Returns when none is left."""
        self._closing = True
        for proc in list(self._by_agent.values()):
            self._stop(proc, Ending.SHUTDOWN, kill=proc.lock.locked())
        while self._by_agent:
            await next(iter(self._by_agent.values())).gone.wait()
        self._closed.set()

    def release(self, agent_name: str, reason: str) -> None:
        """W13/W15 (reset, removal, channel move): close the agent's process, if any:
        stdin EOF when idle, a kill when a turn runs on it (that turn fails with
        ``reason`` unless it is being cancelled anyway)."""
        proc = self._by_agent.get(agent_name)
        if proc is not None:
            self._stop(proc, Ending.RELEASED, kill=proc.lock.locked(), detail=reason)

    def health(self) -> dict[str, Any]:
        """For /health: each process with its agent, pid, turns, RSS and idle seconds."""
        now = trio.current_time()
        rows = []
        for name, proc in sorted(self._by_agent.items()):
            pid = proc.pid
            busy = proc.lock.locked()
            rows.append(
                {
                    "agent": name,
                    "pid": pid,
                    "state": WarmState.CLOSING
                    if proc.closing
                    else WarmState.BUSY
                    if busy
                    else WarmState.IDLE,
                    "turns": proc.protocol.turns,
                    "rss_bytes": rss_bytes(pid),
                    "idle_s": None if busy else round(now - proc.last_used, 1),
                }
            )
        return {
            "max": self.config.max_processes,
            "idle_timeout_s": self.config.idle_s,
            "processes": rows,
        }

    # -- turns ----------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, spec: WarmSpec) -> AsyncIterator[WarmProcess | None]:
        """The agent's process for one turn attempt, or None: run this attempt cold."""
        proc = await self._acquire(spec)
        try:
            yield proc
        finally:
            if proc is not None:
                self._give_back(proc)

    async def turn(
        self,
        proc: WarmProcess,
        prompt: str,
        emit: Emit,
        *,
        max_reply_bytes: int,
        servers: Mapping[str, Any] | None = None,
    ) -> Verdict:
        """W2/W3: write the turn's line at once (the CLI queues it while it starts up)
        and wait for its verdict. A surprise or a stop returns once the process is gone.

        ``servers``: this turn's MCP servers, set by a control request written just
        before the line (mcp.md M24); they are never part of the process's argv, so
        a new token each turn changes nothing in its fingerprint (W11).
        """
        assert proc.lock.locked() and proc.process is not None
        stdin = proc.process.stdin
        assert stdin is not None
        if proc.protocol.broken is not None:
            # It spoke before it was spoken to (a line, stderr, an exit): before init.
            await proc.gone.wait()
            return proc.protocol.broken
        line = proc.protocol.start_turn(prompt, max_reply_bytes=max_reply_bytes)
        if servers is not None:
            line = servers_line(servers, f"skydeck-mcp-{proc.protocol.turns}") + line
        proc.begin(emit)
        try:
            try:
                await stdin.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # Gone or going; it may still have said why (a missing session, W14).
                with trio.move_on_after(WRITE_FAILED_WAIT_S):
                    await proc.done.wait()
                if proc.verdict is None:
                    self._surprised(proc, proc.protocol.surprise("took no input (broken pipe)"))
            await proc.done.wait()
        except BaseException:
            if proc.verdict is None:
                # W7/W8: the turn was stopped (timeout, interrupt, removal): so is the process.
                self._stop(proc, Ending.STOPPED, kill=True)
                with trio.CancelScope(shield=True):
                    await proc.gone.wait()
            raise
        finally:
            proc.emit = None
        verdict = proc.verdict
        assert verdict is not None
        if isinstance(verdict, Surprise | Stopped):
            await proc.gone.wait()  # W12: nothing runs on this session before it is reaped
        return verdict

    def close_after_turn(self, proc: WarmProcess, label: str) -> None:
        """W5: a 401/403 closes the process, so the next spawn reads the credentials again."""
        self._stop(proc, label)

    def fallback(self, reason: str) -> None:
        """Count a turn attempt that runs cold (``skydeck_claude_cold_fallbacks_total``)."""
        log.info("claude turn runs cold", extra={"reason": reason})
        if self.on_fallback is not None:
            self.on_fallback(reason)

    async def _acquire(self, spec: WarmSpec) -> WarmProcess | None:
        name = spec.agent.name
        while True:
            if self._nursery is None or self._closing:
                self.fallback("not_running" if self._nursery is None else "shutdown")
                return None
            proc = self._by_agent.get(name)
            if self.surprises.cold(name):
                if proc is None:
                    self.fallback("surprise_limit")
                    return None
                self._stop(proc, Ending.SURPRISE)  # killed already; W12: cold only once it is gone
                await proc.gone.wait()
                continue
            if proc is not None:
                if proc.closing is None:
                    try:
                        proc.lock.acquire_nowait()
                    except trio.WouldBlock:
                        await proc.lock.acquire()  # this agent's other turn (W3)
                    why = proc.closing or proc.mismatch(spec)
                    if why is None:
                        proc.set_idle_deadline(math.inf)
                        return proc
                    proc.lock.release()
                    if proc.closing is None:
                        changed = proc.spec.fingerprint.changes(spec.fingerprint)
                        log.info(
                            "warm claude process no longer fits the turn",
                            extra={"agent": name, "why": why, "changed": ",".join(changed)},
                        )
                        self._stop(proc, why)
                await proc.gone.wait()  # W12
                continue
            if len(self._by_agent) >= self.config.max_processes:
                victim = pick_lru(self._by_agent.values())
                if victim is None:
                    self.fallback("cap")  # W10: every process is busy; no waiting
                    return None
                self._stop(
                    victim, Ending.EVICTED, detail=f"cap of {self.config.max_processes} reached"
                )
                await victim.gone.wait()
                continue
            return await self._spawn(spec)

    async def _spawn(self, spec: WarmSpec) -> WarmProcess | None:
        assert self._nursery is not None
        name = spec.agent.name
        proc = WarmProcess(spec, self._ended.pop(name, "new"))
        proc.lock.acquire_nowait()
        self._by_agent[name] = proc
        try:
            await self._nursery.start(self._serve, proc, name=f"warm:{name}")
        except Exception as exc:
            # The cold attempt meets the same problem and reports it as the turn's reason.
            log.warning(
                "could not start a warm claude process", extra={"agent": name, "error": str(exc)}
            )
            self.fallback("spawn_failed")
            return None
        log.info(
            "warm claude process started",
            extra={
                "agent": name,
                "shim_pid": proc.process.pid if proc.process else None,
                "reason": proc.spawn_reason,
                "session": spec.session.id,
                "resume": spec.session.resume,
            },
        )
        if self.on_spawn is not None:
            self.on_spawn(proc.spawn_reason)
        return proc

    def _give_back(self, proc: WarmProcess) -> None:
        """End of a lease: recycle (W10) or start the idle clock (W9)."""
        proc.emit = None
        proc.last_used = trio.current_time()
        if proc.closing is None:
            why = recycle_reason(
                proc.protocol.turns,
                rss_bytes(proc.pid),
                max_turns=self.recycle_turns,
                max_rss_bytes=self.recycle_rss_bytes,
            )
            if why is not None:
                self._stop(proc, Ending.RECYCLED, detail=why)
            else:
                proc.set_idle_deadline(proc.last_used + self.config.idle_s)
        proc.lock.release()

    # -- one process ----------------------------------------------------------------

    def _stop(self, proc: WarmProcess, label: str, *, kill: bool = False, detail: str = "") -> None:
        """Begin closing ``proc``: stdin EOF (the closer), or at once with ``kill``."""
        if proc.closing is None:
            proc.closing = label
            proc.stop_detail = detail or label
        if kill:
            proc.scope.cancel()
        else:
            proc.close_asked.set()

    def _surprised(self, proc: WarmProcess, surprise: Surprise) -> None:
        """W6: log, count, kill the group; the turn in flight (if any) hears of it."""
        if proc.closing is not None:
            return  # being stopped: whatever it does now was asked for
        log.warning(
            "warm claude process dropped after a protocol surprise",
            extra={
                "agent": proc.agent,
                "pid": proc.pid,
                "reason": surprise.reason,
                "before_init": surprise.before_init,
            },
        )
        if self.surprises.add(proc.agent, trio.current_time()):
            log.warning(
                "agent stays cold until the daemon restarts: too many warm surprises",
                extra={"agent": proc.agent, "limit": self.surprises.limit},
            )
        self._stop(proc, Ending.SURPRISE, kill=True, detail=surprise.reason)
        proc.finish(surprise)

    async def _serve(self, proc: WarmProcess, *, task_status: TaskStatus[None]) -> None:
        """The process's whole life, under the reaper and in the process registry."""
        started = False
        try:
            with proc.scope:
                async with open_group_process(
                    proc.spec.command(),
                    env=proc.spec.env,
                    cwd=proc.spec.cwd,
                    processes=self.processes,
                    owner=proc.spec.agent,
                    jail=proc.spec.jail,
                ) as process:
                    proc.process = process
                    started = True
                    task_status.started()
                    await self._watch(proc, process)
        except Exception:
            if not started:
                raise  # to _spawn: the turn runs cold
            log.exception("warm claude process failed", extra={"agent": proc.agent})
        finally:
            proc.closing = proc.closing or "exited"
            if self._by_agent.get(proc.agent) is proc:
                del self._by_agent[proc.agent]
            self._ended[proc.agent] = proc.closing
            proc.finish(Stopped(f"claude was stopped ({proc.stop_detail or proc.closing})"))
            proc.gone.set()
            if proc.process is not None:
                log.info(
                    "warm claude process closed",
                    extra={
                        "agent": proc.agent,
                        "pid": proc.claude_pid,
                        "why": proc.closing,
                        "detail": proc.stop_detail,
                        "returncode": proc.process.returncode,
                        "turns": proc.protocol.turns,
                    },
                )

    async def _watch(self, proc: WarmProcess, process: trio.Process) -> None:
        assert process.stdout is not None and process.stderr is not None
        stdout_done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_stdout, proc, process.stdout, stdout_done)
            nursery.start_soon(self._read_stderr, proc, process.stderr)
            nursery.start_soon(self._idle_timer, proc)
            nursery.start_soon(self._closer, proc, process)
            returncode = await process.wait()
            if proc.spec.jail is not None:
                returncode = proc.spec.jail.returncode(returncode)  # S12
            # A result the CLI printed just before it exited is still in the pipe.
            with trio.move_on_after(EXIT_GRACE_S):
                await stdout_done.wait()
            nursery.cancel_scope.cancel()
        if proc.closing is None and (surprise := proc.protocol.exited(returncode)) is not None:
            self._surprised(proc, surprise)

    async def _read_stdout(
        self, proc: WarmProcess, stdout: trio.abc.ReceiveStream, done: trio.Event
    ) -> None:
        try:
            async for line in iter_lines(stdout):
                events, verdict = proc.protocol.feed(line)
                for kind, data in events:
                    self._emit(proc, kind, data)
                if isinstance(verdict, Surprise):
                    self._surprised(proc, verdict)
                elif verdict is not None:
                    proc.finish(verdict)
        finally:
            done.set()

    async def _read_stderr(self, proc: WarmProcess, stderr: trio.abc.ReceiveStream) -> None:
        while chunk := await stderr.receive_some(CHUNK):
            if (surprise := proc.protocol.stderr(chunk)) is not None:
                self._surprised(proc, surprise)

    async def _idle_timer(self, proc: WarmProcess) -> None:
        """W9: close the process `idle_s` after its last lease ended."""
        while proc.closing is None:
            with trio.CancelScope(deadline=proc.idle_deadline) as scope:
                proc.idle_scope = scope
                await trio.sleep_forever()
            if proc.evictable and trio.current_time() >= proc.idle_deadline:
                self._stop(proc, Ending.IDLE, detail=f"idle for {self.config.idle_s:g} s")

    async def _closer(self, proc: WarmProcess, process: trio.Process) -> None:
        await proc.close_asked.wait()
        assert process.stdin is not None
        await process.stdin.aclose()  # an idle CLI exits 0 in ~30 ms
        await trio.sleep(CLOSE_WAIT_S)
        log.warning(
            "warm claude process did not exit on stdin EOF; stopping its group",
            extra={"agent": proc.agent, "pid": proc.pid},
        )
        proc.scope.cancel()

    def _emit(self, proc: WarmProcess, kind: EventKind, data: dict[str, Any]) -> None:
        if proc.emit is None:
            return
        try:
            proc.emit(kind, data)
        except Exception:  # R25: a viewer's failure never breaks the process
            log.exception("a warm turn's event sink failed", extra={"agent": proc.agent})


def first_child(pid: int) -> int | None:
    """The oldest child of ``pid``: under the reaper, the program it started."""
    children = [stat for stat in all_processes() if stat.ppid == pid]
    return min(children, key=lambda stat: stat.start_time).pid if children else None


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS from ``/proc/<pid>/status`` (W10), None when the process is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
