"""Telegram ingest and round trip (telegram.md §13), against a real `skydeck serve`.

    python bench/telegram_ingest.py [--updates 10000] [--chats 100] [--echo-chats 50]

1. Ingest: a `getUpdates` backlog of N text updates over C linked chats whose
   channels have no agent (every update becomes a buffered R7 row), timed from
   the first `getUpdates` to the one confirming the last update; beside it the
   same N messages through `POST /api/inbound` (16 clients) on a fresh daemon.
   Then every channel must hold its messages in `message_id` order, and the
   fake's `on_confirm` hook, reading the store read-only at every confirm, must
   never see an offset above 1 + the highest committed update id (T11).
2. Round trip: echo agents on E chats; p50/p99 from a push at the fake to the
   reply's `sendMessage` arriving there.

The fake Bot API runs in this process (tests/fake_telegram.py), the daemon in
its own; both on loopback.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_telegram import TOKEN, FakeTelegram, serving

SKYDECK = str(Path(sys.executable).parent / "skydeck")


async def start_daemon(data_dir: Path, api_url: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "SKYDECK_TELEGRAM_TOKEN": TOKEN,
        "SKYDECK_TELEGRAM_API_URL": api_url,
        "SKYDECK_TELEGRAM_POLL_TIMEOUT_S": "1",
        "SKYDECK_TELEGRAM_PAIRING": "off",
        "SKYDECK_LOG_LEVEL": "WARNING",
    }
    argv = [SKYDECK, "serve", "--port", "0", "--no-demo", "--data-dir", str(data_dir)]

    def launch() -> tuple[subprocess.Popen[bytes], str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None
        for raw in proc.stdout:
            if match := re.search(r"API:\s+(http://\S+)/api", raw.decode()):
                return proc, match.group(1)
        raise RuntimeError("skydeck did not start")

    return await trio.to_thread.run_sync(launch)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


async def ingest(updates: int, chats: int) -> tuple[float, float]:
    """(updates/s through getUpdates, messages/s through POST /api/inbound)."""
    fake = FakeTelegram()
    chat_ids = [1000 + i for i in range(chats)]
    with tempfile.TemporaryDirectory() as tmp:
        async with serving(fake) as api_url:
            proc, url = await start_daemon(Path(tmp) / "tg", api_url)
            db = Path(tmp) / "tg" / "skydeck.db"
            try:
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    for chat in chat_ids:
                        link = {"chat_id": chat, "channel": f"ch{chat}"}
                        assert (
                            await http.post("/api/telegram/links", json=link)
                        ).status_code == 201
                    await trio.sleep(1.5)  # the daemon is polling an empty queue
                    violations: list[str] = []
                    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

                    def check(offset: int) -> None:
                        (highest,) = reader.execute(
                            "SELECT MAX(update_id) FROM telegram_updates"
                        ).fetchone()
                        if highest is None or offset > highest + 1:
                            violations.append(f"offset {offset} confirmed, committed {highest}")

                    fake.on_confirm(check)
                    pushed = fake.backlog(updates, chat_ids)
                    last = pushed[-1]["update_id"]
                    polls_before = len(fake.requests("getUpdates"))
                    # polling the fake in this process: a 5 ms granularity on a ~2 s span
                    while fake.state()["confirmed_offset"] <= last:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                    done = time.monotonic()
                    first = fake.requests("getUpdates")[polls_before - 1]["at"]
                    rate = updates / (done - first)
                    reader.close()
                    assert not violations, violations[:3]
                    for chat in [*chat_ids[:: max(1, chats // 10)], chat_ids[-1]]:
                        page = await http.get(f"/api/channels/ch{chat}/messages?limit=500")
                        ids = [
                            int(m["metadata"]["telegram_message_id"])
                            for m in page.json()["messages"]
                        ]
                        assert ids == list(range(1, updates // chats + 1)), chat
            finally:
                stop(proc)
        # The same load through the HTTP API, 16 clients, on a fresh daemon.
        async with serving(FakeTelegram()) as api_url:
            proc, url = await start_daemon(Path(tmp) / "http", api_url)
            try:
                http_rate = await post_inbound(url, updates, chat_ids)
            finally:
                stop(proc)
    return rate, http_rate


async def post_inbound(url: str, count: int, chat_ids: list[int]) -> float:
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    next_index = 0
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def client() -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                chat = chat_ids[i % len(chat_ids)]
                body = {"channel": f"ch{chat}", "content": f"msg {i}", "id": f"h{i}"}
                answer = await http.post("/api/inbound", json=body)
                assert answer.status_code == 200, answer.text

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(client)
        return count / (time.monotonic() - start)


async def round_trip(chats: int, rounds: int) -> list[float]:
    fake = FakeTelegram()
    chat_ids = [2000 + i for i in range(chats)]
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with serving(fake) as api_url:
            proc, url = await start_daemon(Path(tmp) / "rt", api_url)
            try:
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    for chat in chat_ids:
                        agent = {"name": f"a{chat}", "channel": f"c{chat}", "backend": "echo"}
                        assert (await http.post("/api/agents", json=agent)).status_code == 201
                        link = {"chat_id": chat, "channel": f"c{chat}"}
                        assert (
                            await http.post("/api/telegram/links", json=link)
                        ).status_code == 201
                await trio.sleep(1.5)
                for n in range(rounds):
                    for chat in chat_ids:
                        before = len(fake.texts(chat))
                        start = time.monotonic()
                        fake.push(chat, f"ping {n}", from_id=chat)
                        while len(fake.texts(chat)) == before:  # noqa: ASYNC110
                            await trio.sleep(0.0005)
                        latencies.append(time.monotonic() - start)
            finally:
                stop(proc)
    return latencies


async def main(updates: int, chats: int, echo_chats: int, rounds: int) -> None:
    rate, http_rate = await ingest(updates, chats)
    print(f"ingest: {updates} updates over {chats} chats")
    print(f"  getUpdates backlog:   {rate:8.0f} updates/s (first poll to last confirm)")
    print(f"  POST /api/inbound:    {http_rate:8.0f} messages/s (16 clients)")
    latencies = sorted(await round_trip(echo_chats, rounds))
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"round trip: {len(latencies)} pushes over {echo_chats} echo chats")
    print(f"  push -> reply at the fake: p50 {p50:.1f} ms, p99 {p99:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--echo-chats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    trio.run(main, args.updates, args.chats, args.echo_chats, args.rounds)
