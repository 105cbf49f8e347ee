"""Live turn events over SSE (R24), slow subscribers, metrics, and graceful
shutdown (R29) against a real Hypercorn server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from conftest import Daemon
from helpers import agent, make_store, post, running_registry, settle
from skydeck.service import Service, Settings


async def turn_events(
    client: httpx.AsyncClient, channel: str, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """Subscribe, post, and collect this message's events until its final one."""
    events: list[dict[str, Any]] = []
    async with client.stream("GET", f"/api/channels/{channel}/turn-events") as stream:
        lines = stream.aiter_lines()
        assert (await lines.__anext__()).startswith(": subscribed")
        ack = (await client.post(f"/api/channels/{channel}/messages", json=body)).json()
        with trio.fail_after(30):
            async for line in lines:
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert event["message_id"] == ack["id"]
                    events.append(event)
                    if event["kind"] in ("done", "error"):
                        return events
    raise AssertionError("stream ended before the turn did")


async def test_r24_sse_events_arrive_in_order_for_a_real_turn(daemon: Daemon) -> None:
    events = await turn_events(daemon.client, "demo", {"content": "stream me"})
    assert [e["kind"] for e in events] == ["queued", "init", "text", "done"]
    assert events[-1]["reply"] == "echo: stream me"
    assert events[1]["session_id"]


async def test_r24_a_crashing_backend_still_ends_with_error(daemon: Daemon) -> None:
    await daemon.client.post(
        "/api/agents",
        json={
            "name": "crash",
            "channel": "crash",
            "backend": "command",
            "command": ["sh", "-c", "kill -9 $$"],
        },
    )
    events = await turn_events(daemon.client, "crash", {"content": "x"})
    assert [e["kind"] for e in events] == ["queued", "error"]
    assert events[-1]["error"] == "command killed by SIGKILL"


async def test_slow_subscriber_is_dropped_and_turns_keep_flowing(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = make_store(tmp_path)
    async with running_registry(store, agents=[agent("busy")]) as registry:
        with registry.events.subscribe("busy", buffer=8) as never_read:
            ids = [await post(registry, "busy", f"m{i}") for i in range(300)]
            messages = await settle(store, ids)
            assert registry.events.subscriber_count("busy") == 0, "dropped"
            buffered = [never_read.receive_nowait() for _ in range(8)]
            try:
                never_read.receive_nowait()
                raise AssertionError("the stream should have ended")
            except trio.EndOfChannel:
                pass
    assert {m.state for m in messages} == {"done"}
    assert [e.kind for e in buffered][:1] == ["queued"]


async def test_metrics_count_messages_turns_and_queues(daemon: Daemon) -> None:
    client = daemon.client
    await turn_events(client, "demo", {"content": "one"})
    await client.post("/api/channels/nobody/messages", json={"content": "parked"})
    text = (await client.get("/metrics")).text
    assert 'skydeck_messages_accepted_total{state="queued"} 1.0' in text
    assert 'skydeck_messages_accepted_total{state="buffered"} 1.0' in text
    assert 'skydeck_turns_total{outcome="ok"} 1.0' in text
    assert 'skydeck_messages_final_total{state="done"} 1.0' in text
    assert "skydeck_turn_duration_seconds_count 1.0" in text
    assert 'skydeck_queue_depth{agent="demo"} 0.0' in text


FIRST_TIME_SLOW = """
import os, sys, time
prompt = sys.stdin.read()
if not os.path.exists("ran-once"):
    open("ran-once", "w").close()
    time.sleep(float(os.environ["SLEEP_S"]))
print("finished " + prompt)
"""


async def test_r29_graceful_shutdown_503s_then_waits_for_the_running_turn(
    tmp_path: Path,
) -> None:
    ack = await _shutdown_during_turn(tmp_path, grace_s=20, sleep_s=1.5)
    store = make_store(tmp_path / "data")
    message = await store.get_message(ack)
    assert message is not None and message.state == "done", "finished inside the grace period"


async def test_r29_turn_past_the_grace_is_cancelled_and_replayed_at_next_start(
    tmp_path: Path,
) -> None:
    ack = await _shutdown_during_turn(tmp_path, grace_s=0.5, sleep_s=60)
    store = make_store(tmp_path / "data")
    interrupted = await store.get_message(ack)
    assert interrupted is not None and (interrupted.state, interrupted.attempts) == ("working", 1)
    store.close()
    service = Service(Settings(port=0, data_dir=tmp_path / "data", grace_s=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        (message,) = await settle(service.store, [ack], timeout=30)
        assert (message.state, message.attempts) == ("done", 2)
        reply = await service.store.get_message(message.reply_id or "")
        assert reply is not None and reply.content == "finished work"
        service.stop()


async def _shutdown_during_turn(tmp_path: Path, *, grace_s: float, sleep_s: float) -> str:
    service = Service(Settings(port=0, data_dir=tmp_path / "data", grace_s=grace_s))
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await client.post(
                "/api/agents",
                json={
                    "name": "slow",
                    "channel": "slow",
                    "backend": "command",
                    "command": [sys.executable, "-c", FIRST_TIME_SLOW],
                    "env": {"SLEEP_S": str(sleep_s)},
                },
            )
            ack = (
                await client.post("/api/channels/slow/messages", json={"content": "work"})
            ).json()
            with trio.fail_after(10):
                while service.registry.status("slow")[0] != "working":
                    await trio.sleep(0.02)
            await trio.sleep(0.3)  # the process is running
            rows_before = (
                await service.store.count_buffered(),
                len((await service.store.list_messages("slow", limit=10)).messages),
            )
            service.stop()
            refused = await client.post("/api/channels/slow/messages", json={"content": "late"})
            assert refused.status_code == 503
            assert refused.json()["ok"] is False
            health = await client.get("/health")
            assert (health.status_code, health.json()) == (503, {"status": "stopping"})
            rows_after = (
                await service.store.count_buffered(),
                len((await service.store.list_messages("slow", limit=10)).messages),
            )
            assert rows_after == rows_before, "a refused post stores nothing"
    return str(ack["id"])
