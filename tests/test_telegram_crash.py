"""Telegram against a real `skydeck serve` process: kill -9 at the confirm point
(T11) and at random points under a backlog (§13.4), an outage with a kill in
the delivery wait (T31, T37, T38, §13.7), and the token's secret part nowhere
(T1, §13.11). The fake Bot API runs in the test's Trio loop."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from daemon_process import SKYDECK, DaemonProcess, clean_env
from fake_telegram import TOKEN, FakeTelegram, serving
from telegram_rig import SECRET_PART, until


def daemon_env(api_url: str, **extra: str) -> dict[str, str]:
    return {
        "SKYDECK_TELEGRAM_TOKEN": TOKEN,
        "SKYDECK_TELEGRAM_API_URL": api_url,
        "SKYDECK_TELEGRAM_POLL_TIMEOUT_S": "1",
        "SKYDECK_TELEGRAM_PAIRING": "off",
        "SKYDECK_TELEGRAM_MISCONFIG_RETRY_S": "1",
        **extra,
    }


class Daemon:
    """Start, kill -9 and restart one data dir's daemon (start-up off the Trio thread,
    so the fake keeps answering the daemon's getMe meanwhile)."""

    def __init__(self, data_dir: Path, env: dict[str, str], *args: str) -> None:
        self.data_dir = data_dir
        self.env = env
        self.args = args
        self.proc: DaemonProcess | None = None

    async def start(self) -> str:
        args = ("--no-demo", "--grace", "1", *self.args)
        self.proc = await trio.to_thread.run_sync(
            lambda: DaemonProcess(self.data_dir, *args, env=self.env)
        )
        return self.proc.url

    async def kill(self) -> None:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        await trio.to_thread.run_sync(proc.kill)

    async def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            await trio.to_thread.run_sync(proc.stop)


@asynccontextmanager
async def fake_and_daemon(
    tmp_path: Path, fake: FakeTelegram, *args: str, **env: str
) -> AsyncIterator[tuple[str, Daemon]]:
    async with serving(fake) as api_url:
        daemon = Daemon(tmp_path / "data", daemon_env(api_url, **env), *args)
        try:
            yield api_url, daemon
        finally:
            await daemon.stop()


async def setup(url: str, chats: dict[int, str], agents: bool = True) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for chat, channel in chats.items():
            if agents:
                body = {"name": channel, "channel": channel, "backend": "echo"}
                assert (await http.post("/api/agents", json=body)).status_code == 201
            link = {"chat_id": chat, "channel": channel}
            assert (await http.post("/api/telegram/links", json=link)).status_code == 201


async def inbound_of(url: str, channel: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        page = (await http.get(f"/api/channels/{channel}/messages?limit=500")).json()
    return [m for m in page["messages"] if m["direction"] == "in"]


def collapse(texts: list[str]) -> list[str]:
    """At least once (T31): a part resent after a kill between Telegram's 200 and the
    commit shows twice in a row; its first showing is the one that counts for order."""
    out: list[str] = []
    for text in texts:
        if not out or out[-1] != text:
            out.append(text)
    return out


async def test_t11_kill_when_getupdates_confirms(tmp_path: Path) -> None:
    fake = FakeTelegram()
    chats = {1: "c1", 2: "c2"}
    async with fake_and_daemon(tmp_path, fake) as (_, daemon):
        url = await daemon.start()
        await setup(url, chats, agents=False)  # ingest only: messages stay buffered (R7)
        fake.backlog(150, list(chats))  # two batches of 100 and 50
        confirmed: list[int] = []

        def kill_on_first_confirm(offset: int) -> None:
            if not confirmed and daemon.proc is not None:
                confirmed.append(offset)
                os.kill(daemon.proc.proc.pid, signal.SIGKILL)

        fake.on_confirm(kill_on_first_confirm)
        await until(lambda: confirmed, 15)
        await daemon.kill()
        fake.on_confirm(None)
        url = await daemon.start()
        await until(lambda: fake.state()["confirmed_offset"] >= fake.next_id, 15)
        for chat, channel in chats.items():

            async def stored_once(channel: str = channel) -> list[dict[str, Any]]:
                return await inbound_of(url, channel)

            stored = await until(stored_once, 10)
            numbers = [int(m["content"].split()[1]) for m in stored]
            assert numbers == list(range(chat - 1, 150, 2)), channel  # each once, in order
            ids = [int(m["metadata"]["telegram_message_id"]) for m in stored]
            assert ids == sorted(ids)


async def test_kill_at_random_points_under_a_2000_update_backlog(tmp_path: Path) -> None:
    """§13.4: 2,000 updates over 20 chats, three kill -9 at random moments."""
    fake = FakeTelegram()
    chats = {100 + i: f"c{i}" for i in range(20)}
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Each turn waits for its reply to be accepted (T37), holding its turn slot:
    # one slot per channel keeps the 20 channels going at once.
    async with fake_and_daemon(tmp_path, fake, "--max-turns", "20") as (_, daemon):
        url = await daemon.start()
        await setup(url, chats)
        updates = fake.backlog(2000, list(chats))
        for _ in range(3):
            await trio.sleep(rng.uniform(0.2, 1.5))
            await daemon.kill()
            url = await daemon.start()

        def delivered() -> bool:
            return all(len(set(fake.texts(chat))) == 100 for chat in chats)

        await until(delivered, 90, every=0.2)
        resent = 0
        for chat, channel in chats.items():
            expected = [
                f"echo: {u['message']['text']}"
                for u in updates
                if u["message"]["chat"]["id"] == chat
            ]
            texts = fake.texts(chat)
            resent += len(texts) - len(set(texts))
            assert collapse(texts) == expected, (seed, chat)

            async def settled(channel: str = channel) -> list[dict[str, Any]] | None:
                stored = await inbound_of(url, channel)
                return stored if all(m["state"] == "done" for m in stored) else None

            try:
                stored = await until(settled, 10)
            except trio.TooSlowError:
                states = [(m["state"], m["error"]) for m in await inbound_of(url, channel)]
                async with httpx.AsyncClient(base_url=url) as http:
                    outbox = (await http.get("/api/telegram/outbox")).json()["items"]
                stuck = [s for s in states if s[0] != "done"]
                raise AssertionError((seed, stuck, outbox)) from None
            assert [m["content"] for m in stored] == [e[len("echo: ") :] for e in expected]
            assert all(m["reply_id"] for m in stored), seed
        # At least once: only a part in flight at a kill can show twice.
        assert resent <= 3 * 8, (seed, resent)


async def test_t31_t37_t38_outage_kill_in_the_wait_then_everything_in_order(
    tmp_path: Path,
) -> None:
    """§13.7 with a 4 s outage instead of 30 s (the same states, in less wall time):
    20 replies over 4 chats, kill -9 while a turn waits on delivery."""
    fake = FakeTelegram()
    chats = {200 + i: f"o{i}" for i in range(4)}
    async with fake_and_daemon(tmp_path, fake, SKYDECK_TELEGRAM_WAIT_S="1") as (_, daemon):
        url = await daemon.start()
        await setup(url, chats, agents=False)
        for n in range(5):
            for chat in chats:
                fake.push(chat, f"m{n}", from_id=chat)
        await until(lambda: fake.state()["confirmed_offset"] >= fake.next_id, 10)
        await until(lambda: all(fake.texts(chat) for chat in chats), 10)  # T19 notices
        fake.outage(True)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for channel in chats.values():
                body = {"name": channel, "channel": channel, "backend": "echo"}
                assert (await http.post("/api/agents", json=body)).status_code == 201
        await trio.sleep(2.5)  # some turns settled "still retrying", one waiting in each chat
        await daemon.kill()
        url = await daemon.start()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            pending = (await http.get("/api/telegram/outbox")).json()["items"]
            assert pending and all(item["state"] == "pending" for item in pending)
        await trio.sleep(1.5)
        fake.outage(False)

        def all_replies() -> bool:
            return all(len(fake.texts(chat)) == 6 for chat in chats)

        await until(all_replies, 30, every=0.1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def all_done() -> bool:
                for channel in chats.values():
                    stored = await inbound_of(url, channel)
                    if [m["state"] for m in stored] != ["done"] * 5:
                        return False
                return True

            await until(all_done, 10)
            for chat, channel in chats.items():
                assert fake.texts(chat)[1:] == [f"echo: m{n}" for n in range(5)]
                threads = (await http.get(f"/api/threads?channel={channel}")).json()["threads"]
                assert [t["status"] for t in threads] == ["ok"]  # single-threaded: one record
                assert threads[0]["turn_count"] == 5  # no turn ran twice (T38)
                page = (await http.get(f"/api/channels/{channel}/messages")).json()
                assert len([m for m in page["messages"] if m["direction"] == "out"]) == 5
            assert (await http.get("/api/telegram/outbox")).json()["items"] == []


async def test_t1_the_token_secret_is_written_nowhere(tmp_path: Path) -> None:
    """§13.11: a good turn, a 401, an outage and a 502, all at DEBUG."""
    fake = FakeTelegram()
    async with fake_and_daemon(tmp_path, fake, SKYDECK_LOG_LEVEL="DEBUG") as (_, daemon):
        url = await daemon.start()
        await setup(url, {300: "s"})
        fake.push(300, "first-words-xyzzy", from_id=300)
        await until(lambda: fake.texts(300), 10)
        fake.fail("sendMessage", "401", "502")
        fake.fail("getUpdates", "401", "502", "garbage")
        fake.push(300, "second-words-xyzzy", from_id=300)
        await until(lambda: len(fake.texts(300)) == 2, 15)
        fake.outage(True)
        fake.push(300, "third-words-xyzzy", from_id=300)
        await trio.sleep(1.2)
        fake.outage(False)
        await until(lambda: len(fake.texts(300)) == 3, 15)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answers = [
                (await http.get(path)).text
                for path in (
                    "/health",
                    "/metrics",
                    "/api/telegram/links",
                    "/api/telegram/outbox",
                    "/api/telegram/pairings",
                    "/api/threads",
                    "/api/channels/s/messages",
                    "/api",
                )
            ]
        await daemon.stop()
    for answer in answers:
        assert SECRET_PART not in answer
    logs = (tmp_path / "data-daemon.log").read_bytes()
    assert b"telegram poll failed" in logs and b"code=401" in logs
    assert SECRET_PART.encode() not in logs
    for text in (
        b"first-words",
        b"second-words",
        b"third-words",
    ):  # T42: no message text in the logs
        assert text not in logs
    for name in ("skydeck.db", "skydeck.db-wal"):
        path = tmp_path / "data" / name
        if path.exists():
            assert SECRET_PART.encode() not in path.read_bytes(), name


def serve_with(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SKYDECK, "serve", "--port", "0", "--no-demo", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean_env(), **env},
    )


def test_t1_t3_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    bad_token = serve_with({"SKYDECK_TELEGRAM_TOKEN": "not-a-token"}, tmp_path)
    assert bad_token.returncode == 2
    assert bad_token.stderr.strip() == (
        "skydeck: SKYDECK_TELEGRAM_TOKEN is not a bot token (expected <digits>:<secret> "
        "from @BotFather)"
    )
    no_url = serve_with(
        {"SKYDECK_TELEGRAM_TOKEN": TOKEN, "SKYDECK_TELEGRAM_MODE": "webhook"}, tmp_path
    )
    assert no_url.returncode == 2 and len(no_url.stderr.strip().splitlines()) == 1
    assert "SKYDECK_TELEGRAM_WEBHOOK_URL" in no_url.stderr
    assert SECRET_PART not in no_url.stderr
    assert (
        re.search(
            r"--telegram-token\b(?!-file)",
            subprocess.run(
                [SKYDECK, "serve", "--help"], capture_output=True, text=True, env=clean_env()
            ).stdout,
        )
        is None
    )  # no flag takes the token itself


async def test_per_chat_order_survives_r20_in_one_chat(tmp_path: Path) -> None:
    """T32 in a real daemon: chat A's replies wait on its failing head row, in order."""
    fake = FakeTelegram()
    async with fake_and_daemon(tmp_path, fake) as (_, daemon):
        url = await daemon.start()
        await setup(url, {400: "p"})
        fake.fail("sendMessage", "502", "502", "502")
        for n in range(5):
            fake.push(400, f"n{n}", from_id=400)
        await until(lambda: len(fake.texts(400)) == 5, 15)
        assert fake.texts(400) == [f"echo: n{n}" for n in range(5)]
        per_chat: dict[int, list[int]] = defaultdict(list)
        for request in fake.requests("sendMessage"):
            per_chat[request["params"]["chat_id"]].append(request["code"])
        assert per_chat[400][:4] == [502, 502, 502, 200]
