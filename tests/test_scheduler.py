"""Cron jobs under the autojump clock: a simulated day runs in milliseconds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from helpers import OpenStore, ScriptBackend, agent, running_registry
from skydeck.model import Job, Message
from skydeck.registry import Registry
from skydeck.scheduler import Scheduler, TrioWallClock
from skydeck.store import Fence, Store
from skydeck.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

EPOCH = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)  # virtual t=0 is 00:00:30 UTC
DAY = 86_400


@asynccontextmanager
async def scheduler_on(
    store: Store, registry: Registry, epoch: datetime = EPOCH
) -> AsyncIterator[Scheduler]:
    """A scheduler instance (one daemon lifetime) for the block."""
    scheduler = Scheduler(store, registry, TrioWallClock(epoch))
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        yield scheduler
        nursery.cancel_scope.cancel()


def starting_at(wall: datetime) -> datetime:
    """The epoch that makes the wall clock read ``wall`` now."""
    return wall - timedelta(seconds=trio.current_time())


async def job_messages(store: Store, channel: str) -> list[Message]:
    out: list[Message] = []
    cursor = None
    while True:
        page = await store.list_messages(channel, limit=500, after=cursor)
        out += [m for m in page.messages if m.direction == "in" and "job" in m.metadata]
        if page.next is None:
            return out
        cursor = page.next


async def test_every_minute_for_a_day_fires_1440_times_without_busy_ticking(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with (
        running_registry(store, agents=[agent("tick")]) as registry,
        scheduler_on(store, registry) as scheduler,
    ):
        await scheduler.create(
            Job(name="every", channel="tick", schedule="* * * * *", content="go")
        )
        await trio.sleep(DAY)
        wakeups = scheduler.wakeups
    fired = await job_messages(store, "tick")
    slots = [m.metadata["slot"] for m in fired]
    assert len(fired) == 1440
    assert len(set(slots)) == 1440, "no slot twice"
    assert slots[0] == "2026-01-01T00:01:00Z" and slots[-1] == "2026-01-02T00:00:00Z"
    assert wakeups <= 1440 + 3, "it sleeps until the next slot instead of ticking"


async def test_restart_mid_day_fires_the_latest_missed_slot_once_and_never_doubles(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("tick")]) as registry:
        async with scheduler_on(store, registry) as first:
            await first.create(
                Job(name="every", channel="tick", schedule="* * * * *", content="go")
            )
            await trio.sleep(10 * 3600 + 10)  # stop 10 s after the 10:00:30 slot... (-30 s epoch)
        before = len(await job_messages(store, "tick"))
        async with scheduler_on(store, registry):  # restart 5 s later: same slot, no refire
            await trio.sleep(1)
        assert len(await job_messages(store, "tick")) == before, (
            "the current slot is not fired twice"
        )
        await trio.sleep(3 * 3600)  # down for three hours: 180 slots missed
        async with scheduler_on(store, registry):
            await trio.sleep(1)
            after_restart = await job_messages(store, "tick")
            await trio.sleep(120)
        final = await job_messages(store, "tick")
    assert len(after_restart) == before + 1, "the missed slots fire once, not as a burst"
    assert after_restart[-1].metadata["slot"] == "2026-01-01T13:00:00Z", "the latest missed slot"
    assert len(final) == before + 3
    assert len({m.metadata["slot"] for m in final}) == len(final)


async def test_overlapping_run_skips_the_slot(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with (
        running_registry(store, agents=[agent("slow")]) as registry,
        scheduler_on(store, registry) as scheduler,
    ):
        await scheduler.create(
            Job(name="long", channel="slow", schedule="* * * * *", content="sleep:150 work")
        )
        await trio.sleep(10 * 60)
        job = await scheduler.get("long")
    fired = await job_messages(store, "slow")
    assert job.skipped >= 5 and len(fired) + job.skipped == 10
    open_at_once = [m for m in fired if m.state in ("queued", "working", "buffered")]
    assert len(open_at_once) <= 1, "no pile-up"


async def test_dst_days_in_new_york_follow_croniter(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    """Spring forward: 02:30 does not exist on 2026-03-08; croniter moves it to 03:00
    (no day is skipped). Fall back: 01:30 happens twice on 2026-11-01 (EDT, then EST)
    and croniter yields both, an hour apart; skydeck fires exactly what croniter yields."""
    store = await open_store()
    async with running_registry(store, agents=[agent("ny")]) as registry:
        spring = starting_at(datetime(2026, 3, 7, 12, 0, tzinfo=UTC))
        async with scheduler_on(store, registry, spring) as scheduler:
            await scheduler.create(
                Job(
                    name="spring",
                    channel="ny",
                    schedule="30 2 * * *",
                    content="s",
                    timezone="America/New_York",
                )
            )
            await trio.sleep(3 * DAY)
            await scheduler.remove("spring")
        async with scheduler_on(
            store, registry, starting_at(datetime(2026, 10, 31, 0, 0, tzinfo=UTC))
        ) as scheduler:
            await scheduler.create(
                Job(
                    name="fall",
                    channel="ny",
                    schedule="30 1 * * *",
                    content="f",
                    timezone="America/New_York",
                )
            )
            await trio.sleep(3 * DAY)
    slots = [(m.metadata["job"], m.metadata["slot"]) for m in await job_messages(store, "ny")]
    assert slots == [
        ("spring", "2026-03-08T07:00:00Z"),  # 03:00 EDT: the nonexistent 02:30 moved on
        ("spring", "2026-03-09T06:30:00Z"),
        ("spring", "2026-03-10T06:30:00Z"),
        ("fall", "2026-10-31T05:30:00Z"),
        ("fall", "2026-11-01T05:30:00Z"),  # 01:30 EDT
        ("fall", "2026-11-01T06:30:00Z"),  # 01:30 EST, the repeated hour (croniter's choice)
        ("fall", "2026-11-02T06:30:00Z"),
    ]


async def test_editing_the_schedule_moves_next_run_at_at_once(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with (
        running_registry(store, agents=[agent("e")]) as registry,
        scheduler_on(store, registry) as scheduler,
    ):
        job = await scheduler.create(Job(name="j", channel="e", schedule="0 12 * * *", content="x"))
        assert job.next_run_at == "2026-01-01T12:00:00Z"
        moved = await scheduler.update("j", {"schedule": "*/5 * * * *"})
        assert moved.next_run_at == "2026-01-01T00:05:00Z"
        await trio.sleep(5 * 60)
        assert [m.metadata["slot"] for m in await job_messages(store, "e")] == [
            "2026-01-01T00:05:00Z"
        ]
        off = await scheduler.update("j", {"enabled": False})
        assert off.next_run_at is None
        await trio.sleep(3600)
    assert len(await job_messages(store, "e")) == 1, "a disabled job does not fire"


async def test_deleting_a_job_stops_it(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with (
        running_registry(store, agents=[agent("d")]) as registry,
        scheduler_on(store, registry) as scheduler,
    ):
        await scheduler.create(Job(name="j", channel="d", schedule="* * * * *", content="x"))
        await trio.sleep(3 * 60)
        await scheduler.remove("j")
        await trio.sleep(3600)
    assert len(await job_messages(store, "d")) == 3
    assert await store.list_jobs() == []


async def test_r7_a_job_for_a_channel_without_agent_buffers(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with (
        running_registry(store, backend) as registry,
        scheduler_on(store, registry) as scheduler,
    ):
        await scheduler.create(Job(name="j", channel="later", schedule="* * * * *", content="x"))
        await trio.sleep(60)  # the 00:01 slot fired at t=30
        (first,) = await job_messages(store, "later")
        assert first.state == "buffered"
        assert (await scheduler.get("j")).last_outcome == "buffered"
        await trio.sleep(60)  # 00:02 is skipped
        assert (await scheduler.get("j")).skipped == 1, "the buffered run is still open"
        await registry.create(agent("late", "later"))  # replays it
        await trio.sleep(60)  # 00:03 fires again
    assert backend.prompts("later") == ["x", "x"]


async def test_run_now_posts_at_once_and_counts_as_the_previous_run(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with (
        running_registry(store, agents=[agent("r")]) as registry,
        scheduler_on(store, registry) as scheduler,
    ):
        await scheduler.create(Job(name="j", channel="r", schedule="0 0 1 1 *", content="x"))
        accepted = await scheduler.run_now("j")
        assert accepted.state == "queued"
        assert accepted.message.metadata["job"] == "j"
        await trio.sleep(1)
        assert (await scheduler.get("j")).last_outcome == "done"


async def test_a_former_tenure_unwinding_late_keeps_its_successors_fence(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """P23 on one scheduler object: the role was lost and taken again while the old
    task had not finished unwinding; when it does, the new tenure's fence stays."""
    store = SQLiteStore(tmp_path / "skydeck.db")
    old, new = Fence("role:scheduler", 1), Fence("role:scheduler", 2)
    async with running_registry(store) as registry, trio.open_nursery() as nursery:
        scheduler = Scheduler(store, registry, TrioWallClock(EPOCH))
        first = trio.CancelScope()

        async def first_tenure(task_status: TaskStatus[None]) -> None:
            with first:
                await scheduler.run(fence=old, task_status=task_status)

        await nursery.start(first_tenure)
        await nursery.start(partial(scheduler.run, fence=new))
        first.cancel()  # the old task unwinds only now
        await trio.sleep(1)
        assert scheduler.fence is new
        nursery.cancel_scope.cancel()
    store.close()
