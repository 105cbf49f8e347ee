"""telegram.md §13's scenarios 1-3, 5, 6 and 8-10 against a real `skydeck serve`,
driven only through the fake's control API (`python tests/fake_telegram.py` in its
own process), the daemon's HTTP API and signals. Scenarios 4, 7 and 11 (kill -9,
outages, the token nowhere) are in test_telegram_crash.py.

One fake and one daemon serve the module (each scenario has its own chats and
channels); pairing and webhook mode get their own pair."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from daemon_process import DaemonProcess
from fake_telegram import BOT_USERNAME, TOKEN

FAKE = str(Path(__file__).parent / "fake_telegram.py")
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {check}")
        time.sleep(0.02)


class Fake:
    """The fake Bot API in its own process, over its control API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("fake-telegram listening on "), line
        self.url = line.rsplit(" ", 1)[1].strip()
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def do(self, name: str, **body: Any) -> Any:
        answer = self.http.post(f"/_fake/{name}", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json().get("result")

    def push(self, chat_id: int, text: str, **kw: Any) -> dict[str, Any]:
        kw.setdefault("from_id", abs(chat_id))
        update: dict[str, Any] = self.do("push", chat_id=chat_id, text=text, **kw)
        return update

    def texts(self, chat_id: int) -> list[str]:
        return list(self.http.get("/_fake/texts", params={"chat_id": chat_id}).json()["texts"])

    def requests(self, method: str = "", chat_id: int | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"method": method}
        if chat_id is not None:
            params["chat_id"] = chat_id
        return list(self.http.get("/_fake/requests", params=params).json()["requests"])

    def sends(self, chat_id: int) -> list[dict[str, Any]]:
        return [r["params"] for r in self.requests("sendMessage", chat_id) if r["code"] == 200]

    def state(self) -> dict[str, Any]:
        return dict(self.http.get("/_fake/state").json())

    def close(self) -> None:
        self.http.close()
        self.proc.kill()
        self.proc.wait()


class Daemon:
    def __init__(self, data_dir: Path, fake: Fake, *args: str, **env: str) -> None:
        self.proc = DaemonProcess(
            data_dir,
            "--no-demo",
            "--grace",
            "2",
            *args,
            env={
                "SKYDECK_TELEGRAM_TOKEN": TOKEN,
                "SKYDECK_TELEGRAM_API_URL": fake.url,
                "SKYDECK_TELEGRAM_POLL_TIMEOUT_S": "1",
                "SKYDECK_TELEGRAM_PAIRING": "off",
                "SKYDECK_TELEGRAM_WAIT_S": "3",
                **env,
            },
        )
        self.http = httpx.Client(base_url=self.proc.url, timeout=30)

    def api(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        answer = self.http.request(method, path, json=body)
        assert answer.status_code == status, (answer.status_code, answer.text)
        return answer.json()

    def agent(self, name: str, **spec: Any) -> None:
        self.api(
            "POST", "/api/agents", {"name": name, "channel": name, "backend": "echo", **spec}, 201
        )

    def link(self, chat_id: int, channel: str, **extra: Any) -> dict[str, Any]:
        link: dict[str, Any] = self.api(
            "POST", "/api/telegram/links", {"chat_id": chat_id, "channel": channel, **extra}, 201
        )
        return link

    def inbound(self, channel: str) -> list[dict[str, Any]]:
        page = self.api("GET", f"/api/channels/{channel}/messages?limit=500")
        return [m for m in page["messages"] if m["direction"] == "in"]

    def settled(self, channel: str, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            got = self.inbound(channel)
            terminal = [m for m in got if m["state"] in ("done", "failed")]
            return got if len(got) >= count and len(terminal) == len(got) else None

        return wait_for(check, timeout)

    def close(self) -> None:
        self.http.close()
        self.proc.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    fake = Fake()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def daemon(fake: Fake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("bb") / "data", fake)
    wait_for(lambda: fake.requests("getUpdates"))
    yield daemon
    daemon.close()
    methods = {r["method"] for r in fake.requests()}
    assert methods <= {"getMe", "getUpdates", "sendMessage", "sendChatAction", "deleteWebhook"}


def test_s1_hello_is_answered_threaded_in_html(fake: Fake, daemon: Daemon) -> None:
    daemon.agent("tg")
    daemon.link(111, "tg")
    update = fake.push(111, "hello")
    wait_for(lambda: fake.texts(111), 2)
    assert fake.texts(111) == ["echo: hello"]
    (params,) = fake.sends(111)
    assert params["parse_mode"] == "HTML"
    assert params["reply_parameters"]["message_id"] == update["message"]["message_id"]
    transcript = daemon.api("GET", "/api/channels/tg/messages")["messages"]
    assert [m["content"] for m in transcript] == ["hello", "echo: hello"]
    wait_for(lambda: fake.state()["confirmed_offset"] > update["update_id"])


def test_s2_unlinked_chats_with_pairing_off_get_nothing(fake: Fake, daemon: Daemon) -> None:
    before = daemon.api("GET", "/health")["buffered"]
    last = [fake.push(2000 + i, f"anyone {i}") for i in range(5)][-1]
    wait_for(lambda: fake.state()["confirmed_offset"] > last["update_id"])
    assert daemon.api("GET", "/health")["buffered"] == before
    assert all(fake.requests("sendMessage", 2000 + i) == [] for i in range(5))
    assert daemon.api("GET", "/api/telegram/pairings")["pairings"] == []


def test_s2_pairing_on(tmp_path: Path) -> None:
    own = Fake()
    daemon = Daemon(tmp_path / "data", own, SKYDECK_TELEGRAM_PAIRING="on")
    try:
        daemon.agent("paired")
        own.push(2100, "let me in")
        (text,) = wait_for(lambda: own.texts(2100))
        code = re.search(r"Pairing code: ([A-Z2-9]{6})", text)
        assert code is not None
        own.push(2100, "again")  # one code per chat: nothing more is sent
        linked = daemon.api(
            "POST", "/api/telegram/pair", {"code": code.group(1), "channel": "paired"}, 201
        )
        assert linked["id"] == "2100"
        wait_for(lambda: len(own.texts(2100)) == 2)
        assert own.texts(2100)[1] == "Linked: this chat now talks to channel paired."
        own.push(2100, "now linked")
        (message,) = daemon.settled("paired", 1)
        assert message["content"] == "now linked"
    finally:
        daemon.close()
        own.close()


def test_s3_redelivered_batch_changes_nothing(fake: Fake, daemon: Daemon) -> None:
    daemon.agent("rd")
    daemon.link(300, "rd")
    for n in range(3):
        fake.push(300, f"r{n}")
    daemon.settled("rd", 3)
    wait_for(lambda: len(fake.texts(300)) == 3)
    polls = len(fake.requests("getUpdates"))
    fake.do("redeliver")
    wait_for(lambda: len(fake.requests("getUpdates")) >= polls + 2)
    assert len(daemon.inbound("rd")) == 3 and len(fake.texts(300)) == 3


def test_s5_a_long_reply_with_a_code_block_and_a_parse_error(fake: Fake, daemon: Daemon) -> None:
    daemon.agent("lr")
    daemon.link(500, "lr")
    code = "\n".join(f"value_{i} = {i} < {i + 1}" for i in range(400))
    text = "# Plan\n\n" + "step " * 700 + f"\n\n```python\n{code}\n```\ndone"
    fake.do("fail", method="sendMessage", outcomes=["400:parse"])
    fake.push(500, text)
    (message,) = daemon.settled("lr", 1)
    assert message["state"] == "done"
    sends = fake.sends(500)
    shown = fake.texts(500)
    assert len(shown) >= 3 and all(len(t.encode("utf-16-le")) // 2 <= 4096 for t in shown)
    assert "parse_mode" not in sends[0] and all(s["parse_mode"] == "HTML" for s in sends[1:])
    for part in (s["text"] for s in sends[1:]):
        assert part.count("<pre>") == part.count("</pre>")  # every block closed in its part
    joined = re.sub(r"\s+", "", "".join(shown))
    for i in range(400):
        assert f"value_{i}={i}<{i + 1}" in joined


def test_s6_429_502_400_and_a_blocked_chat(fake: Fake, daemon: Daemon) -> None:
    daemon.agent("dl")
    for chat in (601, 602, 603, 604):
        daemon.link(chat, "dl")
    fake.do("fail", method="sendMessage", outcomes=["429:2"])
    fake.push(601, "first")
    wait_for(lambda: fake.requests("sendMessage", 601))
    fake.push(602, "second")
    wait_for(lambda: fake.texts(601) and fake.texts(602), 8)
    first, *rest = [r for r in fake.requests("sendMessage") if r["params"]["chat_id"] in (601, 602)]
    assert first["code"] == 429 and all(r["at"] - first["at"] >= 1.7 for r in rest)
    fake.do("fail", method="sendMessage", outcomes=["502", "502"])
    fake.push(603, "flaky")
    wait_for(lambda: fake.texts(603), 8)
    assert [r["code"] for r in fake.requests("sendMessage", 603)] == [502, 502, 200]
    fake.do("fail", method="sendMessage", outcomes=["400:long"])
    fake.push(604, "too long")
    messages = wait_for(
        lambda: [
            m for m in daemon.inbound("dl") if m["content"] == "too long" and m["state"] == "failed"
        ]
    )
    assert messages[0]["error"] == (
        "outbound write failed: telegram sendMessage 400: Bad Request: message is too long"
    )
    fake.do("block", chat_id=601)
    fake.push(601, "blocked now")
    wait_for(
        lambda: any(
            i["state"] == "refused" and i["chat_id"] == "601"
            for i in daemon.api("GET", "/api/telegram/outbox")["items"]
        )
    )
    links = {
        link["id"]: link for link in daemon.api("GET", "/api/telegram/links?channel=dl")["links"]
    }
    assert links["601"]["blocked_at"] is not None
    fake.do("unblock", chat_id=601)
    fake.push(601, "back again")
    wait_for(lambda: fake.texts(601)[-1] == "echo: back again")
    links = {
        link["id"]: link for link in daemon.api("GET", "/api/telegram/links?channel=dl")["links"]
    }
    assert links["601"]["blocked_at"] is None


def test_s8_typing_failure_reply_and_commands(fake: Fake, daemon: Daemon) -> None:
    sleeper = [
        sys.executable,
        "-c",
        "import sys, time; sys.stdin.read(); time.sleep(1); print('ok')",
    ]
    daemon.api(
        "POST",
        "/api/agents",
        {"name": "ty", "channel": "ty", "backend": "command", "command": sleeper},
        201,
    )
    daemon.link(801, "ty")
    fake.push(801, "slow")
    wait_for(lambda: fake.texts(801), 15)
    actions = fake.requests("sendChatAction", 801)
    (reply,) = fake.requests("sendMessage", 801)
    assert len(actions) == 1 and actions[0]["at"] < reply["at"]  # every 4 s: test_t29
    failing = [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit('boom')"]
    daemon.api(
        "POST",
        "/api/agents",
        {"name": "fl", "channel": "fl", "backend": "command", "command": failing},
        201,
    )
    daemon.link(802, "fl")
    fake.push(802, "please")
    (text,) = wait_for(lambda: fake.texts(802), 15)
    assert text.startswith("⚠️ I couldn't complete that — the turn failed: ") and "boom" in text
    daemon.agent("cm")
    daemon.link(803, "cm")
    for command in ("/start", "/x@other_bot", "/status", "/reset"):
        fake.push(803, command)
    wait_for(lambda: len(fake.texts(803)) == 3)
    assert fake.texts(803) == [
        "This chat talks to channel cm (agent cm).\n\nSend a message to talk to it. /reset "
        "starts a fresh conversation; /status shows what it is doing.",
        "cm on cm: idle",
        "Session cleared: the next message starts a fresh conversation.",
    ]


def test_s10_groups_mentions_topics_allowed_users_bots(fake: Fake, daemon: Daemon) -> None:
    daemon.agent("grp")
    daemon.agent("topic")
    fake.do("chat", chat_id=-1000, type="supergroup", title="Team", is_forum=True)
    daemon.link(-1000, "grp", allow_users=["7", "8"])
    daemon.link(-1000, "topic", topic_id=5, trigger="all")
    fake.push(-1000, "chatter", from_id=7)
    fake.push(-1000, f"@{BOT_USERNAME} hello", from_id=7)
    fake.push(-1000, f"@{BOT_USERNAME} stranger", from_id=9)
    fake.push(-1000, f"@{BOT_USERNAME} bot", from_id=8, is_bot=True)
    fake.push(-1000, "in the topic", from_id=9, thread_id=5)
    daemon.settled("grp", 1)
    daemon.settled("topic", 1)
    wait_for(lambda: len(fake.texts(-1000)) == 2)
    assert [m["content"] for m in daemon.inbound("grp")] == ["hello"]
    assert [m["content"] for m in daemon.inbound("topic")] == ["in the topic"]
    topic_reply = next(s for s in fake.sends(-1000) if s["text"] == "echo: in the topic")
    assert topic_reply["message_thread_id"] == 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_s9_webhook_mode(tmp_path: Path) -> None:
    own = Fake()
    port = free_port()
    hook = f"http://127.0.0.1:{port}/api/telegram/webhook"  # as a reverse proxy would pass it
    daemon = Daemon(
        tmp_path / "data",
        own,
        "--port",
        str(port),
        "--telegram-mode",
        "webhook",
        "--telegram-webhook-url",
        hook,
        SKYDECK_TELEGRAM_WEBHOOK_SECRET="bb-secret_1",
    )
    try:
        daemon.agent("wh")
        daemon.link(900, "wh")
        (call,) = wait_for(lambda: own.requests("setWebhook"))
        assert call["params"] == {
            "url": hook,
            "secret_token": "bb-secret_1",
            "allowed_updates": ["message"],
            "max_connections": 1,
            "drop_pending_updates": False,
        }
        assert own.requests("getUpdates") == []
        update = {
            "update_id": 1,
            "message": {
                "message_id": 1,
                "chat": {"id": 900, "type": "private"},
                "from": {"id": 900, "is_bot": False, "first_name": "U"},
                "date": 0,
                "text": "forged",
            },
        }
        bad = daemon.http.post(
            "/api/telegram/webhook",
            json=update,
            headers={"X-Telegram-Bot-Api-Secret-Token": "nope"},
        )
        assert bad.status_code == 401 and daemon.inbound("wh") == []
        own.push(900, "via telegram")  # the fake POSTs it with the secret header
        (message,) = daemon.settled("wh", 1)
        assert message["content"] == "via telegram"
        wait_for(lambda: own.texts(900))
        # A turn still running at SIGTERM keeps the daemon in its grace period.
        sleeper = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(3)"]
        body = {"name": "slow", "channel": "slow", "backend": "command", "command": sleeper}
        daemon.api("POST", "/api/agents", body, 201)
        daemon.link(901, "slow")
        own.push(901, "take your time")
        wait_for(lambda: own.requests("sendChatAction", 901))
        daemon.proc.proc.send_signal(signal.SIGTERM)
        stopping = wait_for(
            lambda: (
                daemon.http.post(
                    "/api/telegram/webhook",
                    json={**update, "update_id": 2},
                    headers={"X-Telegram-Bot-Api-Secret-Token": "bb-secret_1"},
                ).status_code
                == 503
            ),
            5,
        )
        assert stopping
        assert own.state()["webhook"] is not None  # left set: Telegram keeps the updates
    finally:
        daemon.http.close()
        daemon.proc.proc.wait(30)
        daemon.proc.log.close()
        own.close()


def test_cli_link_ls_unlink_pairings_status(fake: Fake, daemon: Daemon) -> None:
    from daemon_process import cli

    url = daemon.proc.url
    made = cli(
        url, "telegram", "link", "-100777", "--channel", "cli", "--topic", "3", "--allow-user", "5"
    )
    assert made.returncode == 0 and made.stdout.startswith("linked -100777:3 ")
    assert "mention" in made.stdout and "1 allowed users" in made.stdout
    listed = cli(url, "telegram", "ls", "--json")
    ids = [link["id"] for link in json.loads(listed.stdout)]
    assert "-100777:3" in ids
    again = cli(url, "telegram", "link", "-100777", "--channel", "cli", "--topic", "3")
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already linked" in again.stderr and "(field: chat_id)" in again.stderr
    private = cli(url, "telegram", "link", "55", "--channel", "cli", "--trigger", "mention")
    assert private.returncode == 1 and "(field: trigger)" in private.stderr
    assert cli(url, "telegram", "unlink", "-100777:3").stdout == "unlinked -100777:3\n"
    assert cli(url, "telegram", "unlink", "-100777:3").returncode == 1
    assert cli(url, "telegram", "pairings").stdout == "no chat is waiting to be paired\n"
    status = cli(url, "telegram", "status", "--json")
    block = json.loads(status.stdout)
    assert block["mode"] == "polling" and block["bot"] == BOT_USERNAME
    plain = cli(url, "telegram", "status").stdout
    assert re.search(r"^receive\s+ok$", plain, re.M)
