"""The scheduler with 10,000 jobs: it sleeps until the next due slot.

1. Simulated day (Trio's MockClock, autojump): 10,000 daily jobs spread over the
   day, plus 10 every-minute jobs. Reports fires, wake-ups, simulated seconds
   per real second, and fires per real second (the cost of firing).
2. Idle, real time: 10,000 jobs none of which is due for months; the scheduler
   runs for a few real seconds. Reports wake-ups per real second and the CPU
   time it used (a ticking scheduler would wake every second or more).

    python bench/scheduler.py [--jobs 10000] [--idle-seconds 5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import trio
import trio.testing

from skydeck.ledger import MessageState
from skydeck.model import Accepted, Inbound, Job
from skydeck.scheduler import Scheduler, TrioWallClock
from skydeck.store import Fence, Store
from skydeck.store.sqlite import SQLiteStore


class InstantIntake:
    """Stores each fired message and ends it at once, as a fast agent would."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fired = 0

    async def submit_slot(
        self, inbound: Inbound, fired: Callable[[Accepted], Job], fence: Fence | None = None
    ) -> tuple[Accepted, Job] | None:
        result = await self.store.fire_slot(
            inbound, registered=True, buffer_cap=1000, fired=fired, fence=fence
        )
        assert result is not None  # one scheduler: no slot is taken by another
        accepted, job = result
        fence = Fence.local(inbound.channel)
        working = await self.store.set_state([accepted.message], MessageState.WORKING, fence)
        await self.store.set_state(working, MessageState.DONE, fence)
        self.fired += 1
        return accepted, job


async def make_jobs(scheduler: Scheduler, jobs: int, schedule: str | None) -> None:
    rng = random.Random(7)
    for i in range(jobs):
        cron = schedule or f"{rng.randrange(60)} {rng.randrange(24)} * * *"
        await scheduler.create(
            Job(name=f"job{i}", channel=f"ch{i % 1000}", schedule=cron, content="x")
        )


async def simulated_day(jobs: int) -> None:
    store = SQLiteStore(":memory:")
    intake = InstantIntake(store)
    scheduler = Scheduler(store, intake, TrioWallClock(datetime(2026, 1, 1, tzinfo=UTC)))
    await make_jobs(scheduler, jobs, None)
    for i in range(10):
        await scheduler.create(
            Job(name=f"minutely{i}", channel="m", schedule="* * * * *", content="x")
        )
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await trio.sleep(86_400 + 1)  # every slot in (00:00, 24:00], both ends fired
        nursery.cancel_scope.cancel()
    real = time.perf_counter() - start
    print(f"simulated day, {jobs:,} daily jobs + 10 every-minute jobs:")
    print(f"  fires {intake.fired:,} (expected {jobs + 14_400:,}), wake-ups {scheduler.wakeups:,}")
    print(
        f"  {86_400 / real:,.0f} simulated seconds per real second; "
        f"{intake.fired / real:,.0f} fires per real second "
        f"({intake.fired / 86_400:.3f} per simulated second)"
    )


async def idle(jobs: int, seconds: float) -> None:
    store = SQLiteStore(":memory:")
    scheduler = Scheduler(store, InstantIntake(store))
    await make_jobs(scheduler, jobs, "0 0 29 2 *")  # next due on a leap day
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        cpu, wall = time.process_time(), time.perf_counter()
        before = scheduler.wakeups
        await trio.sleep(seconds)
        used, elapsed = time.process_time() - cpu, time.perf_counter() - wall
        wakeups = scheduler.wakeups - before
        nursery.cancel_scope.cancel()
    print(f"idle, {jobs:,} jobs none due, {seconds:g} real seconds:")
    print(
        f"  {wakeups / elapsed:.2f} wake-ups per real second, CPU {used * 1000:.1f} ms "
        f"({used / elapsed * 100:.3f} % of one core)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()
    trio.run(simulated_day, args.jobs, clock=trio.testing.MockClock(autojump_threshold=0))
    trio.run(idle, args.jobs, args.idle_seconds)


if __name__ == "__main__":
    main()
