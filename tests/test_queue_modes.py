"""Queue modes (R9) and the global turn limit (R10), under the autojump clock."""

from __future__ import annotations

import pytest
import trio

from helpers import (
    OpenStore,
    ScriptBackend,
    agent,
    post,
    reply_of,
    running_registry,
    settle,
)


async def test_r9_collect_joins_queued_messages_into_one_turn(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(
        store, backend, agents=[agent("c", queue_mode="collect")]
    ) as registry:
        first = await post(registry, "c", "sleep:5 first")
        await trio.sleep(1)
        later = [await post(registry, "c", text) for text in ("a", "b", "c")]
        messages = await settle(store, [first, *later])
    assert backend.prompts("c") == ["sleep:5 first", "a\n\nb\n\nc"]
    joined = messages[1:]
    assert {m.state for m in joined} == {"done"}
    assert len({m.reply_id for m in joined}) == 1, "one turn, one reply for all of them"
    assert (await reply_of(store, joined[0])).content == "re: a\n\nb\n\nc"
    assert len({m.thread_id for m in joined}) == 1


async def test_r9_interrupt_cancels_the_running_turn_for_the_newest(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(
        store, backend, agents=[agent("i", queue_mode="interrupt")]
    ) as registry:
        with registry.events.subscribe("i", buffer=-1) as events:
            running = await post(registry, "i", "sleep:100 long job")
            await trio.sleep(1)
            newer = await post(registry, "i", "urgent")
            old, new = await settle(store, [running, newer])
            kinds = []
            while True:
                try:
                    event = events.receive_nowait()
                except trio.WouldBlock:
                    break
                kinds.append((event.message_id, event.kind, event.data.get("error")))
        assert trio.current_time() < 50, "the long job did not run to its end"
    assert (old.state, old.error) == ("cancelled", "interrupted by a newer message")
    assert new.state == "done"
    assert (running, "error", "interrupted by a newer message") in kinds
    # One conversation record (R4): the cancelled turn is not counted, the newest shows.
    (thread,) = await store.list_threads("i")
    assert (thread.status, thread.turn_count, thread.input) == ("ok", 1, "urgent")
    assert old.thread_id == new.thread_id == thread.id


async def test_r9_followup_is_the_default_and_runs_every_message(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("f")]) as registry:
        ids = [await post(registry, "f", f"sleep:1 m{i}") for i in range(4)]
        await settle(store, ids)
    assert len(backend.calls) == 4


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_r10_global_limit_caps_concurrent_turns(
    open_store: OpenStore, autojump_clock: trio.abc.Clock, limit: int
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    channels = [f"ch{i}" for i in range(6)]
    async with running_registry(
        store, backend, agents=[agent(ch) for ch in channels], max_turns=limit
    ) as registry:
        start = trio.current_time()
        ids = [await post(registry, ch, "sleep:10 work") for ch in channels]
        await trio.sleep(1)
        statuses: list[str] = [registry.status(ch)[0] for ch in channels]
        await settle(store, ids)
        elapsed = trio.current_time() - start
    assert backend.max_running == limit
    assert statuses.count("working") == limit and statuses.count("queued") == 6 - limit
    assert elapsed == pytest.approx(10 * -(-6 // limit), abs=0.5)
