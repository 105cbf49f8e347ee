"""The fake Bot API (tests/fake_telegram.py) is itself proven here: the shapes,
the strictness and every scripted failure the Telegram tests rely on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from quart import request
from quart_trio import QuartTrio

from fake_telegram import (
    BOT_USERNAME,
    CONFLICT_POLL,
    CONFLICT_WEBHOOK,
    FIRST_UPDATE_ID,
    TOKEN,
    FakeTelegram,
    serving,
    visible_html,
)


class Bot:
    def __init__(self, http: httpx.AsyncClient, token: str = TOKEN) -> None:
        self.http = http
        self.token = token

    async def __call__(self, method: str, **params: Any) -> httpx.Response:
        return await self.http.post(f"/bot{self.token}/{method}", json=params)

    async def ok(self, method: str, **params: Any) -> Any:
        answer = await self(method, **params)
        body = answer.json()
        assert answer.status_code == 200 and body["ok"] is True, body
        return body["result"]

    async def error(self, method: str, **params: Any) -> tuple[int, str, dict[str, Any]]:
        answer = await self(method, **params)
        body = answer.json()
        assert body["ok"] is False and body["error_code"] == answer.status_code
        return answer.status_code, body["description"], body.get("parameters", {})


@pytest.fixture
async def rig() -> AsyncIterator[tuple[FakeTelegram, Bot]]:
    fake = FakeTelegram()
    async with serving(fake) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield fake, Bot(http)


async def test_get_me_wrong_token_unknown_method(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    me = await bot.ok("getMe")
    assert me["username"] == BOT_USERNAME and me["is_bot"] is True
    assert (await Bot(bot.http, "1:wrong")("getMe")).status_code == 401
    assert (await bot.error("editMessageText"))[:2] == (404, "Not Found")
    # method names are case-insensitive; GET with query parameters works too
    answer = await bot.http.get(f"/bot{TOKEN}/GETME")
    assert answer.json()["result"]["id"] == me["id"]
    assert [r["method"] for r in fake.requests()] == ["getMe", "getMe", "editMessageText", "GETME"]


async def test_get_updates_offset_confirms_and_limit(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    fake.backlog(5, [1, 2])
    confirmed: list[int] = []
    fake.on_confirm(confirmed.append)
    batch = await bot.ok("getUpdates", limit=2)
    assert [u["update_id"] for u in batch] == [FIRST_UPDATE_ID, FIRST_UPDATE_ID + 1]
    assert batch[0]["message"]["chat"]["id"] == 1 and batch[1]["message"]["chat"]["id"] == 2
    assert batch[0]["message"]["text"] == "msg 0"
    again = await bot.ok("getUpdates", offset=FIRST_UPDATE_ID + 2)
    assert [u["update_id"] for u in again] == [FIRST_UPDATE_ID + i for i in range(2, 5)]
    assert confirmed == [FIRST_UPDATE_ID + 2]
    assert fake.state()["confirmed_offset"] == FIRST_UPDATE_ID + 2
    assert await bot.ok("getUpdates", offset=FIRST_UPDATE_ID + 5, timeout=0) == []
    assert fake.state()["pending_updates"] == 0


async def test_long_poll_answers_at_once_on_a_push(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    result: list[Any] = []

    async def poll() -> None:
        result.append(await bot.ok("getUpdates", timeout=5))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.2)
        fake.push(9, "hi", from_id=42)
    assert trio.current_time() - start < 2
    assert result[0][0]["message"]["text"] == "hi"


async def test_concurrent_poll_and_webhook_conflicts(rig: tuple[FakeTelegram, Bot]) -> None:
    _fake, bot = rig
    first: list[httpx.Response] = []

    async def poll() -> None:
        first.append(await bot("getUpdates", timeout=5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.2)
        nursery.start_soon(partial(bot.ok, "getUpdates", timeout=0.3))
    assert first[0].status_code == 409 and first[0].json()["description"] == CONFLICT_POLL
    assert await bot.ok("setWebhook", url="http://127.0.0.1:9/hook", secret_token="s3cret")
    assert await bot.error("getUpdates") == (409, CONFLICT_WEBHOOK, {})
    assert (await bot.error("setWebhook", url="http://x/", secret_token="bad token!"))[0] == 400
    assert await bot.ok("deleteWebhook", drop_pending_updates=False) is True
    assert await bot.ok("getUpdates", timeout=0) == []


async def test_send_message_rules(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    assert (await bot.error("sendMessage", chat_id=5, text="x"))[1] == "Bad Request: chat not found"
    update = fake.push(5, "hello", from_id=5)
    pushed = update["message"]["message_id"]
    sent = await bot.ok(
        "sendMessage",
        chat_id=5,
        text="<b>a</b> &amp; b",
        parse_mode="HTML",
        reply_parameters={"message_id": pushed},
    )
    assert sent["text"] == "a & b" and sent["message_id"] == 1000 and sent["from"]["is_bot"]
    assert (await bot.ok("sendMessage", chat_id="5", text="two"))["message_id"] == 1001
    assert fake.texts(5) == ["a & b", "two"]
    empty = await bot.error("sendMessage", chat_id=5, text="")
    assert empty[1] == "Bad Request: message text is empty"
    long = await bot.error("sendMessage", chat_id=5, text="😀" * 2049)  # 4098 UTF-16 units
    assert long[1] == "Bad Request: message is too long"
    assert (await bot.ok("sendMessage", chat_id=5, text="😀" * 2048))["text"]
    for bad in ("<x>a</x>", "<b>a", "a & b", "a < b", "<b>a</i>"):
        code, description, _ = await bot.error(
            "sendMessage", chat_id=5, text=bad, parse_mode="HTML"
        )
        assert code == 400 and description.startswith("Bad Request: can't parse entities"), bad
    missing = await bot.error(
        "sendMessage", chat_id=5, text="x", reply_parameters={"message_id": 77}
    )
    assert missing[1] == "Bad Request: message to be replied not found"
    lenient = {"message_id": 77, "allow_sending_without_reply": True}
    assert await bot.ok("sendMessage", chat_id=5, text="x", reply_parameters=lenient)
    fake.block(5)
    assert (await bot.error("sendMessage", chat_id=5, text="x"))[:2] == (
        403,
        "Forbidden: bot was blocked by the user",
    )
    assert await bot.ok("sendChatAction", chat_id=5, action="typing") is True
    assert (await bot.error("sendChatAction", chat_id=5, action="dancing"))[0] == 400


def test_visible_html_of_the_tags_telegram_takes() -> None:
    assert visible_html('<pre><code class="language-py">if a&lt;b:</code></pre>') == "if a<b:"
    assert visible_html('<a href="https://x.y/?a=1&amp;b">t</a>') == "t"


async def test_push_computes_entities_threads_and_replies(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    fake.chat(-100, type="supergroup", title="Ops", is_forum=True)
    fake.user(42, username="alice")
    command = fake.push(-100, "/status@skydeck_test_bot now", from_id=42, thread_id=7)["message"]
    assert command["entities"] == [{"type": "bot_command", "offset": 0, "length": 24}]
    assert command["message_thread_id"] == 7 and command["from"]["username"] == "alice"
    assert command["chat"] == {"id": -100, "type": "supergroup", "title": "Ops", "is_forum": True}
    mention = fake.push(-100, "😀 hi", from_id=42, mention=True)["message"]
    assert mention["text"] == f"@{BOT_USERNAME} 😀 hi"
    assert mention["entities"] == [{"type": "mention", "offset": 0, "length": 17}]
    await bot.ok("sendMessage", chat_id=-100, text="from the bot")
    reply = fake.push(-100, "thanks", from_id=42, reply_to_bot=True)["message"]
    assert reply["reply_to_message"]["from"]["is_bot"] is True
    assert reply["reply_to_message"]["text"] == "from the bot"


async def test_scripted_failures_in_order(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    fake.push(1, "x", from_id=1)
    fake.fail(
        "sendMessage",
        "429:3",
        "500",
        "502",
        "502html",
        "400:parse",
        "400:long",
        "400:migrate:-1009",
        "403:blocked",
        "401",
    )
    assert await bot.error("sendMessage", chat_id=1, text="a") == (
        429,
        "Too Many Requests: retry after 3",
        {"retry_after": 3},
    )
    assert (await bot.error("sendMessage", chat_id=1, text="a"))[0] == 500
    assert (await bot.error("sendMessage", chat_id=1, text="a"))[:2] == (502, "Bad Gateway")
    html_answer = await bot("sendMessage", chat_id=1, text="a")
    assert html_answer.status_code == 502 and html_answer.text.startswith("<html>")
    assert "can't parse entities" in (await bot.error("sendMessage", chat_id=1, text="a"))[1]
    assert (await bot.error("sendMessage", chat_id=1, text="a"))[1] == (
        "Bad Request: message is too long"
    )
    migrated = await bot.error("sendMessage", chat_id=1, text="a")
    assert migrated[2] == {"migrate_to_chat_id": -1009}
    assert (await bot.error("sendMessage", chat_id=1, text="a"))[0] == 403
    assert (await bot.error("sendMessage", chat_id=1, text="a"))[0] == 401
    assert await bot.ok("sendMessage", chat_id=1, text="a")  # the script is used up
    assert fake.texts(1) == ["a"]
    assert [r["code"] for r in fake.requests("sendMessage")] == [
        429, 500, 502, 502, 400, 400, 400, 403, 401, 200
    ]  # fmt: skip


async def test_net_garbage_shape_slow_and_outage(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    fake.fail("getMe", "net", "garbage", "shape", "slow:0.5")
    with pytest.raises(httpx.TransportError):
        await bot("getMe")
    garbage = await bot("getMe")
    assert garbage.status_code == 200 and garbage.text == "<html>hello</html>"
    assert (await bot("getMe")).json() == {"ok": True, "result": "oops"}
    start = trio.current_time()
    assert (await bot.ok("getMe"))["username"] == BOT_USERNAME
    assert trio.current_time() - start >= 0.5
    fake.outage(True, "502")
    assert (await bot.error("getMe"))[0] == 502
    fake.outage(True)
    with pytest.raises(httpx.TransportError):
        await bot("getMe")
    fake.outage(False)
    assert await bot.ok("getMe")


async def test_redeliver_push_raw_and_kinds(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    fake.push(1, "a", from_id=1)
    first = await bot.ok("getUpdates")
    fake.redeliver()
    assert await bot.ok("getUpdates", offset=first[-1]["update_id"] + 1) == first
    fake.push_raw("garbage")
    fake.push_kind("edited_message", {"message_id": 1, "chat": {"id": 1}})
    batch = await bot.ok("getUpdates", offset=first[-1]["update_id"] + 1)
    assert batch[0] == "garbage" and "edited_message" in batch[1]
    # an element without an id goes out once; the edit stays until confirmed
    again = await bot.ok("getUpdates", timeout=0)
    assert len(again) == 1 and "edited_message" in again[0]


async def test_webhook_posts_in_order_with_the_secret_and_retries() -> None:
    fake = FakeTelegram()
    got: list[tuple[str | None, int]] = []
    answers = [500]
    hook = QuartTrio("hook")

    @hook.post("/hook")
    async def receive() -> Any:
        body = await request.get_json()
        got.append((request.headers.get("X-Telegram-Bot-Api-Secret-Token"), body["update_id"]))
        if answers:
            return {"ok": False}, answers.pop(0)
        return {"ok": True}

    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        (hook_url,) = await nursery.start(serve, hook, config)
        async with serving(fake) as url, httpx.AsyncClient(base_url=url) as http:
            bot = Bot(http)
            await bot.ok(
                "setWebhook", url=f"{hook_url}/hook", secret_token="abc", max_connections=1
            )
            assert fake.state()["webhook"]["max_connections"] == 1
            first = fake.push(1, "a", from_id=1)["update_id"]
            fake.push(1, "b", from_id=1)
            with trio.fail_after(5):
                while len(got) < 3:
                    await trio.sleep(0.02)
            assert got == [("abc", first), ("abc", first), ("abc", first + 1)]
            fake.redeliver()
            with trio.fail_after(5):
                while len(got) < 5:
                    await trio.sleep(0.02)
            assert [u for _, u in got[3:]] == [first, first + 1]
        nursery.cancel_scope.cancel()


async def test_control_api_over_http(rig: tuple[FakeTelegram, Bot]) -> None:
    fake, bot = rig
    http = bot.http
    assert (await http.post("/_fake/chat", json={"chat_id": -5, "type": "group"})).json()["ok"]
    pushed = await http.post("/_fake/push", json={"chat_id": -5, "text": "x", "from_id": 3})
    assert pushed.json()["result"]["message"]["chat"]["type"] == "group"
    await http.post("/_fake/fail", json={"method": "sendMessage", "outcomes": ["502"]})
    assert (await bot("sendMessage", chat_id=-5, text="y")).status_code == 502
    listed = (await http.get("/_fake/requests", params={"method": "sendMessage"})).json()
    assert [r["code"] for r in listed["requests"]] == [502]
    assert (await http.get("/_fake/state")).json()["pending_updates"] == 1
    await http.post("/_fake/reset")
    assert fake.requests() == [] and fake.state()["pending_updates"] == 0


def test_runnable_prints_its_url_first(tmp_path: Path) -> None:
    script = Path(__file__).parent / "fake_telegram.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake-telegram listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        assert httpx.get(f"{url}/bot{TOKEN}/getMe").json()["ok"] is True
    finally:
        proc.kill()
        proc.wait()
