"""PT13 (P25): turn events on every host. Two real daemons on a real PostgreSQL
(a subscriber on one host to the other's channel), one in-process hub on a real
store (watch rows, spill clean-up), and the pure parts of `skydeck.pg.relay`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from daemon_process import DaemonProcess
from pg import query
from skydeck.model import EventKind, TurnEvent
from skydeck.pg.relay import (
    EVENTS,
    SPILL_BYTES,
    ClusterEvents,
    Inline,
    Outgoing,
    Relayed,
    Spill,
    TokenFilter,
    event_from_json,
    parse,
    plan,
)
from skydeck.store import Fence
from skydeck.store.postgres import open_postgres
from test_pg_hosts import create_echo_agents, host, wait_for_owners

BIG = 20_000


# -- the pure parts -----------------------------------------------------------------


def text(message_id: str, chunk: str) -> TurnEvent:
    return TurnEvent(kind=EventKind.TEXT, message_id=message_id, data={"text": chunk})


def test_plan_carries_small_events_and_spills_big_ones() -> None:
    small, same = Outgoing("c", 7, text("m1", "hi")), Outgoing("c", 7, text("m1", "hi"))
    big = Outgoing("c", 7, text("m1", "x" * BIG))
    notices = plan([small, same, big], 41)
    assert [type(n) for n in notices] == [Inline, Inline, Spill]
    first, second, spilled = notices
    assert isinstance(first, Inline) and isinstance(second, Inline)
    # Identical events stay two notifications (PostgreSQL folds identical payloads).
    assert first.payload != second.payload
    assert json.loads(first.payload) == {"c": "c", "t": 7, "n": 41, "e": small.event.to_json()}
    assert parse(first.payload) == Relayed("c", 7, event=small.event.to_json())
    assert isinstance(spilled, Spill)
    assert json.loads(spilled.body) == big.event.to_json()
    assert parse(spilled.payload(99)) == Relayed("c", 7, spill=99)
    assert len(spilled.payload(99).encode()) < 100


def test_plan_spills_only_what_would_pass_the_limit() -> None:
    spilled = []
    for chars in range(3_450, 3_550):  # "é" is two bytes: the limit is in bytes
        item = Outgoing("c", 1, text("m", "é" * chars))
        size = len(
            json.dumps(
                {"c": "c", "t": 1, "n": 0, "e": item.event.to_json()},
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode()
        )
        notice = plan([item], 0)[0]
        assert isinstance(notice, Spill) == (size > SPILL_BYTES)
        spilled.append(isinstance(notice, Spill))
    assert spilled[0] is False and spilled[-1] is True


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[1, 2]",
        '{"c": "c", "t": "7", "e": {}}',
        '{"c": "c", "t": true, "e": {}}',
        '{"c": 1, "t": 7, "e": {}}',
        '{"c": "c", "t": 7}',
        '{"c": "c", "t": 7, "e": {}, "s": 3}',
        '{"c": "c", "t": 7, "s": "3"}',
    ],
)
def test_parse_refuses_what_plan_never_makes(payload: str) -> None:
    assert parse(payload) is None


def test_event_from_json_reads_to_json_back() -> None:
    event = TurnEvent(kind=EventKind.DONE, message_id="m", data={"reply": "r"})
    assert event_from_json(event.to_json()) == event
    assert event_from_json({"kind": "nonsense", "message_id": "m"}) is None
    assert event_from_json({"kind": "done"}) is None


def test_token_filter_drops_a_lower_token_per_channel() -> None:
    tokens = TokenFilter()
    assert tokens.admit("a", 5) and tokens.admit("a", 5) and tokens.admit("a", 9)
    assert not tokens.admit("a", 5)  # a paused former owner
    assert tokens.admit("a", 9) and tokens.admit("b", 1)  # channels are apart


# -- one hub on a real store --------------------------------------------------------


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


async def test_watch_rows_follow_local_subscribers_and_old_spills_are_removed(
    pg_url: str,
) -> None:
    store = await open_postgres(pg_url, host_id="h1", ttl_s=3, readers=1)
    events = ClusterEvents(store, renew_s=0.1, spill_keep_s=5)
    spill = "INSERT INTO event_spill (body, created_at) VALUES ('{}', now() - %s) RETURNING id"
    query(pg_url, spill, timedelta(seconds=6))
    query(pg_url, spill, timedelta(0))
    watches = "SELECT channel, host, extract(epoch FROM expires_at)::float8 FROM watchers"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(events.run)
            with events.subscribe("c1"):
                with events.subscribe("c1"):
                    await events.ready("c1")  # committed: the row is there now
                    ((channel, host_id, expires),) = query(pg_url, watches)
                    ((now,),) = query(pg_url, "SELECT extract(epoch FROM now())::float8")
                    assert (channel, host_id) == ("c1", "h1")
                    assert 14 < float(str(expires)) - float(str(now)) <= 15
                    await trio.sleep(0.3)
                    ((_, _, renewed),) = query(pg_url, watches)  # every `renew_s`
                    assert float(str(renewed)) > float(str(expires))
                    # The spill older than `spill_keep_s` is gone, the other one kept.
                    assert query(pg_url, "SELECT count(*) FROM event_spill") == [(1,)]
                await trio.sleep(0.3)
                assert [row[:2] for row in query(pg_url, watches)] == [("c1", "h1")]
            # The last local subscriber left: the row goes.
            await wait_for(lambda: query(pg_url, "SELECT count(*) FROM watchers") == [(0,)])
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_an_owner_relays_only_watched_channels_and_nothing_past_its_deadline(
    pg_url: str,
) -> None:
    owner_store = await open_postgres(pg_url, host_id="h1", ttl_s=3, readers=1)
    viewer_store = await open_postgres(pg_url, host_id="h2", ttl_s=3, readers=1)
    metrics = CollectorRegistry()
    owner = ClusterEvents(owner_store, renew_s=0.05, flush_s=0.01, registry=metrics)
    owner.attach(lambda: {"w": Fence("w", 3), "u": Fence("u", 4)})
    viewer = ClusterEvents(viewer_store, renew_s=0.05)
    spy = psycopg.connect(pg_url, autocommit=True)
    spy.execute(f"LISTEN {EVENTS}")

    async def heard() -> list[dict[str, Any]]:  # on a thread: the relay runs meanwhile
        notes = await trio.to_thread.run_sync(lambda: list(spy.notifies(timeout=0.3)))
        return [json.loads(n.payload) for n in notes]

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(owner.run)
            await nursery.start(viewer.run)
            with viewer.subscribe("w"):
                await viewer.ready("w")
                await wait_for(lambda: "w" in owner.watched)  # from the table (no listener here)
                for channel in ("u", "w", "elsewhere"):
                    owner.publish(channel, text(f"{channel}-1", "hi"))
                assert [(n["c"], n["t"], n["e"]["message_id"]) for n in await heard()] == [
                    ("w", 3, "w-1")
                ]
                owner_store.ownership.forget()  # P10: past the deadline, no source of anything
                owner.publish("w", text("w-2", "late"))
                assert await heard() == []
                assert relay_counts(generate_latest(metrics).decode()) == {
                    "sent": 1,
                    "discarded": 1,
                }
            nursery.cancel_scope.cancel()
    finally:
        spy.close()
        owner_store.close()
        viewer_store.close()


# -- PT13: two daemons --------------------------------------------------------------


def relay_counts(metrics: str) -> dict[str, int]:
    """`skydeck_relay_events_total` by outcome, the zeros left out."""
    found = re.findall(r'^skydeck_relay_events_total\{outcome="(\w+)"\} (\S+)$', metrics, re.M)
    return {outcome: int(float(value)) for outcome, value in found if float(value)}


class Viewer:
    """A turn-events stream, read event by event."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self.lines = lines

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(10):
            async for line in self.lines:
                if line.startswith("data: "):
                    event: dict[str, Any] = json.loads(line[len("data: ") :])
                    return event
        raise AssertionError("the stream ended")

    async def until_done(self, message_id: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["kind"] not in ("done", "error"):
            event = await self.next()
            if event["message_id"] == message_id:
                seen.append(event)
        return seen


@pytest.mark.slow
async def test_pt13_a_subscriber_on_one_host_sees_the_owners_events(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    daemons = {h: host(tmp_path, pg_url, h) for h in ("h1", "h2")}
    stop_all += daemons.values()
    await create_echo_agents(daemons["h1"].url, ["watched", "quiet"])
    owner = (await wait_for_owners(pg_url, 2))["watched"]
    viewer_id = "h2" if owner == "h1" else "h1"
    viewer = daemons[viewer_id]
    # Everything relayed, as a third session sees it.
    spy = psycopg.connect(pg_url, autocommit=True)
    spy.execute(f"LISTEN {EVENTS}")
    try:
        async with (
            httpx.AsyncClient(base_url=viewer.url, timeout=10) as client,
            client.stream(
                "GET",
                "/api/channels/watched/turn-events",
                timeout=httpx.Timeout(10, read=None),
            ) as stream,
        ):
            live = Viewer(stream.aiter_lines())
            assert (await live.lines.__anext__()).startswith(": subscribed")
            assert query(pg_url, "SELECT channel, host FROM watchers") == [("watched", viewer_id)]

            async def post(channel: str, content: str, to: str = viewer.url) -> str:
                response = await client.post(
                    f"{to}/api/channels/{channel}/messages", json={"content": content}
                )
                assert response.status_code == 200, response.text
                message_id: str = response.json()["id"]
                return message_id

            async def stored_reply(message_id: str) -> str:
                message = (await client.get(f"/api/messages/{message_id}")).json()
                reply = (await client.get(f"/api/messages/{message['reply_id']}")).json()
                content: str = reply["content"]
                return content

            # Posted to the viewer's host, run by the owner: queued, text, done, in order.
            first = await post("watched", "hello")
            events = await live.until_done(first)
            assert [e["kind"] for e in events] == ["queued", "init", "text", "done"]
            assert events[-1]["reply"] == await stored_reply(first) == "echo: hello"
            # Posted to the owner itself: the same, `queued` said once.
            local = await post("watched", "local", to=daemons[owner].url)
            events = await live.until_done(local)
            assert [e["kind"] for e in events] == ["queued", "init", "text", "done"]
            # Post (to the viewer's host) -> `done` on the viewer's stream.
            lags = []
            for n in range(20):
                started = time.monotonic()
                await live.until_done(await post("watched", f"lag {n}"))
                lags.append(time.monotonic() - started)
            lags.sort()
            p50, top = lags[10] * 1000, lags[-1] * 1000
            print(f"PT13 post -> relayed done: p50 {p50:.1f} ms, max {top:.1f} ms")
            assert lags[10] < 0.5
            # 20,000 bytes arrive whole, through event_spill.
            big = "x" * BIG
            second = await post("watched", big)
            events = await live.until_done(second)
            assert [e["kind"] for e in events] == ["queued", "init", "text", "done"]
            assert events[2]["text"] == events[3]["reply"] == f"echo: {big}"
            assert events[3]["reply"] == await stored_reply(second)
            spilled = query(pg_url, "SELECT body FROM event_spill")
            assert len(spilled) == 2  # the text and the done: both over 7,000 bytes
            assert all(second in str(body) for (body,) in spilled)
            # A paused former owner's event (a lower token) is dropped; the current
            # owner's, sent after it in the same commit, arrives.
            ((token,),) = query(pg_url, "SELECT token FROM leases WHERE name = 'watched'")
            assert isinstance(token, int)
            with psycopg.connect(pg_url) as conn:
                for stale, message_id in ((token - 1, "stale"), (token, "fresh")):
                    forged = {
                        "c": "watched",
                        "t": stale,
                        "n": 0,
                        "e": text(message_id, "x").to_json(),
                    }
                    conn.execute("SELECT pg_notify(%s, %s)", (EVENTS, json.dumps(forged)))
            assert (await live.next())["message_id"] == "fresh"
            # A channel nobody watches: its turns send no notification at all.
            done_quiet = (
                "SELECT count(*) FROM messages "
                "WHERE channel = 'quiet' AND direction = 'in' AND state = 'done'"
            )
            for daemon in daemons.values():
                await post("quiet", "unseen", to=daemon.url)
            await wait_for(lambda: query(pg_url, done_quiet) == [(2,)])
            await trio.sleep(0.3)  # one relay tick and more
            counts = {
                h: relay_counts((await client.get(f"{d.url}/metrics")).text)
                for h, d in daemons.items()
            }
        notified = [json.loads(n.payload) for n in spy.notifies(timeout=0.5)]
    finally:
        spy.close()
    assert {note["c"] for note in notified} == {"watched"}
    ours = [n for n in notified if n.get("e", {}).get("message_id") in ("stale", "fresh")]
    relayed = [n for n in notified if n not in ours]
    assert len(ours) == 2
    assert len(relayed) == 23 * 4  # 23 turns of four events, each notified once
    assert len([note for note in relayed if "s" in note]) == 2
    assert counts[owner] == {"sent": 23 * 4, "spilled": 2}
    assert counts[viewer_id] == {"stale": 1}
    for daemon in daemons.values():
        assert daemon.stop() == 0
