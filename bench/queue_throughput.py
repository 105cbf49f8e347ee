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

    python bench/queue_throughput.py            # full run (about a minute)
    python bench/queue_throughput.py --quick    # smaller shapes, for a smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
import tempfile
import time
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
from skydeck.store.sqlite import SQLiteStore

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


def measure(label: str, run: Callable[..., Awaitable[float]], *args: object) -> float:
    rate: float = trio.run(run, *args)
    print(f"  {label:<8} {rate:>10,.0f} turns/s", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
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


if __name__ == "__main__":
    main()
