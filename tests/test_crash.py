"""R28 under load: a real daemon takes 10,000 messages over 50 channels, is
SIGKILLed at a random moment, and restarts on the same data dir. Every message
that got a 200 reaches exactly one terminal state, with exactly one reply, in
per-channel order. Three rounds, three different kill points."""

from __future__ import annotations

import random
import sqlite3
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import trio

from daemon_process import DaemonProcess

CHANNELS = [f"load{i:02d}" for i in range(50)]
PER_CHANNEL = 200  # 50 x 200 = 10,000 messages
TERMINAL = ("done", "failed", "cancelled", "dropped")


async def post_all(
    url: str,
    acked: dict[str, list[str]],
    sent: dict[str, int],
    kill: tuple[int, DaemonProcess] | None = None,
) -> None:
    """One sequential poster per channel; returns when all is sent or the daemon is gone.

    With ``kill=(n, daemon)``, the daemon is SIGKILLed the moment the n-th
    acknowledgement arrives, while the other 49 posters have requests in flight.
    """
    total = sum(len(v) for v in acked.values())
    state = {"total": total}
    limits = httpx.Limits(max_connections=len(CHANNELS))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def channel_poster(ch: str) -> None:
            resends = 0
            while sent[ch] < PER_CHANNEL:
                # The external id makes a re-send after the crash safe (R8): a post
                # that was stored but never acknowledged is acknowledged as duplicate.
                text = f"{ch}:{sent[ch]:04d}"
                body = {"content": text, "id": text}
                try:
                    response = await client.post(f"/api/channels/{ch}/messages", json=body)
                except httpx.TransportError:
                    resends += 1
                    if kill is None and resends <= 5:
                        # A kept-alive connection closed by the server as this post went
                        # out: a real client re-sends, and the external id makes it safe.
                        continue
                    return  # killed under us: this one was never acknowledged
                assert response.status_code == 200, response.text
                acked[ch].append(response.json()["id"])
                sent[ch] += 1
                state["total"] += 1
                if kill is not None and state["total"] == kill[0]:
                    kill[1].kill()
                    return

        async with trio.open_nursery() as nursery:
            for ch in CHANNELS:
                nursery.start_soon(channel_poster, ch)


def wait_until_quiet(db_path: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            (open_count,) = db.execute(
                "SELECT COUNT(*) FROM messages WHERE direction = 'in' "
                "AND state IN ('buffered', 'queued', 'working')"
            ).fetchone()
        if open_count == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{open_count} messages still open")


@pytest.mark.parametrize("seed", [11, 22, 33])
async def test_r28_sigkill_under_load_loses_and_doubles_nothing(tmp_path: Path, seed: int) -> None:
    kill_at = random.Random(seed).randint(1_000, 9_000)
    data = tmp_path / "data"
    first = DaemonProcess(data, "--no-demo")
    async with httpx.AsyncClient(base_url=first.url) as client:
        for ch in CHANNELS:
            spec = {"name": ch, "channel": ch, "backend": "echo"}
            assert (await client.post("/api/agents", json=spec)).status_code == 201
    acked: dict[str, list[str]] = defaultdict(list)
    sent: dict[str, int] = defaultdict(int)
    await post_all(first.url, acked, sent, kill=(kill_at, first))
    assert first.proc.returncode == -9

    second = DaemonProcess(data, "--no-demo")
    try:
        await post_all(second.url, acked, sent)
        assert sum(len(v) for v in acked.values()) >= 10_000 - len(CHANNELS)
        wait_until_quiet(data / "skydeck.db")
    finally:
        assert second.stop() == 0

    with sqlite3.connect(data / "skydeck.db") as db:
        inbound = db.execute(
            "SELECT id, channel, content, state FROM messages WHERE direction = 'in' ORDER BY seq"
        ).fetchall()
        replies = db.execute(
            "SELECT in_reply_to, channel, content FROM messages "
            "WHERE direction = 'out' ORDER BY seq"
        ).fetchall()
    by_id = {row[0]: row for row in inbound}
    for ids in acked.values():
        for message_id in ids:
            assert message_id in by_id, "an acknowledged message was lost"
    assert all(state == "done" for _, _, _, state in inbound), "every message ends, and ends once"
    reply_counts: dict[str, int] = defaultdict(int)
    for in_reply_to, _, _ in replies:
        reply_counts[in_reply_to] += 1
    assert set(reply_counts) == set(by_id) and set(reply_counts.values()) == {1}, "one reply each"
    for ch in CHANNELS:
        stored = [content for _, c, content, _ in inbound if c == ch]
        answered = [content for _, c, content in replies if c == ch]
        assert stored == sorted(stored), f"{ch}: stored out of order"
        assert len(stored) == len(set(stored)), f"{ch}: a message was stored twice"
        assert answered == [f"echo: {content}" for content in stored], f"{ch}: replies out of order"
