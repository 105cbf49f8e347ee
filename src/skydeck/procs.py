"""Processes skydeck starts: how they are launched, recorded, and killed when left over.

Three parts, each usable alone:

- **Launching** is an argv plus the file descriptors it needs (`Launch`); a
  wrapper takes a `Launch` and returns one. `under_reaper` puts the program
  under `reaper.py`, which keeps every process it starts inside the program's
  lifetime. Wrappers compose (a sandbox wraps the program first, the reaper
  goes outside it: ``under_reaper(sandboxed(launch), fd)``).
- **Identity**: a pid alone is recycled; pid + start time (``/proc/<pid>/stat``
  field 22) + boot id names one process for ever (`identify`).
- **The registry** (`ProcessRegistry`) records each running process in the
  store before its output is read, and forgets it once reaped. A daemon
  killed with SIGKILL leaves rows behind; at the next start `kill_leftovers`
  kills whatever they still name (the process, its descendants and its
  process group), before any message is replayed.

Finding descendants scans ``/proc`` (``task/*/children`` needs a kernel option
that is often off); that is a snapshot, so it is used only where the reaper
itself cannot act: its stop deadline passed, or the daemon died.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import trio

from .model import AgentSpec, ProcessRecord
from .store import Store

log = logging.getLogger(__name__)

#: Imports `reaper.py` as a top-level module (appended to the path: the standard
#: library still wins every other name), so its bytecode is cached.
REAPER_LOADER = (
    f"import sys; sys.path.append({str(Path(__file__).parent)!r}); "
    "import reaper; reaper.main(sys.argv[1:])"
)
#: How long `kill_leftovers` waits for SIGKILLed processes to be gone.
LEFTOVER_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class Launch:
    """What to execute: an argv, and the descriptors the child must inherit."""

    argv: list[str]
    pass_fds: tuple[int, ...] = ()


def under_reaper(launch: Launch, control_fd: int) -> Launch:
    """``launch`` run by `reaper.py`; closing ``control_fd``'s write end stops it.

    ``-I -S``: no site-packages, no environment variables read, no user
    directories: the reaper starts fast and the agent's env cannot change how
    it runs.
    """
    return Launch(
        [sys.executable, "-I", "-S", "-c", REAPER_LOADER, str(control_fd), *launch.argv],
        (*launch.pass_fds, control_fd),
    )


# -- identity -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` skydeck uses."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    start_time: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain them.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        start_time=int(fields[19]),
    )


@cache
def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def identify(pid: int) -> tuple[int, str] | None:
    """``(start_time, boot_id)`` of a running (or not yet reaped) process."""
    stat = read_stat(pid)
    return None if stat is None else (stat.start_time, boot_id())


def all_processes() -> list[ProcStat]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            found.append(stat)
    return found


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its parent."""
    stat = read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


def descendants(pid: int, table: Iterable[ProcStat]) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in table:
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return found


def kill_tree(pid: int, *, leader_alive: bool = True) -> list[int]:
    """SIGKILL ``pid``, its descendants and its process group; returns who was signalled.

    The caller must know ``pid`` is still the process it means (its parent that
    has not reaped it, or a matching `identify`). With ``leader_alive=False``
    only the group is hit: a group outlives its leader, and the kernel does not
    hand out the leader's pid again while the group exists.
    """
    table = all_processes()
    members = [stat.pid for stat in table if stat.pgrp == pid]
    targets = [pid, *descendants(pid, table)] if leader_alive else []
    for target in targets:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return sorted({*targets, *members})


# -- the registry -------------------------------------------------------------------


class ProcessRegistry:
    """The store's record of running processes, so a crash cannot orphan them for good."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._records: dict[int, ProcessRecord] = {}

    async def track(self, pid: int, owner: AgentSpec) -> None:
        """Record ``pid`` (not reaped yet) and return once the row is committed."""
        identity = identify(pid)
        if identity is None:
            return
        start_time, boot = identity
        record = ProcessRecord(
            pid=pid, start_time=start_time, boot_id=boot, agent=owner.name, channel=owner.channel
        )
        self._records[pid] = record
        await self.store.add_process(record)
        await self.store.flushed()

    async def untrack(self, pid: int) -> None:
        """``pid`` was reaped: forget it (a row left by a crash here is harmless)."""
        record = self._records.pop(pid, None)
        if record is not None:
            await self.store.remove_process(record)

    async def kill_leftovers(self) -> list[ProcessRecord]:
        """At start: kill what a previous run of this data dir left running.

        A row whose pid now belongs to another process (start time differs), or
        from before a reboot, is only deleted. Returns the records acted on.
        """
        hit: list[ProcessRecord] = []
        signalled: set[int] = set()
        for record in await self.store.list_processes():
            if record.boot_id != boot_id():
                continue
            current = identify(record.pid)
            if current is not None and current[0] != record.start_time:
                continue  # the pid was recycled: not ours
            pids = kill_tree(record.pid, leader_alive=current is not None)
            if pids:
                hit.append(record)
                signalled.update(pids)
                log.warning(
                    "killed processes left by a previous run",
                    extra={
                        "agent": record.agent,
                        "channel": record.channel,
                        "pid": record.pid,
                        "killed": len(pids),
                    },
                )
        await self.store.clear_processes()
        await self.store.flushed()
        with trio.move_on_after(LEFTOVER_WAIT_S):
            # Not our children: no exit event to wait on, only /proc to look at.
            while any(alive(pid) for pid in signalled):  # noqa: ASYNC110
                await trio.sleep(0.01)
        return hit
