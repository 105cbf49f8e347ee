"""Child processes for backends: argv lists, a minimal environment, and a turn
that ends when its program ends, taking every process it started with it.

Why the reaper (`procs.under_reaper`, `reaper.py`): an agent's program may
start helpers of its own (a shell, an MCP server, a language server), and a
helper may leave the process group with ``setsid`` and hold stdout open. So a
turn does not end at stdout's EOF but when the program exits (`run_until_exit`,
plus `EXIT_GRACE_S` to read what is already in the pipes), and the reaper then
kills every process left in the tree, whatever session it made. A turn that is
stopped (timeout, deregister, shutdown) closes the reaper's control pipe: the
tree gets SIGTERM, then SIGKILL; a reaper that does not finish in
`KILL_GRACE_S` has its tree SIGKILLed from here.

What a backend keeps of the output is bounded (`output.py`): the head of
stdout, the tail of stderr, lines of at most `output.MAX_LINE_BYTES`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Protocol

import trio

from ..model import AgentSpec
from ..procs import Launch, ProcessRegistry, kill_tree, under_reaper
from .output import LineSplitter, Overlong

log = logging.getLogger(__name__)

#: How long a stopped turn's reaper gets to clean up before we SIGKILL its tree.
KILL_GRACE_S = 3.0
#: After the program exits: time to read what it left in the pipes.
EXIT_GRACE_S = 0.5
CHUNK = 65536
#: Characters of stderr quoted when a program fails.
STDERR_TAIL = 2000

#: Variables every child gets from the daemon's environment when they are set.
BASE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ")


def minimal_env(
    agent: AgentSpec,
    home: Path,
    passthrough: Iterable[str] = (),
    defaults: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """R30/R31: PATH, HOME (the agent's workspace), LANG, named credentials, the agent's env.

    Nothing else of the daemon's environment (its token, JWT secret, cloud
    credentials) reaches the child. ``defaults`` are backend settings that the
    agent's own ``env`` may override.
    """
    env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
    for key in (*BASE_ENV_KEYS, *passthrough):
        value = os.environ.get(key)
        if value is not None:
            env[key] = value
    env["HOME"] = str(home)
    env.update(defaults or {})
    env.update(agent.env)
    return env


def workspace_for(root: Path, agent: AgentSpec) -> Path:
    """The agent's private working directory (created on first use)."""
    path = root / agent.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_executable(program: str, *, path: str | None, cwd: Path) -> Path:
    """The file exec would run for ``program``, or what exec would raise.

    The reaper runs the program, so its exec errors would only show up as an
    exit status; checking first keeps "command not found: X" a clear failure
    (before any sandbox, which binds the file found here, S9 row 6).
    """
    if "/" in program:
        candidates = [cwd / program]
    else:
        candidates = [cwd / d / program for d in (path or os.defpath).split(os.pathsep)]
    denied = False
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        denied = denied or candidate.exists()
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


class Confinement(Protocol):
    """A sandbox around one process (`sandbox.Jail`): it rewrites the launch and
    owns whatever serves the process while it runs (its network gateway)."""

    def running(self, argv: list[str]) -> AbstractAsyncContextManager[Launch]: ...

    def spawned(self) -> None: ...


@asynccontextmanager
async def open_group_process(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    processes: ProcessRegistry | None = None,
    owner: AgentSpec | None = None,
    jail: Confinement | None = None,
) -> AsyncIterator[trio.Process]:
    """Start ``argv`` under the reaper (pipes on stdin/stdout/stderr), leading a new
    process group; with ``processes``, recorded (and committed) before this yields;
    with ``jail``, inside that sandbox (``env`` is then the jail's, S11).

    On leaving the block, for any reason, a reaper that still runs is told to stop
    (its control pipe closes) and given `KILL_GRACE_S`; after that its tree is
    SIGKILLed from here. The cleanup is shielded: it must finish even when the turn
    is being cancelled, or processes would be left behind.
    """
    check_executable(argv[0], path=env.get("PATH"), cwd=cwd)
    if jail is None:
        async with _group_process(Launch(list(argv)), env, cwd, processes, owner) as process:
            yield process
        return
    async with (
        jail.running(list(argv)) as launch,
        _group_process(launch, env, cwd, processes, owner, jail) as process,
    ):
        yield process


@asynccontextmanager
async def _group_process(
    launch: Launch,
    env: Mapping[str, str],
    cwd: Path,
    processes: ProcessRegistry | None,
    owner: AgentSpec | None,
    jail: Confinement | None = None,
) -> AsyncIterator[trio.Process]:
    control, keep = os.pipe()  # the reaper reads `control`; only we hold `keep`
    try:
        launch = under_reaper(launch, control)
        process = await trio.lowlevel.open_process(
            launch.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=dict(env),
            cwd=str(cwd),
            pass_fds=launch.pass_fds,
        )
    except BaseException:
        os.close(keep)
        raise
    finally:
        os.close(control)
        if jail is not None:
            jail.spawned()
    try:
        if processes is not None and owner is not None:
            await processes.track(process.pid, owner)
        yield process
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process, keep)
            if processes is not None:
                await processes.untrack(process.pid)


async def _stop(process: trio.Process, control: int) -> None:
    os.close(control)  # EOF: a reaper still running terminates its tree
    with trio.move_on_after(KILL_GRACE_S):
        await process.wait()
    if process.returncode is None:  # not reaped yet, so its pid is still its own
        log.warning("reaper did not stop in time; killing its tree", extra={"pid": process.pid})
        kill_tree(process.pid)
    await process.wait()
    # A program that SIGKILLed its own reaper leaves its process group behind:
    # the group is still named after the reaper, and dies here. (A helper that
    # also left the group with setsid is out of reach without a pid namespace:
    # a sandboxed turn has one, `sandbox/`.)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def run_until_exit(
    process: trio.Process,
    *pipes: Callable[[], Awaitable[None]],
    grace: float = EXIT_GRACE_S,
) -> int:
    """Run the ``pipes`` tasks (stdin writer, stdout/stderr readers) until the process
    exits and they had ``grace`` more seconds to finish; its exit status.

    The end of a turn is its program's exit, not stdout's EOF: a helper that
    still holds the pipe cannot keep the turn (or the channel) waiting.
    """
    finished = trio.Event()

    async def run_pipes() -> None:
        async with trio.open_nursery() as nursery:
            for pipe in pipes:
                nursery.start_soon(pipe)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_pipes)
        returncode = await process.wait()
        with trio.move_on_after(grace):
            await finished.wait()
        nursery.cancel_scope.cancel()
    return returncode


async def pump(stream: trio.abc.ReceiveStream | None, sink: Callable[[bytes], None]) -> None:
    """Everything from ``stream`` into ``sink``, chunk by chunk, as it arrives."""
    if stream is None:
        return
    while chunk := await stream.receive_some(CHUNK):
        sink(chunk)


async def feed(stream: trio.abc.SendStream | None, data: bytes) -> None:
    """Write ``data`` and close, ignoring a reader that is gone."""
    if stream is None:
        return
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
    await stream.aclose()


async def iter_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes | Overlong]:
    """Lines as they arrive (without the newline), a last unterminated line too;
    a line over `output.MAX_LINE_BYTES` comes as `Overlong`, never held in memory."""
    splitter = LineSplitter()
    while chunk := await stream.receive_some(CHUNK):
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.end():
        yield line


def describe_exit(returncode: int) -> str:
    """A readable sentence for how a process ended."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"
