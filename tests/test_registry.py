"""Registry rules: one task per channel, FIFO, buffering, lifecycle (R2-R8, R10, R26)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio

from helpers import OpenStore, ScriptBackend, agent, post, running_registry, settle
from skydeck.errors import Conflict, FencedOut, NotFound
from skydeck.model import Inbound
from skydeck.store.sqlite import SQLiteStore


async def test_r6_fifo_per_channel_and_no_overlap_under_concurrent_posts(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    channels = [f"ch{i}" for i in range(40)]
    sent: dict[str, list[str]] = {ch: [] for ch in channels}
    ids: list[str] = []
    async with running_registry(
        store, backend, agents=[agent(ch) for ch in channels], max_turns=8
    ) as registry:

        async def producer(seed: int) -> None:
            rng = random.Random(seed)
            for n in range(25):
                ch = rng.choice(channels)
                prompt = f"sleep:{rng.choice([0, 0.1, 0.5])} {seed}-{n}"
                sent[ch].append(prompt)
                ids.append(await post(registry, ch, prompt))
                await trio.sleep(rng.random() / 10)

        async with trio.open_nursery() as nursery:
            for seed in range(20):
                nursery.start_soon(producer, seed)
        messages = await settle(store, ids)

    assert all(m.state == "done" for m in messages)
    for ch in channels:
        assert backend.prompts(ch) == sent[ch], f"R6: {ch} ran out of order"
        assert backend.max_overlap[ch] <= 1, f"R6: two turns of {ch} overlapped"
    assert backend.max_running <= 8, "R10: the global limit was exceeded"
    assert backend.max_running > 1, "channels must run concurrently"


async def test_r7_buffered_then_replayed_in_order_on_register(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend) as registry:
        acks = [await registry.submit(Inbound(channel="later", content=f"m{i}")) for i in range(5)]
        assert {a.state for a in acks} == {"buffered"}
        await trio.sleep(1)
        assert backend.calls == [], "buffered messages must not run"
        await registry.create(agent("late", "later"))
        messages = await settle(store, [a.id for a in acks])
    assert backend.prompts("later") == [f"m{i}" for i in range(5)]
    assert [m.state for m in messages] == ["done"] * 5


async def test_r7_cap_evicts_oldest_as_dropped_and_keeps_them_listed(open_store: OpenStore) -> None:
    store = await open_store()
    async with running_registry(store, buffer_cap=3) as registry:
        ids = [await post(registry, "nobody", f"m{i}") for i in range(5)]
    states = [(await store.get_message(i)).state for i in ids]  # type: ignore[union-attr]
    assert states == ["dropped", "dropped", "buffered", "buffered", "buffered"]
    listed = (await store.list_messages("nobody", limit=10)).messages
    assert [m.content for m in listed] == [f"m{i}" for i in range(5)], "never silently deleted"
    assert await store.count_buffered() == 3


async def test_r8_duplicate_external_id_acknowledged_once(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a")]) as registry:
        first = await registry.submit(Inbound(channel="a", content="hi", external_id="note-1"))
        again = await registry.submit(Inbound(channel="a", content="hi", external_id="note-1"))
        await settle(store, [first.id])
    assert (first.state, again.state) == ("queued", "duplicate")
    assert again.id == first.id
    assert len(backend.calls) == 1
    store.close()
    # across a restart: a new store on the same file still knows the id
    reopened = await open_store()
    async with running_registry(reopened, backend, agents=[]) as registry:
        third = await registry.submit(Inbound(channel="a", content="hi", external_id="note-1"))
    assert (third.state, third.id) == ("duplicate", first.id)
    assert len(backend.calls) == 1


async def test_r2_one_agent_per_channel_and_unique_names(open_store: OpenStore) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a", "shared")]) as registry:
        with pytest.raises(Conflict) as taken:
            await registry.create(agent("b", "shared"))
        assert taken.value.field == "channel"
        with pytest.raises(Conflict) as named:
            await registry.create(agent("a", "other"))
        assert named.value.field == "name"
        with pytest.raises(NotFound):
            await registry.remove("ghost")


async def test_r5_status_idle_working_queued(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a")]) as registry:
        assert registry.status("a") == ("idle", 0)
        await post(registry, "a", "sleep:10 one")
        await trio.sleep(1)
        assert registry.status("a") == ("working", 0)
        last = [await post(registry, "a", "two"), await post(registry, "a", "three")][-1]
        assert registry.status("a") == ("queued", 2)
        await settle(store, [last])
        assert registry.status("a") == ("idle", 0)


async def test_r10_waiting_for_a_global_slot_reports_queued(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a"), agent("b")], max_turns=1) as registry:
        await post(registry, "a", "sleep:10 busy")
        await trio.sleep(1)
        waiting = await post(registry, "b", "next")
        await trio.sleep(1)
        assert registry.status("b") == ("queued", 1)
        assert (await store.get_message(waiting)).state == "queued"  # type: ignore[union-attr]
        await settle(store, [waiting])


async def test_r26_deregister_cancels_turn_and_rebuffers_queue(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a")]) as registry:
        running = await post(registry, "a", "hang")
        queued = [await post(registry, "a", f"q{i}") for i in range(3)]
        await trio.sleep(1)
        with registry.events.subscribe("a") as events:
            await registry.remove("a")
            event = events.receive_nowait()
        assert (event.kind, event.data["error"]) == ("error", "agent removed")
        cancelled = await store.get_message(running)
        assert cancelled is not None
        assert (cancelled.state, cancelled.error) == ("cancelled", "agent removed")
        assert [(await store.get_message(q)).state for q in queued] == ["buffered"] * 3  # type: ignore[union-attr]
        # a new agent on the channel replays them, in order, and never the cancelled one
        await registry.create(agent("b", "a"))
        await settle(store, queued)
    assert backend.prompts("a") == ["hang", "q0", "q1", "q2"]


async def test_r3_moving_an_agent_replays_the_new_channels_buffer(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a", "old")]) as registry:
        waiting = await post(registry, "new", "for new")
        await registry.update("a", {"channel": "new"})
        assert await post(registry, "old", "for old") != ""
        done = await settle(store, [waiting])
        assert done[0].state == "done"
        assert registry.status("a") == ("idle", 0)
    assert backend.prompts("new") == ["for new"]
    assert backend.prompts("old") == []
    assert await store.count_buffered() == 1


async def test_r25_crashing_event_subscriber_never_kills_the_channel(
    open_store: OpenStore, autojump_clock: trio.abc.Clock
) -> None:
    store = await open_store()
    async with running_registry(store, agents=[agent("a")]) as registry:

        def boom(channel: str, event: object) -> None:
            raise RuntimeError("sink exploded")

        registry.events.publish = boom  # type: ignore[method-assign]
        first, second = await post(registry, "a", "one"), await post(registry, "a", "two")
        messages = await settle(store, [first, second])
    assert [m.state for m in messages] == ["done", "done"]


class FencingStore(SQLiteStore):
    """An embedded store whose channel has moved to another host (P11): every
    record write of a cancel is refused."""

    async def end_thread(self, *args: Any, **kwargs: Any) -> Any:
        raise FencedOut("a", 1)

    async def set_state(self, *args: Any, **kwargs: Any) -> Any:
        raise FencedOut("a", 1)


async def test_p11_a_fenced_cancel_announces_nothing_and_calls_nobody_back(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = FencingStore(tmp_path / "skydeck.db")
    backend = ScriptBackend()
    async with running_registry(store, backend, agents=[agent("a"), agent("b")]) as registry:
        await post(registry, "a", "hang", reply_to="b")
        await trio.sleep(1)
        with registry.events.subscribe("a") as events:
            await registry.remove("a")
            with pytest.raises(trio.WouldBlock):  # no `error agent removed` from here
                events.receive_nowait()
        await trio.sleep(1)
    assert backend.prompts("b") == []  # and no callback to the sender
    store.close()
