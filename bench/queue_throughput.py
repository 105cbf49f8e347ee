"""Turns per second through the registry, next to a raw Trio baseline.

For each shape (channels x messages per channel) it measures, in one run:

- raw:     a memory channel and a task per channel that receives and does nothing
           (the floor: what one-task-per-channel costs in Trio itself);
- memory:  the registry with an instant backend and the store in SQLite ``:memory:``;
- durable: the same with the store in a SQLite file (WAL), every message committed
           before it is handed to its channel task, as the daemon does.

Every message is submitted through `Registry.submit` (accept, store, notify) and
counted when its turn has ended (thread record, reply and state written).
Finally it registers 10,000 idle channels and reports the RSS each one costs.

With ``--floor`` it also runs the SQL a turn writes (accept, start, end: the
engine's statements), with no Python around it: executemany, 1,000 turns per
transaction, the best any group commit could do; once on the engine's schema and
once with the messages table stripped of its secondary indexes (dedup R8, the
per-channel transcript, the open-message replay R28). Those rates are the ceiling
any turn loop on these records can reach, whatever the daemon's own code costs.

    python bench/queue_throughput.py            # full run (about a minute)
    python bench/queue_throughput.py --quick    # smaller shapes, for a smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path

import psutil
import trio
import trio.lowlevel

from skydeck.backends.base import Emit
from skydeck.ledger import MessageState
from skydeck.model import AgentSpec, Inbound, ToolAccess, TurnResult, TurnSession
from skydeck.registry import build_registry
from skydeck.store import Store
from skydeck.store.sqlite import _SCHEMA, SQLiteStore

SHAPES = [(1, 100_000), (1_000, 100), (10_000, 10)]
QUICK_SHAPES = [(1, 5_000), (100, 50), (1_000, 5)]


class InstantBackend:
    async def deliver(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        *,
        tools: ToolAccess | None = None,
    ) -> TurnResult:
        return TurnResult(reply=prompt, session_id=session.id)


async def raw_baseline(channels: int, per_channel: int) -> float:
    total = channels * per_channel
    done = trio.Event()
    count = 0

    async def consume(receive: trio.MemoryReceiveChannel[int]) -> None:
        nonlocal count
        async for _ in receive:
            count += 1
            if count == total:
                done.set()

    async with trio.open_nursery() as nursery:
        senders = []
        for _ in range(channels):
            send, receive = trio.open_memory_channel[int](math.inf)
            senders.append(send)
            nursery.start_soon(consume, receive)
        await trio.lowlevel.checkpoint()
        start = time.perf_counter()
        for n in range(per_channel):
            for send in senders:
                send.send_nowait(n)
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return total / elapsed


async def registry_run(store: Store, channels: int, per_channel: int) -> float:
    total = channels * per_channel
    done = trio.Event()
    count = 0

    def finished(outcome: str, state: MessageState, elapsed: float, messages: int) -> None:
        nonlocal count
        count += 1
        if count == total:
            done.set()

    registry = build_registry(
        store, {"echo": InstantBackend()}, on_finished=finished, max_turns=channels
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.serve)
        names = [f"ch{i}" for i in range(channels)]
        for name in names:
            await registry.create(AgentSpec(name=name, channel=name, backend="echo"))
        await trio.lowlevel.checkpoint()
        start = time.perf_counter()
        for n in range(per_channel):
            for name in names:
                await registry.submit(Inbound(channel=name, content=f"m{n}"))
            if n % 10 == 0:  # let turns run while we post, as live traffic would
                await trio.lowlevel.checkpoint()
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return total / elapsed


async def idle_channel_rss(channels: int, tmp: Path) -> float:
    store = SQLiteStore(tmp / "idle.db")
    registry = build_registry(store, {})
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.serve)
        # warm the code paths so one-time allocations are not charged to the channels
        for i in range(100):
            await registry.create(AgentSpec(name=f"warm{i}", channel=f"warm{i}", backend="echo"))
        await trio.sleep(0.1)
        gc.collect()
        before: int = psutil.Process().memory_info().rss
        for i in range(channels):
            await registry.create(AgentSpec(name=f"idle{i}", channel=f"idle{i}", backend="echo"))
        await trio.sleep(0.1)
        gc.collect()
        after: int = psutil.Process().memory_info().rss
        nursery.cancel_scope.cancel()
    store.close()
    return (after - before) / channels


def idle_rss_in_fresh_process(channels: int) -> float:
    """RSS is only meaningful in a process whose allocator has not been warmed by
    the throughput runs (freed memory stays in the process and would be reused)."""
    out = subprocess.run(
        [sys.executable, __file__, "--idle-rss", str(channels)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())  # the child prints one number


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, channel, direction, content, state, created_at, "
    "metadata, external_id, in_reply_to, thread_id) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_UPSERT_THREAD = (
    "INSERT INTO threads (id, channel, agent, mode, status, input, output, session, "
    "turn_count, usage, started_at, ended_at, message_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (id) DO UPDATE SET status = excluded.status, output = excluded.output, "
    "turn_count = excluded.turn_count, ended_at = excluded.ended_at"
)
_AT = "2026-12-01T00:00:00.000000Z"


def _stripped(schema: str) -> str:
    """The engine's schema without the messages table's secondary indexes (the
    message id stays unique: the API and every update find a message by it)."""
    return re.sub(r"CREATE (UNIQUE )?INDEX IF NOT EXISTS messages_[^;]*;", "", schema)


def store_floor(path: str, schema: str, channels: int, turns: int) -> float:
    """Turns/s of a turn's SQL alone (see the module docstring), 1,000 per transaction."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    ids = [str(uuid.uuid4()) for _ in range(turns)]
    start = time.perf_counter()
    for first in range(0, turns, 1_000):
        batch = [(ids[i], f"ch{i % channels}") for i in range(first, min(first + 1_000, turns))]
        db.execute("BEGIN")  # accept
        db.executemany(
            _INSERT_MESSAGE,
            [(m, ch, "in", "m", "queued", _AT, "{}", None, None, None) for m, ch in batch],
        )
        db.execute("COMMIT")
        db.execute("BEGIN")  # start: the message working, the start record
        db.executemany(
            "UPDATE messages SET state = ?, attempts = ?, thread_id = ? WHERE id = ?",
            [("working", 1, "t" + m, m) for m, _ in batch],
        )
        db.executemany(
            _UPSERT_THREAD,
            [
                ("t" + m, ch, ch, "multi", "running", "m", "", None, 0, None, _AT, None, m)
                for m, ch in batch
            ],
        )
        db.execute("COMMIT")
        db.execute("BEGIN")  # end: the record ended, the reply, the message done
        db.executemany(
            _UPSERT_THREAD,
            [
                ("t" + m, ch, ch, "multi", "ok", "m", "m", None, 1, None, _AT, _AT, m)
                for m, ch in batch
            ],
        )
        db.executemany(
            _INSERT_MESSAGE,
            [("r" + m, ch, "out", "m", "done", _AT, "{}", None, m, "t" + m) for m, ch in batch],
        )
        db.executemany(
            "UPDATE messages SET state = ?, error = ?, reply_id = ? WHERE id = ?",
            [("done", None, "r" + m, m) for m, _ in batch],
        )
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return turns / elapsed


def measure(label: str, run: Callable[..., Awaitable[float]], *args: object) -> float:
    rate: float = trio.run(run, *args)
    print(f"  {label:<8} {rate:>10,.0f} turns/s", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--floor", action="store_true", help="also the SQL-only ceiling")
    parser.add_argument("--idle-rss", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.idle_rss:
        with tempfile.TemporaryDirectory() as tmp:
            print(trio.run(idle_channel_rss, args.idle_rss, Path(tmp)))
        return
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"python {sys.version.split()[0]}, trio {version('trio')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (channels, per_channel) in enumerate(shapes):
            print(f"{channels} channels x {per_channel} messages", flush=True)
            raw = measure("raw", raw_baseline, channels, per_channel)
            memory = measure("memory", registry_run, SQLiteStore(":memory:"), channels, per_channel)
            path = Path(tmp) / f"bench{i}.db"
            durable = measure("durable", registry_run, SQLiteStore(path), channels, per_channel)
            rows.append((channels, per_channel, raw, memory, durable))
        idle = idle_rss_in_fresh_process(1_000 if args.quick else 10_000)
        floors: list[tuple[str, str, float, float]] = []
        if args.floor:
            raw = next(r for c, p, r, _, _ in rows if (c, p) == shapes[1])
            for label, schema in (
                ("engine schema", _SCHEMA),
                ("no message indexes", _stripped(_SCHEMA)),
            ):
                for kind, file in (
                    ("in-memory", ":memory:"),
                    ("durable", str(Path(tmp) / f"floor{len(floors)}.db")),
                ):
                    rate = store_floor(file, schema, shapes[1][0], 100_000)
                    floors.append((label, kind, rate, rate / raw))
    print()
    print(
        "| channels x messages | raw Trio turns/s | in-memory turns/s (ratio) "
        "| durable turns/s (ratio) |"
    )
    print("|---|---:|---:|---:|")
    for channels, per_channel, raw, memory, durable in rows:
        print(
            f"| {channels:,} x {per_channel:,} | {raw:,.0f} | {memory:,.0f} ({memory / raw:.3f}x) "
            f"| {durable:,.0f} ({durable / raw:.3f}x) |"
        )
    print(f"\nRSS per idle registered channel: {idle / 1024:.1f} KiB")
    if floors:
        print(f"\nSQL alone, 100,000 turns, {shapes[1][0]:,} channels (ratio to that shape's raw):")
        print("| schema | store | turns/s | ratio | µs/turn |")
        print("|---|---|---:|---:|---:|")
        for label, kind, rate, ratio in floors:
            print(f"| {label} | {kind} | {rate:,.0f} | {ratio:.3f}x | {1e6 / rate:.1f} |")


if __name__ == "__main__":
    main()
