"""Child processes for backends: argv lists, a minimal environment, and a
process group that is torn down as a whole.

Why a process group: an agent's program may start helpers of its own (a shell,
an MCP server, a language server). Killing only the direct child would leave
them running with nobody to reap them. Each turn's process starts a new
session (so it leads its own group); on cancellation the whole group gets
SIGTERM, then SIGKILL after a short grace, and after a normal exit any member
still alive is swept the same way: a turn leaves nothing running behind it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from ..model import AgentSpec

KILL_GRACE_S = 3.0

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


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def terminate_group(process: trio.Process) -> None:
    """`trio.run_process`'s ``deliver_cancel``: SIGTERM the group, then SIGKILL it."""
    kill_group(process.pid, signal.SIGTERM)
    with trio.move_on_after(KILL_GRACE_S):
        await process.wait()
    kill_group(process.pid, signal.SIGKILL)


@asynccontextmanager
async def open_group_process(
    argv: list[str], *, env: Mapping[str, str], cwd: Path
) -> AsyncIterator[trio.Process]:
    """Start ``argv`` (pipes on stdin/stdout/stderr) leading a new process group.

    On leaving the block, for any reason, the group is terminated if the
    process still runs and swept with SIGKILL either way. The cleanup is
    shielded: it is bounded by `KILL_GRACE_S` and must finish even when the
    turn is being cancelled, or orphans would be left behind.
    """
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(env),
        cwd=str(cwd),
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                await terminate_group(process)
            kill_group(process.pid)
            await process.wait()


async def iter_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    """Lines as they arrive (without the newline); a last unterminated line too."""
    buffer = bytearray()
    while chunk := await stream.receive_some(65536):
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
    if buffer:
        yield bytes(buffer)


async def read_all(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.receive_some(65536):
        into += chunk


async def _feed(stream: trio.abc.SendStream | None, data: bytes) -> None:
    if stream is None:
        return
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
    await stream.aclose()


@dataclass(slots=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run_in_group(
    argv: list[str], *, stdin: bytes, env: Mapping[str, str], cwd: Path
) -> Completed:
    """Run ``argv`` to completion in its own process group; output captured."""
    stdout, stderr = bytearray(), bytearray()
    async with open_group_process(argv, env=env, cwd=cwd) as process:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, process.stdin, stdin)
            nursery.start_soon(read_all, process.stdout, stdout)
            nursery.start_soon(read_all, process.stderr, stderr)
        returncode = await process.wait()
    return Completed(returncode=returncode, stdout=bytes(stdout), stderr=bytes(stderr))


def describe_exit(returncode: int) -> str:
    """A readable sentence for how a process ended."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"
