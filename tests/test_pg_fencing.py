"""PT12: fencing, deterministic (P8-P11, P15), and the PostgreSQL store's own rules
(P18 accept vs registration, P21 dedup, P22 definitions, P23 slots) in one process:
two `PostgresStore`s act as hosts h1 and h2 on one real database."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import psycopg
import pytest
import trio

from skydeck.errors import Conflict, FencedOut
from skydeck.ledger import MessageState, ThreadStatus
from skydeck.model import Accepted, AgentSpec, Inbound, Job, Message, ThreadRecord, new_id
from skydeck.pg.ownership import Claimed
from skydeck.store import Fence
from skydeck.store.postgres import PostgresStore, open_postgres

TTL = 3.0
CAP = 1000
Opener = Callable[[str], Awaitable[PostgresStore]]


def sql(url: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = skydeck")
        cursor = conn.execute(statement.encode(), args or None)
        return cursor.fetchall() if cursor.description else []


def snapshot(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row a turn can write, to compare byte for byte."""
    return {
        table: sql(url, f"SELECT * FROM {table} ORDER BY 1")
        for table in ("messages", "threads", "sessions", "outbox")
    }


@pytest.fixture
async def hosts(pg_url: str) -> AsyncIterator[Opener]:
    opened: list[PostgresStore] = []

    async def open_host(host_id: str) -> PostgresStore:
        store = await open_postgres(pg_url, host_id=host_id, ttl_s=TTL, readers=2)
        opened.append(store)
        return store

    async with trio.open_nursery() as nursery:
        yield open_host
        nursery.cancel_scope.cancel()
    for store in opened:
        store.close()


def fence_of(store: PostgresStore, claimed: list[Claimed], channel: str) -> Fence:
    (lease,) = [c.lease for c in claimed if c.lease.name == channel]
    return store.fence(lease.name, lease.token)


def record(channel: str, message: Message) -> ThreadRecord:
    return ThreadRecord(
        id=new_id(),
        channel=channel,
        agent="a",
        mode="multi-threaded",
        status=ThreadStatus.WORKING,
        input=message.content,
        message_id=message.id,
    )


async def test_pt12_a_stale_owner_is_fenced_and_the_new_owner_replays(
    pg_url: str, hosts: Opener
) -> None:
    h1, h2 = await hosts("h1"), await hosts("h2")
    await h1.create_agent(AgentSpec(name="a", channel="c", backend="echo"), Fence("c"))
    accepted = await h2.accept_inbound(
        Inbound(channel="c", content="hi"), registered=True, buffer_cap=CAP
    )
    assert (accepted.state, accepted.owner) == (MessageState.QUEUED, None)
    old = fence_of(h1, await h1.ownership.claim(10), "c")
    (queued,) = await h1.claim_open("c", old)
    thread = record("c", queued)
    started = await h1.start_turn([queued], thread, old)
    assert started[0].attempts == 1

    sql(pg_url, "UPDATE hosts SET expires_at = now() WHERE host_id = 'h1'")  # h1 "paused"
    claimed = await h2.ownership.claim(10)
    new = fence_of(h2, claimed, "c")
    assert new.token > old.token
    assert claimed[0].reason == "orphan"
    before = snapshot(pg_url)
    with pytest.raises(FencedOut):
        await h1.end_turn(
            started,
            thread,
            old,
            state=MessageState.DONE,
            reply="late",
            error=None,
            persist_session=False,
        )
    with pytest.raises(FencedOut):
        await h1.set_state(started, MessageState.CANCELLED, old, "x")
    with pytest.raises(FencedOut):
        await h1.rewrite_thread(thread, old)
    with pytest.raises(FencedOut):
        await h1.end_thread(thread, ThreadStatus.ERROR, "x", old)
    with pytest.raises(FencedOut):
        await h1.set_remote_id(started[0], "remote", old)
    with pytest.raises(FencedOut):
        await h1.claim_open("c", old)
    with pytest.raises(FencedOut):  # a deferred reply or callback of the stale turn
        await h1.outbox_add("reply", {"message_id": started[0].id}, old)
    assert snapshot(pg_url) == before

    # P15: the orphaned record ended at the claim; the replay counts a second attempt.
    (orphan,) = await h2.list_threads("c")
    assert orphan.status is ThreadStatus.ERROR
    assert orphan.output.startswith("interrupted: host h1 (incarnation ")
    (replayed,) = await h2.claim_open("c", new)
    assert (replayed.state, replayed.attempts) == (MessageState.WORKING, 1)
    thread2 = record("c", replayed)
    again = await h2.start_turn([replayed], thread2, new)
    assert again[0].attempts == 2
    settled, reply, ended = await h2.end_turn(
        again, thread2, new, state=MessageState.DONE, reply="ok", error=None, persist_session=False
    )
    assert reply is not None and reply.content == "ok"
    assert settled[0].reply_id == reply.id
    assert ended.ended_at is not None
    stored = await h1.get_message(queued.id)
    assert stored is not None and (stored.state, stored.attempts) == (MessageState.DONE, 2)
    assert sql(pg_url, "SELECT host, fence FROM threads WHERE id = %s", thread2.id) == [
        ("h2", new.token)
    ]


async def test_pt12_a_claim_skips_a_channel_under_an_uncommitted_fenced_write(
    pg_url: str, hosts: Opener
) -> None:
    h1, h2 = await hosts("h1"), await hosts("h2")
    await h1.create_agent(AgentSpec(name="a", channel="c", backend="echo"), Fence("c"))
    accepted = await h1.accept_inbound(
        Inbound(channel="c", content="hi"), registered=True, buffer_cap=CAP
    )
    old = fence_of(h1, await h1.ownership.claim(10), "c")
    assert h1.ownership.incarnation is not None
    with psycopg.connect(pg_url) as writer:  # h1's write, sent and not committed yet
        writer.execute("SET search_path = skydeck")
        changed = writer.execute(
            "WITH f AS (SELECT l.token FROM leases l JOIN hosts h "
            "ON (h.host_id, h.incarnation) = (l.owner, l.incarnation) "
            "WHERE l.name = 'c' AND l.owner = 'h1' AND l.incarnation = %s AND l.token = %s "
            "AND h.expires_at > now() FOR SHARE OF l) "
            "UPDATE messages SET state = 'working', attempts = attempts + 1 "
            "WHERE id = %s AND EXISTS (SELECT 1 FROM f)",
            (h1.ownership.incarnation, old.token, accepted.id),
        ).rowcount
        assert changed == 1
        sql(pg_url, "UPDATE hosts SET expires_at = now() WHERE host_id = 'h1'")
        started = time.monotonic()
        assert await h2.ownership.claim(10) == []  # skipped, not waited for
        assert time.monotonic() - started < 0.05 + 0.05  # 50 ms, plus a thread hop's slack
        writer.commit()
    new = fence_of(h2, await h2.ownership.claim(10), "c")
    (replayed,) = await h2.claim_open("c", new)
    assert (replayed.state, replayed.attempts) == (MessageState.WORKING, 1)  # h1's write


async def test_a_past_deadline_fences_before_sending(pg_url: str, hosts: Opener) -> None:
    h1 = await hosts("h1")
    await h1.create_agent(AgentSpec(name="a", channel="c", backend="echo"), Fence("c"))
    fence = fence_of(h1, await h1.ownership.claim(10), "c")
    fenced: list[int] = []
    h1.on_fenced = lambda: fenced.append(1)
    h1.ownership.clock = lambda: time.monotonic() + TTL  # the process was paused past it
    with pytest.raises(FencedOut):
        await h1.claim_open("c", fence)
    assert fenced == [1]


async def test_p21_dedup_across_hosts_one_row_same_id(pg_url: str, hosts: Opener) -> None:
    stores = [await hosts(f"h{i}") for i in range(3)]
    await stores[0].create_agent(AgentSpec(name="a", channel="c", backend="echo"), Fence("c"))
    for n in range(50):
        answers: list[tuple[str, str]] = []

        async def post(store: PostgresStore, n: int, into: list[tuple[str, str]]) -> None:
            got = await store.accept_inbound(
                Inbound(channel="c", content="x", external_id=f"e{n}"),
                registered=True,
                buffer_cap=CAP,
            )
            into.append((str(got.state), got.id))

        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(post, store, n, answers)
        assert sorted(state for state, _ in answers) == ["duplicate", "duplicate", "queued"]
        assert len({message_id for _, message_id in answers}) == 1
    assert sql(pg_url, "SELECT count(*) FROM messages") == [(50,)]


async def test_p18_p22_registration_replays_buffered_and_creates_conflict(
    pg_url: str, hosts: Opener
) -> None:
    h1, h2 = await hosts("h1"), await hosts("h2")
    first = await h2.accept_inbound(
        Inbound(channel="c", content="early"), registered=True, buffer_cap=CAP
    )
    assert first.state is MessageState.BUFFERED
    version = await h1.defs_version()
    results: list[str] = []

    async def create(store: PostgresStore) -> None:
        try:
            await store.create_agent(AgentSpec(name="a", channel="c", backend="echo"), Fence("c"))
            results.append("created")
        except Conflict as exc:
            results.append(f"409 {exc.field}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create, h1)
        nursery.start_soon(create, h2)
    assert sorted(results) == ["409 name", "created"]
    assert await h2.defs_version() == version + 1
    stored = await h1.get_message(first.id)
    assert stored is not None and stored.state is MessageState.QUEUED
    later = await h2.accept_inbound(
        Inbound(channel="c", content="later"), registered=True, buffer_cap=CAP
    )
    assert later.state is MessageState.QUEUED
    assert await h1.delete_agent("a")
    states = sql(pg_url, "SELECT state FROM messages ORDER BY seq")
    assert states == [("buffered",), ("buffered",)]


async def test_p23_a_slot_fires_once_across_schedulers(pg_url: str, hosts: Opener) -> None:
    h1, h2 = await hosts("h1"), await hosts("h2")
    await h1.create_agent(AgentSpec(name="a", channel="c", backend="echo"), Fence("c"))
    job = Job(name="j", channel="c", schedule="* * * * *", content="tick")
    await h1.save_job(job)
    inbound = Inbound(channel="c", content="tick", external_id="job:j:s1")

    def fired(accepted: Accepted) -> Job:
        return replace(job, last_slot="s1", last_outcome="fired", last_message_id=accepted.id)

    first = await h1.fire_slot(inbound, registered=True, buffer_cap=CAP, fired=fired)
    assert first is not None and first[0].state == "queued"
    # A second scheduler (a paused former holder resuming) finds the slot taken.
    assert await h2.fire_slot(inbound, registered=True, buffer_cap=CAP, fired=fired) is None
    assert sql(pg_url, "SELECT job, slot, outcome, message_id FROM job_slots") == [
        ("j", "s1", "fired", first[0].id)
    ]
    assert len(sql(pg_url, "SELECT id FROM messages")) == 1
    (stored,) = await h2.list_jobs()
    assert (stored.last_slot, stored.last_message_id) == ("s1", first[0].id)


async def test_p17_a_former_outbox_deliverer_is_fenced(pg_url: str, hosts: Opener) -> None:
    """The outbox's deliveries are fenced by `role:vault-outbox`: once another host
    holds the role, the former holder's done/failed change nothing."""
    h1, h2 = await hosts("h1"), await hosts("h2")
    role = "role:vault-outbox"
    (first,) = [c for c in await h1.ownership.claim(3, roles=True) if c.lease.name == role]
    old = h1.fence(role, first.lease.token)
    seq = await h1.outbox_add("reply", {"message_id": "m"}, None)
    await h1.outbox_failed(seq, "503", old)  # the holder's writes land
    sql(pg_url, "UPDATE hosts SET expires_at = now() WHERE host_id = 'h1'")
    (taken,) = [c for c in await h2.ownership.claim(3, roles=True) if c.lease.name == role]
    before = snapshot(pg_url)
    with pytest.raises(FencedOut):
        await h1.outbox_done(seq, old)
    with pytest.raises(FencedOut):
        await h1.outbox_failed(seq, "again", old)
    assert snapshot(pg_url) == before
    await h2.outbox_done(seq, h2.fence(role, taken.lease.token))
    assert sql(pg_url, "SELECT count(*) FROM outbox") == [(0,)]
