"""The cluster loops of `skydeck.pg.cluster` on a real PostgreSQL, in one process, with a
recording stand-in for the registry: share (P13), lease lost and rejoin (P10), wake-ups
(P12, P19), fast failover (P16)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import psycopg
import pytest
import trio

from skydeck.model import AgentSpec, Inbound
from skydeck.pg.cluster import CHANNELS, Cluster, keep, share
from skydeck.pg.driver import Listener, Timeouts, conninfo
from skydeck.store import Fence
from skydeck.store.postgres import PostgresStore, open_postgres

if TYPE_CHECKING:
    from trio_typing import TaskStatus

TTL = 2.0


@dataclass
class Recorder:
    """The registry's side of `ChannelHost`, remembering what it was asked."""

    fences: dict[str, Fence] = field(default_factory=dict)
    woken: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    #: Channel -> the dead owner each adoption named (P15), None for a fresh claim.
    interrupted: dict[str, str | None] = field(default_factory=dict)
    defs: int = 0

    def owned(self) -> dict[str, Fence]:
        return dict(self.fences)

    async def adopt(self, channel: str, fence: Fence, interrupted_by: str | None = None) -> None:
        self.fences[channel] = fence
        self.interrupted[channel] = interrupted_by

    async def wake(self, channel: str) -> None:
        self.woken.append(channel)

    async def abandon(self, channels: Sequence[str], reason: str) -> None:
        for channel in channels:
            self.fences.pop(channel, None)
            self.abandoned.append(channel)

    def idle_movable(self, shared: bool) -> list[str]:
        return list(self.fences)

    def idle(self) -> list[str]:
        return list(self.fences)

    async def definitions_changed(self) -> None:
        self.defs += 1


@dataclass
class Host:
    cluster: Cluster
    recorder: Recorder
    #: Cancel it to stop the host's loops, as a crash would.
    scope: trio.CancelScope


class Start(Protocol):
    def __call__(self, host_id: str, *, listen: bool = True) -> Awaitable[Host]: ...


@pytest.fixture
async def start(pg_url: str) -> AsyncIterator[Start]:
    stores: list[PostgresStore] = []
    async with trio.open_nursery() as nursery:

        async def start_host(host_id: str, *, listen: bool = True) -> Host:
            store = await open_postgres(pg_url, host_id=host_id, ttl_s=TTL, readers=2)
            stores.append(store)
            listener = Listener(
                conninfo(pg_url, application_name="l", schema="skydeck", timeouts=Timeouts()),
                CHANNELS,
            )
            recorder = Recorder()
            cluster = Cluster(
                store, listener, recorder, scan_interval_s=0.2, listen=listen, rebalance_s=0.5
            )
            host = Host(cluster, recorder, trio.CancelScope())

            async def run(task_status: TaskStatus[None]) -> None:
                with host.scope:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(store.run_flusher)
                        await inner.start(host.cluster.run)
                        task_status.started()

            await nursery.start(run)
            return host

        yield start_host
        nursery.cancel_scope.cancel()
    for store in stores:
        store.close()


async def agents(store: PostgresStore, count: int) -> None:
    for n in range(count):
        name = f"a{n}"
        await store.create_agent(AgentSpec(name=name, channel=name, backend="echo"), Fence(name))


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


def test_share_rule() -> None:
    assert share(10, 3) == (4, 1)
    assert share(100, 3) == (34, 4)
    assert share(0, 2) == (0, 1)


def test_p13_a_host_keeps_share_plus_slack_unless_another_is_short() -> None:
    fair, slack = share(36, 4)  # 9, 1
    assert keep(fair, slack, [12, 12, 12, 0]) == 9  # a joiner: release down to share
    assert keep(fair, slack, [10, 10, 10, 6]) == 9  # P13's own rule would stop here
    assert keep(fair, slack, [10, 9, 9, 8]) == 10  # everyone within share - slack: hysteresis
    assert keep(fair, slack, []) == 10


async def test_two_hosts_split_channels_and_one_owner_each(start: Start, pg_url: str) -> None:
    h1, h2 = await start("h1"), await start("h2")
    c1, r1, c2, r2 = h1.cluster, h1.recorder, h2.cluster, h2.recorder
    await agents(c1.store, 10)
    await wait_for(lambda: len(r1.fences) + len(r2.fences) == 10)
    assert not set(r1.fences) & set(r2.fences)
    assert set(r1.interrupted.values()) | set(r2.interrupted.values()) == {None}  # fresh
    # Each took at most share + slack (5 + 1).
    assert max(len(r1.fences), len(r2.fences)) <= 6
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT name, owner FROM skydeck.leases WHERE name NOT LIKE 'role:%'"
        ).fetchall()
    assert {name: owner for name, owner in rows} == {
        **{channel: "h1" for channel in r1.fences},
        **{channel: "h2" for channel in r2.fences},
    }
    # The cluster's three roles, each held once.
    assert len(c1.roles) + len(c2.roles) == 3


async def test_p13_a_late_joiner_gets_its_share_by_rebalancing(start: Start) -> None:
    h1 = await start("h1")
    await agents(h1.cluster.store, 20)
    await wait_for(lambda: len(h1.recorder.fences) == 20)  # alone: everything
    h2 = await start("h2")
    # share 10, slack 1: h1 gives idle channels back until it holds 11, h2 takes them.
    await wait_for(lambda: len(h1.recorder.fences) <= 11 and len(h2.recorder.fences) >= 9)
    assert not set(h1.recorder.fences) & set(h2.recorder.fences)


async def test_a_post_to_the_non_owner_wakes_the_owner(start: Start) -> None:
    h1 = await start("h1")
    c1, r1 = h1.cluster, h1.recorder
    await agents(c1.store, 1)
    await wait_for(lambda: "a0" in r1.fences)
    c2 = (await start("h2")).cluster
    started = time.monotonic()
    accepted = await c2.store.accept_inbound(
        Inbound(channel="a0", content="x"), registered=True, buffer_cap=10
    )
    assert accepted.owner == "h1"
    await wait_for(lambda: "a0" in r1.woken, timeout=1.0)
    assert time.monotonic() - started < 0.5


async def test_p12_without_listen_a_scan_still_wakes_the_owner(start: Start) -> None:
    h1 = await start("h1", listen=False)
    await agents(h1.cluster.store, 1)
    await wait_for(lambda: "a0" in h1.recorder.fences)
    h2 = await start("h2", listen=False)
    await h2.cluster.store.accept_inbound(
        Inbound(channel="a0", content="x"), registered=True, buffer_cap=10
    )
    await wait_for(lambda: "a0" in h1.recorder.woken, timeout=0.2 + 0.3)  # one scan, + slack


async def test_an_expired_row_is_lease_lost_then_a_new_incarnation(
    start: Start, pg_url: str
) -> None:
    h1 = await start("h1")
    c1, r1 = h1.cluster, h1.recorder
    await agents(c1.store, 3)
    await wait_for(lambda: len(r1.fences) == 3)
    first = c1.ownership.incarnation
    before = {channel: fence.token for channel, fence in r1.fences.items()}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE skydeck.hosts SET expires_at = now()")
    await wait_for(lambda: c1.lost_count == 1 and len(r1.fences) == 3, timeout=TTL + 3)
    assert sorted(r1.abandoned) == ["a0", "a1", "a2"]
    assert c1.ownership.incarnation is not None and first is not None
    assert c1.ownership.incarnation > first
    assert all(r1.fences[channel].token > token for channel, token in before.items())


async def test_a_host_whose_sessions_vanish_is_failed_over_in_two_scans(
    start: Start, pg_url: str
) -> None:
    h1 = await start("h1")
    await agents(h1.cluster.store, 2)
    await wait_for(lambda: len(h1.recorder.fences) == 2)
    r2 = (await start("h2")).recorder
    # h1 "crashes": its loops stop and its sessions close, its row stays unexpired.
    h1.scope.cancel()
    h1.cluster.store.close()
    await h1.cluster.listener.close()
    started = time.monotonic()
    await wait_for(lambda: len(r2.fences) == 2, timeout=TTL + 2)
    assert time.monotonic() - started < TTL  # P16: before the row would have expired
    assert r2.interrupted == {"a0": "h1", "a1": "h1"}  # P15: the dead owner is named
