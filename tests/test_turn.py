"""The turn contract, side effect by side effect (R11-R25, R28)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from helpers import (
    FlakyMirror,
    OpenStore,
    ScriptBackend,
    agent,
    crashed_three_times,
    make_store,
    post,
    reply_of,
    running_registry,
    settle,
)
from skydeck.model import AgentSpec, Inbound, TurnEvent
from skydeck.turn import failure_reply_text

TAIL = "\n\nThis is often temporary; please try again in a moment."


def test_r16_failure_reply_text_exact_and_cut_at_240() -> None:
    assert failure_reply_text("boom") == (
        "⚠️ I couldn't complete that — the turn failed: boom" + TAIL
    )
    long = "x" * 241
    assert failure_reply_text(long) == (
        "⚠️ I couldn't complete that — the turn failed: " + "x" * 240 + "…" + TAIL
    )
    assert failure_reply_text("y" * 240).count("…") == 0


async def test_r16_failed_turn_records_replies_and_emits_error(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a")]) as registry:
        with registry.events.subscribe("a") as events:
            (failed,) = await settle(store, [await post(registry, "a", "fail:the model said no")])
            kinds = [e.kind for e in _drain(events)]
    assert (failed.state, failed.error) == ("failed", "the model said no")
    reply = await reply_of(store, failed)
    assert reply.content == failure_reply_text("the model said no")
    assert (reply.direction, reply.in_reply_to, reply.thread_id) == (
        "out",
        failed.id,
        failed.thread_id,
    )
    (thread,) = await store.list_threads("a")
    assert (thread.status, thread.output, thread.turn_count) == ("error", "the model said no", 1)
    assert kinds == ["queued", "init", "error"], "R24: exactly one final event"


async def test_r15_backend_that_raises_is_a_failed_turn_not_a_dead_channel(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a")]) as registry:
        bad, good = await post(registry, "a", "raise:kaput"), await post(registry, "a", "after")
        first, second = await settle(store, [bad, good])
    assert (first.state, first.error) == ("failed", "kaput")
    assert second.state == "done"


async def test_r14_hung_turn_times_out_and_the_channel_moves_on(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a", timeout_s=30)]) as registry:
        start = trio.current_time()
        hung, next_one = await settle(
            store, [await post(registry, "a", "hang"), await post(registry, "a", "x")]
        )
        assert trio.current_time() - start == pytest.approx(30, abs=0.1)
    assert (hung.state, hung.error) == ("failed", "turn timed out after 30 s")
    assert next_one.state == "done"


async def test_r11_r17_r18_sessions_resume_only_what_was_echoed(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a")]) as registry:
        await settle(store, [await post(registry, "a", "one")])
        await settle(store, [await post(registry, "a", "two")])
        await settle(store, [await post(registry, "a", "fail:no session echoed")])
        await settle(store, [await post(registry, "a", "three")])
        await registry.reset("a")  # R27
        await settle(store, [await post(registry, "a", "four")])
    one, two, failed, three, four = (call.session for call in backend.calls)
    assert not one.resume
    assert two.resume and two.id == one.id
    assert failed.resume and three.resume and three.id == one.id, "R18: failure kept the session"
    assert not four.resume and four.id != one.id, "R27: reset starts fresh"
    (thread,) = await store.list_threads("a")
    assert thread.turn_count == 5, "R17/R27: every ended turn counts, a reset keeps counting"
    assert thread.session == four.id


async def test_r18_a_turn_that_echoes_no_session_keeps_the_previous_one(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a")]) as registry:
        await settle(store, [await post(registry, "a", "nosession first")])
        await settle(store, [await post(registry, "a", "second")])
        await settle(store, [await post(registry, "a", "third")])
    first, second, third = (call.session for call in backend.calls)
    assert not first.resume and not second.resume, "nothing echoed: nothing to resume"
    assert third.resume and third.id == second.id


async def test_r4_r11_multi_threaded_never_resumes(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(
        store, backend, agents=[agent("m", mode="multi-threaded")]
    ) as registry:
        await settle(store, [await post(registry, "m", "one")])
        await settle(store, [await post(registry, "m", "two")])
    sessions = [call.session for call in backend.calls]
    assert not any(s.resume for s in sessions)
    assert sessions[0].id != sessions[1].id
    assert [t.turn_count for t in await store.list_threads("m")] == [1, 1]


async def test_r12_thread_record_is_working_while_the_turn_runs(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a")]) as registry:
        message_id = await post(registry, "a", "sleep:5 hi")
        await trio.sleep(1)
        (thread,) = await store.list_threads("a")
        assert (thread.status, thread.input, thread.output) == ("working", "sleep:5 hi", "")
        assert thread.turn_count == 0, "R12: the start record does not count a turn"
        await settle(store, [message_id])
    (thread,) = await store.list_threads("a")
    assert (thread.status, thread.turn_count, thread.usage) == ("ok", 1, {"output_tokens": 1})


async def test_r19_empty_reply_posts_nothing(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a")]) as registry:
        (message,) = await settle(store, [await post(registry, "a", "empty")])
    assert (message.state, message.reply_id) == ("done", None)
    assert len((await store.list_messages("a", limit=10)).messages) == 1


async def test_r20_transient_errors_retried_with_linear_backoff(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    sink = FlakyMirror(failures=[503, None])
    async with running_registry(store, mirror=sink, agents=[agent("a")]) as registry:
        (message,) = await settle(store, [await post(registry, "a", "hi")])
    assert message.state == "done"
    assert len(sink.attempts) == 3
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:], strict=False)]
    assert gaps == [pytest.approx(0.25), pytest.approx(0.5)], "250 ms × attempt"
    assert [r.content for r in sink.delivered] == ["re: hi"]


async def test_r20_permanent_4xx_is_not_retried(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    sink = FlakyMirror(failures=[400])
    async with running_registry(store, mirror=sink, agents=[agent("a")]) as registry:
        (message,) = await settle(store, [await post(registry, "a", "hi")])
    assert len(sink.attempts) == 1
    assert message.state == "failed"


async def test_r21_undelivered_reply_rewrites_the_same_record_and_calls_back_error(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    sink = FlakyMirror(failures=[500, 502, 503], channels={"a"})
    async with running_registry(store, mirror=sink, agents=[agent("a")]) as registry:
        with registry.events.subscribe("a") as events:
            (message,) = await settle(store, [await post(registry, "a", "hi", reply_to="boss")])
            final = _drain(events)[-1]
    assert len(sink.attempts) == 3, "3 attempts, then give up"
    (thread,) = await store.list_threads("a")
    assert thread.status == "error"
    assert thread.output == (
        "reply produced but NOT delivered (outbound write failed: vault write failed (503)). "
        "Undelivered reply text: re: hi"
    )
    assert thread.turn_count == 1, "same turn, no double count"
    assert (message.state, message.error) == (
        "failed",
        "outbound write failed: vault write failed (503)",
    )
    assert (await reply_of(store, message)).content == "re: hi", "the reply text is never lost"
    assert (final.kind, final.data["error"]) == (
        "error",
        "reply produced but not saved: vault write failed (503)",
    )
    callbacks = [m for m in (await store.list_messages("boss", limit=10)).messages]
    assert [c.metadata["status"] for c in callbacks] == ["error"]
    assert "source_message" not in callbacks[0].metadata
    assert [r.id for r in sink.deferred] == [message.reply_id], "the outbox keeps trying"
    assert sink.threads[-1] == ("end", "error")


async def test_r22_callback_metadata_exact(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("worker")]) as registry:
        inbound = Inbound(
            channel="worker",
            content="do it",
            metadata={"reply_to": "boss", "correlation_id": "c-42", "delegation_depth": "2"},
        )
        (done,) = await settle(store, [(await registry.submit(inbound)).id])
        failing = Inbound(channel="worker", content="fail:nope", metadata={"reply_to": "boss"})
        (failed,) = await settle(store, [(await registry.submit(failing)).id])
    ok_cb, err_cb = (await store.list_messages("boss", limit=10)).messages
    assert ok_cb.state == "buffered", "boss has no agent yet: the callback waits for it (R7)"
    assert ok_cb.content == (
        "[callback] worker finished (ok) — see source_message / source_thread in this "
        "note's metadata to pull the full result."
    )
    assert ok_cb.metadata == {
        "callback": "true",
        "status": "ok",
        "source_channel": "worker",
        "source_thread": done.thread_id,
        "source_message": done.reply_id,
        "correlation_id": "c-42",
        "delegation_depth": "3",
    }
    assert err_cb.content.startswith("[callback] worker finished with an error — see ")
    assert err_cb.metadata == {
        "callback": "true",
        "status": "error",
        "source_channel": "worker",
        "source_thread": failed.thread_id,
        "delegation_depth": "1",
    }
    assert "reply_to" not in ok_cb.metadata and "reply_to" not in err_cb.metadata, "R23"


async def test_r23_no_callback_at_depth_8_and_callbacks_never_ping_pong(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a"), agent("b")]) as registry:
        deep = Inbound(
            channel="a", content="deep", metadata={"reply_to": "b", "delegation_depth": 8}
        )
        shallow = Inbound(
            channel="a", content="shallow", metadata={"reply_to": "b", "delegation_depth": 7}
        )
        await settle(store, [(await registry.submit(deep)).id, (await registry.submit(shallow)).id])
        await trio.sleep(5)
        callbacks = [
            m for m in (await store.list_messages("b", limit=10)).messages if m.direction == "in"
        ]
        await settle(store, [c.id for c in callbacks])
        await trio.sleep(5)
    assert [c.metadata["delegation_depth"] for c in callbacks] == ["8"]
    assert (await store.list_messages("a", limit=50)).messages[-1].content == "re: shallow", (
        "b's turn on the callback must not call back into a"
    )


async def test_r28_message_interrupted_three_times_fails_without_running(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    accepted = await store.accept_inbound(
        Inbound(channel="a", content="crashy"), registered=True, buffer_cap=10
    )
    crashed_three_times(store, accepted.id)
    async with running_registry(store, backend, agents=[agent("a")]):
        (message,) = await settle(store, [accepted.id])
    assert backend.calls == []
    assert (message.state, message.error) == ("failed", "interrupted 3 times by daemon restarts")
    assert (await reply_of(store, message)).content == failure_reply_text(
        "interrupted 3 times by daemon restarts"
    )


async def test_r28_r9_an_exhausted_message_fails_alone_in_a_collect_batch(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    """The messages a collect agent gathers behind an exhausted one still run."""
    store = await open_store()
    backend = ScriptBackend()
    crashy, *rest = [
        await store.accept_inbound(
            Inbound(channel="c", content=text), registered=True, buffer_cap=10
        )
        for text in ("crashy", "two", "three")
    ]
    crashed_three_times(store, crashy.id)
    async with running_registry(store, backend, agents=[agent("c", queue_mode="collect")]):
        failed, two, three = await settle(store, [crashy.id, *(a.id for a in rest)])
    assert (failed.state, failed.error) == ("failed", "interrupted 3 times by daemon restarts")
    assert (two.state, three.state) == ("done", "done")
    assert backend.prompts("c") == ["two\n\nthree"], "joined, without the exhausted one"


async def test_r24_every_turn_ends_with_exactly_one_done_or_error(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    prompts = ["ok", "fail:x", "raise:y", "empty", "hang", "sleep:1 z"]
    async with running_registry(store, agents=[agent("a", timeout_s=5)]) as registry:
        with registry.events.subscribe("a", buffer=-1) as events:
            ids = [await post(registry, "a", p) for p in prompts]
            await settle(store, ids)
            seen = _drain(events)
    for message_id in ids:
        finals = [
            e.kind for e in seen if e.message_id == message_id and e.kind in ("done", "error")
        ]
        assert len(finals) == 1, finals


def _drain(events: trio.MemoryReceiveChannel[TurnEvent]) -> list[TurnEvent]:
    out = []
    while True:
        try:
            out.append(events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def test_r4_r17_single_threaded_conversation_is_one_upserted_record(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    """Issue 12 §1: one record per single-threaded conversation, one per multi-threaded turn."""
    store = await open_store()
    agents = [agent("s"), agent("m", mode="multi-threaded")]
    async with running_registry(store, agents=agents) as registry:
        ids = []
        for text in ("one", "two", "three"):
            ids.append(await post(registry, "s", text))
            await settle(store, [ids[-1]])
            if text == "one":
                (first,) = await store.list_threads("s")
            await trio.sleep(1)  # distinct timestamps
        for text in ("one", "two", "three"):
            await settle(store, [await post(registry, "m", text)])
    (conversation,) = await store.list_threads("s")
    assert conversation.turn_count == 3
    assert conversation.started_at == first.started_at, "set once, preserved"
    assert conversation.ended_at is not None and conversation.ended_at > first.ended_at  # type: ignore[operator]
    assert (conversation.status, conversation.input, conversation.output) == (
        "ok",
        "three",
        "re: three",
    ), "the latest turn shows"
    assert conversation.usage == {"output_tokens": 3}, "usage is cumulative"
    messages = [await store.get_message(i) for i in ids]
    assert {m.thread_id for m in messages if m} == {conversation.id}
    replies = [await reply_of(store, m) for m in messages if m]
    assert {r.thread_id for r in replies} == {conversation.id}
    multi = await store.list_threads("m")
    assert [(t.turn_count, t.input) for t in multi] == [(1, "one"), (1, "two"), (1, "three")]
    assert len({t.id for t in multi}) == 3


async def test_r27_reset_keeps_the_record_and_clears_its_session(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("s")]) as registry:
        await settle(store, [await post(registry, "s", "one")])
        (before,) = await store.list_threads("s")
        assert before.session is not None
        await registry.reset("s")
        (cleared,) = await store.list_threads("s")
        assert (cleared.id, cleared.session, cleared.turn_count) == (before.id, None, 1)
        await settle(store, [await post(registry, "s", "two")])
    (after,) = await store.list_threads("s")
    assert (after.id, after.turn_count) == (before.id, 2)
    assert after.session is not None and after.session != before.session


async def test_schema_4_migrates_a_version_3_store_and_keeps_old_records(tmp_path: Path) -> None:
    """Issue 12 §1: stores written by the per-turn-record skydeck open and stay readable."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE threads (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                channel TEXT NOT NULL, agent TEXT NOT NULL, mode TEXT NOT NULL,
                status TEXT NOT NULL, input TEXT NOT NULL, output TEXT NOT NULL DEFAULT '',
                session TEXT, turn_count INTEGER NOT NULL DEFAULT 0, usage TEXT,
                started_at TEXT NOT NULL, ended_at TEXT, message_id TEXT);
            CREATE TABLE sessions (agent TEXT PRIMARY KEY, session_id TEXT,
                turn_count INTEGER NOT NULL DEFAULT 0);
            INSERT INTO threads (id, channel, agent, mode, status, input, output, session,
                turn_count, started_at, ended_at)
                VALUES ('t-old', 'a', 'a', 'single-threaded', 'ok', 'hi', 'yo', 's-1', 7,
                '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z');
            INSERT INTO sessions VALUES ('a', 's-1', 7);
            PRAGMA user_version = 3;
            """
        )
    store = make_store(tmp_path, "old.db")
    (old,) = await store.list_threads("a")
    assert (old.id, old.turn_count, old.output) == ("t-old", 7, "yo")
    assert await store.get_session("a") == "s-1", "the conversation still resumes"
    assert await store.conversation("a") is None, "old per-turn records are not adopted"
    columns = [row[1] for row in store._db.execute("PRAGMA table_info(sessions)")]
    assert columns == ["agent", "session_id", "thread_id"]
    store.close()


async def test_r26_a_turn_stopped_during_mirror_delivery_is_settled_not_rerun(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    """Cut between its end record and the mirror's retries: the message ends
    (`done`) and the outbox gets the stored reply; nothing is left to run twice."""
    store = await open_store()
    mirror = FlakyMirror(failures=[None, None])  # lands on the 3rd attempt, 0.75 s in
    async with running_registry(store, mirror=mirror, agents=[agent("a")]) as registry:
        message_id = await post(registry, "a", "hello")
        await trio.sleep(0.3)  # end record stored, the mirror retrying
        await registry.remove("a")
        (message,) = await settle(store, [message_id])
    assert message.state == "done"
    assert [r.id for r in mirror.deferred] == [message.reply_id], "the outbox delivers it"


class SlowSessionMirror(FlakyMirror):
    async def read_session(self, agent: AgentSpec) -> str | None:
        await trio.sleep(5)
        return None


async def test_r9_a_turn_stopped_before_it_started_is_cancelled_not_stranded(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    """Interrupted while it waited on the mirror's session read (R9): the first
    message is `cancelled` in the store, not left `queued` and forgotten."""
    store = await open_store()
    mirror = SlowSessionMirror(failures=[])
    spec = agent("i", queue_mode="interrupt")
    async with running_registry(store, mirror=mirror, agents=[spec]) as registry:
        first = await post(registry, "i", "first")
        await trio.sleep(1)  # reading the mirrored session
        second = await post(registry, "i", "second")
        old, new = await settle(store, [first, second])
    assert (old.state, old.error) == ("cancelled", "interrupted by a newer message")
    assert new.state == "done"


def test_r23_garbage_depths_from_a_vault_are_0() -> None:
    from skydeck.ledger import MessageState
    from skydeck.model import Message

    def depth(raw: object) -> int:
        message = Message(
            id="m",
            seq=1,
            channel="c",
            direction="in",
            content="x",
            state=MessageState.QUEUED,
            created_at="t",
            metadata={"delegation_depth": raw},
        )
        return message.delegation_depth

    assert [depth(v) for v in ("3", " 7 ", 5, True, "²", "9" * 5000, "-1", "x")] == [
        3,
        7,
        5,
        0,
        0,
        0,
        0,
        0,
    ]
