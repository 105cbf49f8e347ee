"""PT11 in process (P17, P23): cron on several hosts of one real PostgreSQL.

Three `PostgresStore`s act as hosts h0..h2, each with its own `Scheduler`
(an injected, skewed wall clock, corrected by the offset a heartbeat would
measure) run by `roles.Roles` while that host holds ``role:scheduler``.
Virtual time is Trio's `MockClock`, jumping only while no database call is
in flight (`gated_clock`), so a day of slots runs in seconds and no slot
is jumped over while a fire waits for its commit.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import trio
import trio.testing

from conftest import hold_autojump_while_threads_run
from skydeck.errors import StoreUnreachable
from skydeck.model import Accepted, Inbound, Job
from skydeck.pg import roles
from skydeck.scheduler import CorrectedClock, Scheduler, TrioWallClock, iso, next_slot
from skydeck.store import Fence
from skydeck.store.postgres import PostgresStore, build_postgres, open_postgres

if TYPE_CHECKING:
    from trio_typing import TaskStatus

#: Long enough that no heartbeat is needed while the test runs (real seconds).
TTL = 3600.0
CAP = 100_000
EPOCH = datetime(2026, 3, 2, 0, 0, 30, tzinfo=UTC)  # virtual t=0 is 00:00:30 UTC
DAY = 86_400.0
NOON = 12 * 3600.0  # 12:00:30, between two minute slots


@pytest.fixture
def gated_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Trio's autojump clock, except while a database call runs on a thread:
    a jump then would skip whatever falls due meanwhile."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    hold_autojump_while_threads_run(clock, monkeypatch)
    return clock


def sql(url: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = skydeck")
        cursor = conn.execute(statement.encode(), args or None)
        return cursor.fetchall() if cursor.description else []


@dataclass
class Fired:
    host: str
    job: str
    slot: str
    at: datetime  # the true (virtual) time of the fire


@dataclass
class Host:
    """One host: its store, scheduler and role tasks."""

    name: str
    store: PostgresStore
    scheduler: Scheduler
    roles: roles.Roles
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def claim(self) -> Fence | None:
        """What `Cluster._claim_roles` does: take the vacant roles, start their tasks."""
        claimed = await self.store.ownership.claim(3, roles=True)
        held = {c.lease.name: self.store.fence(c.lease.name, c.lease.token) for c in claimed}
        self.roles.held(held)
        return held.get(roles.SCHEDULER)

    async def serve(self, task_status: TaskStatus[None]) -> None:
        with self.scope:
            await self.roles.run(task_status=task_status)


class Intake:
    """Stores each fired message (as the registry does) and ends it at once,
    unless its job is a ``slow-`` one: those stay queued, so later slots skip."""

    def __init__(self, host: str, store: PostgresStore, url: str, fires: list[Fired]) -> None:
        self.host = host
        self.store = store
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("SET search_path = skydeck")
        self.fires = fires

    async def submit_slot(
        self, inbound: Inbound, fired: Callable[[Accepted], Job], fence: Fence | None = None
    ) -> tuple[Accepted, Job] | None:
        result = await self.store.fire_slot(
            inbound, registered=True, buffer_cap=CAP, fired=fired, fence=fence
        )
        if result is not None:
            accepted, job = result
            now = EPOCH + timedelta(seconds=trio.current_time())
            self.fires.append(Fired(self.host, job.name, str(job.last_slot), now))
            if not job.name.startswith("slow-"):
                self.conn.execute(
                    "UPDATE messages SET state = 'done' WHERE id = %s", (accepted.id,)
                )
        return result


@pytest.fixture
async def cluster(pg_url: str) -> AsyncIterator[Callable[[int, list[float]], Any]]:
    opened: list[Host] = []
    fires: list[Fired] = []

    async with trio.open_nursery() as nursery:

        async def start(count: int, skews: list[float]) -> tuple[list[Host], list[Fired]]:
            for i in range(count):
                name = f"h{i}"
                store = await open_postgres(pg_url, host_id=name, ttl_s=TTL, readers=1)
                skew = skews[i]
                # A host's wall clock is `skew` s off; its heartbeat measures -skew (P23).
                clock = CorrectedClock(
                    TrioWallClock(EPOCH + timedelta(seconds=skew)), partial(operator.neg, skew)
                )
                intake = Intake(name, store, pg_url, fires)
                scheduler = Scheduler(store, intake, clock, shared=True)

                async def schedule(fence: Fence, scheduler: Scheduler = scheduler) -> None:
                    await scheduler.run(fence=fence)

                host = Host(name, store, scheduler, roles.Roles({roles.SCHEDULER: schedule}))
                await nursery.start(host.serve)
                opened.append(host)
            return opened, fires

        yield start
        nursery.cancel_scope.cancel()
    for host in opened:
        host.store.close()


def expected_slots(job: Job, end: datetime) -> list[str]:
    slots, at = [], EPOCH
    while (at := next_slot(job, at)) <= end:
        slots.append(iso(at))
    return slots


def day_of_jobs() -> list[Job]:
    """100 jobs on 10 channels: 2 every minute, 8 every quarter hour, 90 at
    spread hours; one in ten leaves its message open, so its later slots skip."""
    jobs = []
    for i in range(100):
        if i < 2:
            schedule = "* * * * *"
        elif i < 10:
            schedule = f"{i}-59/15 * * * *"
        else:
            schedule = f"{i % 60} {i % 6}-23/6 * * *"
        prefix = "slow-" if i % 10 == 9 else "job-"
        jobs.append(Job(name=f"{prefix}{i}", channel=f"c{i % 10}", schedule=schedule, content="go"))
    return jobs


async def test_pt11_a_day_of_cron_on_three_hosts_fires_every_slot_once(
    pg_url: str, gated_clock: trio.testing.MockClock, cluster: Callable[..., Any]
) -> None:
    hosts, fires = await cluster(3, [0.0, 40.0, -25.0])
    jobs = day_of_jobs()
    for job in jobs:
        await hosts[0].store.save_job(job)
    started = time.monotonic()

    tokens: list[Fence | None] = [None] * 3

    async def claim(i: int) -> None:
        tokens[i] = await hosts[i].claim()

    async with trio.open_nursery() as nursery:  # all three at once: one wins (P9)
        for i in range(3):
            nursery.start_soon(claim, i)
    (first,) = [i for i in range(3) if tokens[i] is not None]

    await trio.sleep(NOON)
    hosts[first].scope.cancel()  # the holder dies at noon...
    sql(pg_url, "UPDATE hosts SET expires_at = now() WHERE host_id = %s", hosts[first].name)
    rivals = [i for i in range(3) if i != first]
    async with trio.open_nursery() as nursery:  # ...and the others claim at once
        for i in rivals:
            nursery.start_soon(claim, i)
    (second,) = [i for i in rivals if tokens[i] is not None]
    second_fence, first_fence = tokens[second], tokens[first]
    assert second_fence is not None and first_fence is not None
    assert second_fence.token > first_fence.token

    await trio.sleep(DAY - NOON)
    elapsed = time.monotonic() - started
    end = EPOCH + timedelta(seconds=DAY)

    rows = sql(pg_url, "SELECT job, slot, outcome, message_id FROM job_slots ORDER BY job, slot")
    by_job: dict[str, list[str]] = {}
    for job_name, slot, _, _ in rows:
        by_job.setdefault(job_name, []).append(slot)
    total = 0
    for job in jobs:  # every slot fired or skipped exactly once
        expected = expected_slots(job, end)
        assert by_job.get(job.name) == expected, job.name
        total += len(expected)
    skipped = [r for r in rows if r[2].startswith("skipped")]
    fired = [r for r in rows if not r[2].startswith("skipped")]
    assert len(skipped) > 0 and all(r[0].startswith("slow-") for r in skipped)
    assert all(r[3] is not None for r in fired)

    externals = sql(
        pg_url,
        "SELECT external_id, count(*) FROM messages WHERE external_id LIKE 'job:%%' "
        "GROUP BY external_id",
    )
    assert len(externals) == len(fired) and all(count == 1 for _, count in externals)
    assert {e for e, _ in externals} == {f"job:{job}:{slot}" for job, slot, _, _ in fired}

    # Only the holder fired: the first until noon, the second after; never early
    # or late on the true clock, whatever each host's skew (P23).
    assert len(fires) == len(fired)
    noon = EPOCH + timedelta(seconds=NOON)
    for fire in fires:
        assert fire.host == hosts[first if fire.at < noon else second].name
        assert timedelta(0) <= fire.at - datetime.fromisoformat(fire.slot) < timedelta(seconds=1)
    print(f"PT11 in process: {total} slots ({len(fired)} fired) in {elapsed:.1f} s")


async def test_p23_a_holder_that_lost_its_role_is_fenced_and_writes_nothing(
    pg_url: str,
    gated_clock: trio.testing.MockClock,
    cluster: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A paused holder that has not noticed (its heartbeat has not run): its
    next slot is `FencedOut` and its role task ends; the new holder fires."""
    hosts, fires = await cluster(2, [0.0, 0.0])
    await hosts[0].store.save_job(Job(name="j", channel="c", schedule="* * * * *", content="go"))
    assert await hosts[0].claim() is not None
    await trio.sleep(120)  # 00:01 and 00:02 fire on h0
    sql(pg_url, "UPDATE hosts SET expires_at = now() WHERE host_id = 'h0'")
    assert await hosts[1].claim() is not None
    with caplog.at_level(logging.WARNING):
        await trio.sleep(180)  # 00:03..00:05: h0 still runs its scheduler, fenced
    assert [(f.host, f.slot) for f in fires] == [
        ("h0", "2026-03-02T00:01:00Z"),
        ("h0", "2026-03-02T00:02:00Z"),
        ("h1", "2026-03-02T00:03:00Z"),
        ("h1", "2026-03-02T00:04:00Z"),
        ("h1", "2026-03-02T00:05:00Z"),
    ]
    assert any(r.getMessage() == "role fenced" for r in caplog.records)
    assert any(r.getMessage() == "write fenced" for r in caplog.records)
    slots = sql(pg_url, "SELECT slot FROM job_slots ORDER BY slot")
    assert [s for (s,) in slots] == [f.slot for f in fires]


async def test_p23_the_scheduler_clock_is_the_database_clock(pg_url: str) -> None:
    """A host whose wall clock is an hour fast measures the offset at its
    heartbeat, and its scheduler's clock reads the database's time."""
    store = build_postgres(pg_url, host_id="fast", ttl_s=10, readers=1)
    store.ownership.wall = lambda: time.time() + 3600
    await store.open()
    try:
        assert await store.ownership.heartbeat()
        offset = store.ownership.clock_offset_s
        assert -3601 < offset < -3599

        class FastClock:
            def now(self) -> datetime:
                return datetime.fromtimestamp(store.ownership.wall(), UTC)

        clock = CorrectedClock(FastClock(), lambda: store.ownership.clock_offset_s)
        ((db_now,),) = sql(pg_url, "SELECT now()")
        assert abs((clock.now() - db_now).total_seconds()) < 1
    finally:
        store.close()


async def test_p17_role_tasks_follow_the_roles_held(autojump_clock: trio.abc.Clock) -> None:
    """`Roles.held`: a role gained starts its task under the role's fence, one
    lost (or held under a new token) is cancelled; a task the store failed
    starts again while the role is held."""
    calls: list[tuple[int, str]] = []

    async def task(fence: Fence) -> None:
        calls.append((fence.token, "start"))
        if len(calls) == 1:
            raise StoreUnreachable("connection refused")
        try:
            await trio.sleep_forever()
        finally:
            calls.append((fence.token, "stop"))

    runner = roles.Roles({roles.SCHEDULER: task})
    first, second = Fence(roles.SCHEDULER, 5, "h1", 1), Fence(roles.SCHEDULER, 9, "h1", 2)
    async with trio.open_nursery() as nursery:
        runner.held({roles.SCHEDULER: first})  # before it runs: started when it does
        await nursery.start(runner.run)
        await trio.sleep(roles.RETRY_S + 0.5)
        assert calls == [(5, "start"), (5, "start")]
        runner.held({roles.SCHEDULER: first, roles.VAULT_SYNC: first})  # no task: nothing
        await trio.sleep(1)
        runner.held({roles.SCHEDULER: second})  # lost and taken again: a new task
        await trio.sleep(1)
        runner.held({})
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # Nothing waits for a cancelled task, so the new one may start first.
    assert calls[:2] == [(5, "start"), (5, "start")]
    assert sorted(calls[2:4]) == [(5, "stop"), (9, "start")]
    assert calls[4:] == [(9, "stop")]
