"""PT14: one contract, two stores (multi-host.md §7). Every test here runs on the
embedded SQLite store and on the PostgreSQL one with the same assertions: what
the daemon may rely on from any `Store`, `Ownership` and `Notifier`, whichever
engine keeps it (SQLite's ownership and signals are `store.local`'s)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from skydeck.ledger import MessageState, ThreadStatus
from skydeck.model import (
    Accepted,
    AgentSpec,
    EventKind,
    Inbound,
    Job,
    ProcessRecord,
    ThreadRecord,
    TurnEvent,
    new_id,
)
from skydeck.pg.notifier import PgNotifier
from skydeck.store import Fence, Notifier, NotJoined, Ownership, Signal, Store
from skydeck.store.local import LocalNotifier, LocalOwnership
from skydeck.store.postgres import PostgresStore, open_postgres
from skydeck.store.sqlite import SQLiteStore

CAP = 100


@dataclass
class Under:
    """A store under test, its host's ownership and signals, and how a
    channel's owner gets its fence there."""

    kind: str
    store: Store
    ownership: Ownership
    notifier: Notifier
    fence_for: Callable[[str], Awaitable[Fence]]


@pytest.fixture(params=["sqlite", "postgres"])
async def under(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Under]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "skydeck.db")
        notifier = LocalNotifier()
        ownership = LocalOwnership(sqlite, notifier=notifier)
        await ownership.join()

        async def local(channel: str) -> Fence:
            return Fence.local(channel)

        yield Under("sqlite", sqlite, ownership, notifier, local)
        sqlite.close()
        return
    url = request.getfixturevalue("pg_url")
    pg: PostgresStore = await open_postgres(url, host_id="h1", ttl_s=10, readers=2)

    async def claimed(channel: str) -> Fence:
        role = channel.startswith("role:")
        wanted = None if role else [channel]
        for item in await pg.ownership.claim(10, wanted, roles=role):
            if item.lease.name == channel:
                return pg.fence(item.lease.name, item.lease.token)
        raise AssertionError(f"{channel} could not be claimed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pg.run_flusher)
        yield Under("postgres", pg, pg.ownership, PgNotifier.for_store(pg), claimed)
        nursery.cancel_scope.cancel()
    pg.close()


async def agent(under: Under, name: str = "a", mode: str = "multi-threaded") -> Fence:
    spec = AgentSpec(name=name, channel=name, backend="echo", mode=mode)  # type: ignore[arg-type]
    await under.store.create_agent(spec, Fence.local(name))
    return await under.fence_for(name)


def record(channel: str, message_id: str, mode: str = "multi-threaded") -> ThreadRecord:
    return ThreadRecord(
        id=new_id(),
        channel=channel,
        agent=channel,
        mode=mode,  # type: ignore[arg-type]
        status=ThreadStatus.WORKING,
        input="x",
        message_id=message_id,
    )


async def test_meta_and_agents(under: Under) -> None:
    store = under.store
    assert await store.get_meta("k") is None
    await store.set_meta("k", "v")
    assert await store.get_meta("k") == "v"
    await agent(under, "a")
    (stored,) = await store.list_agents()
    assert (stored.name, stored.channel) == ("a", "a")
    await store.save_agent(replace(stored, system_prompt="be brief"))
    (changed,) = await store.list_agents()
    assert changed.system_prompt == "be brief"
    assert await store.delete_agent("a")
    assert not await store.delete_agent("a")
    assert await store.list_agents() == []


async def test_accept_dedup_buffer_and_registration(under: Under) -> None:
    store = under.store
    early = await store.accept_inbound(
        Inbound(channel="a", content="early", external_id="e1"), registered=False, buffer_cap=CAP
    )
    assert early.state is MessageState.BUFFERED
    assert await store.count_buffered() == 1
    again = await store.accept_inbound(
        Inbound(channel="a", content="early", external_id="e1"), registered=False, buffer_cap=CAP
    )
    assert (again.state, again.id) == ("duplicate", early.id)  # R8
    fence = await agent(under, "a")
    stored = await store.get_message(early.id)
    assert stored is not None and stored.state is MessageState.QUEUED  # R7 replay
    later = await store.accept_inbound(
        Inbound(channel="a", content="later"), registered=True, buffer_cap=CAP
    )
    assert later.state is MessageState.QUEUED
    batch = await store.accept_batch(
        [(Inbound(channel="a", content=f"b{n}"), True) for n in range(3)], buffer_cap=CAP
    )
    assert [one.state for one in batch] == [MessageState.QUEUED] * 3
    opened = await store.claim_open("a", fence)
    assert [m.content for m in opened] == ["early", "later", "b0", "b1", "b2"]  # seq order
    assert await store.release_open("a", buffer_cap=CAP) == 5
    assert await store.count_buffered() == 5


async def test_a_turn_start_to_end(under: Under) -> None:
    store = under.store
    fence = await agent(under, "a")
    accepted = await store.accept_inbound(
        Inbound(channel="a", content="hi", metadata={"k": 1}), registered=True, buffer_cap=CAP
    )
    thread = record("a", accepted.id)
    (started,) = await store.start_turn([accepted.message], thread, fence)
    assert (started.state, started.attempts, started.thread_id) == (
        MessageState.WORKING,
        1,
        thread.id,
    )
    ok = replace(thread, status=ThreadStatus.OK, output="echo: hi")
    (settled,), reply, ended = await store.end_turn(
        [started],
        ok,
        fence,
        state=MessageState.DONE,
        reply="echo: hi",
        error=None,
        persist_session=False,
    )
    assert reply is not None and (reply.direction, reply.in_reply_to) == ("out", accepted.id)
    assert settled.reply_id == reply.id and ended.turn_count == 1 and ended.ended_at
    stored = await store.get_message(accepted.id)
    assert stored is not None
    assert (stored.state, stored.reply_id, stored.metadata) == (
        MessageState.DONE,
        reply.id,
        {"k": 1},
    )
    (listed,) = await store.list_threads("a")
    assert (listed.id, listed.status, listed.output) == (thread.id, ThreadStatus.OK, "echo: hi")
    got = await store.get_thread(thread.id)
    assert got is not None and got.turn_count == 1
    assert [m.id for m in await store.answered_by(reply.id)] == [accepted.id]
    page = await store.list_messages("a", limit=1)
    assert [m.id for m in page.messages] == [accepted.id] and page.next and not page.prev
    rest = await store.list_messages("a", limit=10, after=page.next)
    assert [m.id for m in rest.messages] == [reply.id]
    tail = await store.list_messages("a", limit=1, tail=True)
    assert [m.id for m in tail.messages] == [reply.id] and tail.prev
    remote = await store.set_remote_id(reply, "note-1", fence)
    again = await store.get_message(reply.id)
    assert again is not None and again.metadata == remote.metadata == {"remote_id": "note-1"}
    await store.rewrite_thread(replace(ended, output="revised"), fence)
    revised = await store.get_thread(thread.id)
    assert revised is not None and (revised.output, revised.turn_count) == ("revised", 1)
    note = await store.add_outbound("a", "fyi", fence, metadata={"m": 1})
    assert note.state is MessageState.DONE and note.direction == "out"


async def test_a_cancelled_turn_and_state_moves(under: Under) -> None:
    store = under.store
    fence = await agent(under, "a")
    first = await store.accept_inbound(
        Inbound(channel="a", content="1"), registered=True, buffer_cap=CAP
    )
    thread = record("a", first.id)
    started = await store.start_turn([first.message], thread, fence)
    cancelled = await store.end_thread(thread, ThreadStatus.ERROR, "agent removed", fence)
    assert cancelled.status is ThreadStatus.ERROR and cancelled.ended_at
    (moved,) = await store.set_state(started, MessageState.CANCELLED, fence, "agent removed")
    stored = await store.get_message(first.id)
    assert stored is not None and (stored.state, stored.error) == (moved.state, "agent removed")
    # A restart's replay counts the attempt (R28): a working message starts again.
    second = await store.accept_inbound(
        Inbound(channel="a", content="2"), registered=True, buffer_cap=CAP
    )
    (working,) = await store.start_turn([second.message], record("a", second.id), fence)
    (replayed,) = await store.claim_open("a", fence)
    (again,) = await store.start_turn([replayed], record("a", second.id), fence)
    assert (working.attempts, again.attempts) == (1, 2)


async def test_single_threaded_session_and_conversation(under: Under) -> None:
    store = under.store
    fence = await agent(under, "s", mode="single-threaded")
    accepted = await store.accept_inbound(
        Inbound(channel="s", content="hi"), registered=True, buffer_cap=CAP
    )
    thread = record("s", accepted.id, mode="single-threaded")
    started = await store.start_turn([accepted.message], thread, fence)
    ended = replace(thread, status=ThreadStatus.OK, session="sess-1")
    await store.end_turn(
        started,
        ended,
        fence,
        state=MessageState.DONE,
        reply="r",
        error=None,
        persist_session=True,
    )
    assert await store.get_session("s") == "sess-1"
    conversation = await store.conversation("s")
    assert conversation is not None and conversation.id == thread.id
    await store.clear_session("s")
    assert await store.get_session("s") is None


async def test_jobs_and_a_fired_slot(under: Under) -> None:
    store = under.store
    await agent(under, "a")
    job = Job(name="j", channel="a", schedule="* * * * *", content="tick")
    await store.save_job(job)
    assert [j.name for j in await store.list_jobs()] == ["j"]

    def fired(accepted: Accepted) -> Job:
        return replace(job, last_slot="s1", last_outcome="fired", last_message_id=accepted.id)

    inbound = Inbound(channel="a", content="tick", external_id="job:j:s1")
    result = await store.fire_slot(inbound, registered=True, buffer_cap=CAP, fired=fired)
    assert result is not None
    accepted, after = result
    assert accepted.state is MessageState.QUEUED and after.last_message_id == accepted.id
    (stored,) = await store.list_jobs()
    assert stored.last_slot == "s1"
    assert await store.delete_job("j") and await store.list_jobs() == []


async def test_outbox_and_processes(under: Under) -> None:
    store = under.store
    seq = await store.outbox_add("reply", {"id": "m1"}, await agent(under))
    assert await store.outbox_count() == 1
    deliverer = await under.fence_for("role:vault-outbox")
    await store.outbox_failed(seq, "503", deliverer)
    assert await store.outbox_items() == [(seq, "reply", {"id": "m1"}, 1)]
    await store.outbox_done(seq, deliverer)
    assert await store.outbox_count() == 0
    proc = ProcessRecord(pid=42, start_time=7, boot_id="b", agent="a", channel="a")
    await store.add_process(proc)
    assert await store.list_processes() == [proc]
    await store.remove_process(proc)
    assert await store.list_processes() == []
    await store.add_process(proc)
    await store.clear_processes()
    assert await store.list_processes() == []


# -- Ownership ---------------------------------------------------------------------------


async def test_ownership_join_heartbeat_leave_and_hosts(under: Under) -> None:
    ownership = under.ownership
    joined = ownership.incarnation
    assert joined is not None
    assert await ownership.heartbeat()
    assert ownership.deadline() > time.monotonic()
    (me,) = await ownership.hosts()
    assert (me.id, me.incarnation, me.alive, me.owned) == (ownership.host_id, joined, True, 0)
    assert await ownership.expire_dead() == []  # nobody else, and this host is alive
    await ownership.leave()
    assert ownership.incarnation is None
    assert ownership.deadline() < time.monotonic()  # P10: no write as owner any more
    (gone,) = await ownership.hosts()
    assert not gone.alive
    with pytest.raises(NotJoined):
        await ownership.claim(1)
    with pytest.raises(NotJoined):
        await ownership.heartbeat()
    again = await ownership.join()
    assert again >= joined and ownership.incarnation == again
    (back,) = await ownership.hosts()
    assert (back.alive, back.incarnation) == (True, again)


async def test_ownership_claims_only_vacant_channels_with_agents(under: Under) -> None:
    ownership = under.ownership
    for name in ("a", "b"):
        spec = AgentSpec(name=name, channel=name, backend="echo")
        await under.store.create_agent(spec, Fence.local(name))
    assert await ownership.claim(0) == []
    assert await ownership.claim(10, ["nobody"]) == []  # no agent, no lease (P12)
    (first,) = await ownership.claim(10, ["a"])
    assert (first.lease.name, first.reason, first.previous_owner) == ("a", "unowned", None)
    assert await ownership.claim(10, ["a"]) == []  # a live owner's channel is never taken
    (other,) = await ownership.claim(10)
    assert other.lease.name == "b"
    assert [host.owned for host in await ownership.hosts()] == [2]
    assert await ownership.release(["a"]) == 1
    assert await ownership.release(["a"]) == 0
    assert [host.owned for host in await ownership.hosts()] == [1]
    (again,) = await ownership.claim(10, ["a"])
    assert (again.reason, again.previous_owner) == ("released", None)
    assert again.lease.token >= first.lease.token  # tokens never go back (P9)
    await ownership.leave()  # every lease goes with the incarnation (P14)
    await ownership.join()
    claimed = await ownership.claim(10)
    assert sorted((c.lease.name, c.reason) for c in claimed) == [
        ("a", "released"),
        ("b", "released"),
    ]


# -- Notifier -----------------------------------------------------------------------------


async def next_signal(signals: AsyncIterator[Signal]) -> Signal:
    with trio.fail_after(5):
        return await anext(signals)


async def test_notifier_wake_and_lease_signals(under: Under) -> None:
    notifier = under.notifier
    async with aclosing(notifier.listen()) as signals:
        assert await next_signal(signals) == Signal("lease")  # listening starts with a scan
        await notifier.wake("a")
        assert await next_signal(signals) == Signal("wake", "a")
        await under.ownership.release(["a"])  # held or not, the others are told (P9)
        assert await next_signal(signals) == Signal("lease", under.ownership.host_id)
        await notifier.wake("b")
        assert await next_signal(signals) == Signal("wake", "b")


async def test_notifier_relays_events_of_watched_channels_only(under: Under) -> None:
    notifier = under.notifier
    fence = await agent(under, "a")
    event = TurnEvent(kind=EventKind.TEXT, message_id="m1", data={"text": "hi"})
    async with aclosing(notifier.listen()) as signals:
        assert await next_signal(signals) == Signal("lease")
        await notifier.relay("a", event, fence)  # nobody watches yet: nothing goes out
        await notifier.watch("a")
        assert await next_signal(signals) == Signal("watch", "a")
        await notifier.relay("a", event, fence)
        assert await next_signal(signals) == Signal("event", "a", event, fence.token)
        big = TurnEvent(kind=EventKind.TEXT, message_id="m1", data={"text": "x" * 20_000})
        await notifier.relay("a", big, fence)  # whole, past NOTIFY's 8,000 bytes (spilled)
        assert await next_signal(signals) == Signal("event", "a", big, fence.token)
        await notifier.relay("b", event, Fence.local("b"))  # unwatched (P25)
        await notifier.wake("z")
        assert await next_signal(signals) == Signal("wake", "z")


async def test_pg_a_definition_change_is_a_defs_signal(pg_url: str) -> None:
    """Where definitions are shared, a change reaches the other hosts' listeners
    (P22); on one host the registry makes every change itself, so SQLite has none."""
    pg = await open_postgres(pg_url, host_id="h1", ttl_s=10, readers=1)
    try:
        async with aclosing(PgNotifier.for_store(pg).listen()) as signals:
            assert await next_signal(signals) == Signal("lease")
            job = Job(name="j", channel="a", schedule="* * * * *", content="x")
            await pg.save_job(job)
            assert await next_signal(signals) == Signal("defs", "job:j")
    finally:
        pg.close()
