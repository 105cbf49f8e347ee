"""Telegram rules T2-T42 through the fake Bot API and the daemon's HTTP API (a
real `Service` on a socket, the fake on another, real time; retry settings
short where the spec allows)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from fake_telegram import BOT_USERNAME, FIRST_UPDATE_ID, TOKEN
from skydeck.errors import StoreFailure
from skydeck.transports.telegram import pairing_text, unsupported_text
from telegram_rig import METHODS, Rig, running, until


def reply_params(rig: Rig, chat: int) -> list[dict[str, Any]]:
    return [r["params"] for r in rig.sends(chat)]


async def settled(rig: Rig, channel: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        inbound = await rig.inbound(channel)
        done = [m for m in inbound if m["state"] in ("done", "failed")]
        return inbound if len(inbound) >= count and len(done) == len(inbound) else None

    result: list[dict[str, Any]] = await until(check, timeout)
    return result


def t39_only_known_methods(rig: Rig) -> None:
    assert {r["method"] for r in rig.fake.requests()} <= METHODS


# -- §13.1, T2, T15, T26 ----------------------------------------------------------------


async def test_t2_t15_t26_a_linked_dm_is_answered_threaded_in_html(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("tg")
        assert (await rig.link(111, "tg"))["trigger"] == "all"
        rig.fake.user(111, username="ada")
        update = rig.fake.push(111, "hello", from_id=111)
        await until(lambda: rig.fake.texts(111), timeout=2)
        assert rig.fake.texts(111) == ["echo: hello"]
        (params,) = reply_params(rig, 111)
        assert params["parse_mode"] == "HTML"
        assert params["reply_parameters"] == {
            "message_id": update["message"]["message_id"],
            "allow_sending_without_reply": True,
        }
        (inbound,) = await settled(rig, "tg", 1)
        assert inbound["content"] == "hello" and inbound["state"] == "done"
        assert inbound["metadata"] == {
            "source": "telegram",
            "telegram_chat_id": "111",
            "telegram_message_id": "1",
            "telegram_update_id": str(update["update_id"]),
            "telegram_chat_type": "private",
            "telegram_user_id": "111",
            "telegram_user": "@ada",
        }
        for key in ("reply_to", "correlation_id", "delegation_depth"):
            assert key not in inbound["metadata"]
        transcript = await rig.messages("tg")
        assert [m["content"] for m in transcript] == ["hello", "echo: hello"]
        await until(lambda: rig.fake.state()["confirmed_offset"] > update["update_id"])
        for request in rig.fake.requests():
            assert request["http"] == "POST" and request["json"], request
        t39_only_known_methods(rig)


# -- T4-T8 -------------------------------------------------------------------------------


async def test_t4_topics_land_on_their_own_link_else_the_chats(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("a")
        await rig.agent("b")
        rig.fake.chat(-100, "supergroup", is_forum=True)
        await rig.link(-100, "a", trigger="all")
        await rig.link(-100, "b", topic_id=7, trigger="all")
        conflict = await rig.api(
            "POST", "/api/telegram/links", {"chat_id": "-100", "channel": "b"}, 409
        )
        assert conflict["field"] == "chat_id"
        rig.fake.push(-100, "in seven", from_id=1, thread_id=7)
        rig.fake.push(-100, "in nine", from_id=1, thread_id=9)
        rig.fake.push(-100, "general", from_id=1)
        await settled(rig, "a", 2)
        assert [m["content"] for m in await rig.inbound("b")] == ["in seven"]
        assert [m["content"] for m in await rig.inbound("a")] == ["in nine", "general"]
        await until(lambda: len(rig.sends(-100)) == 3)
        threads = sorted(p.get("message_thread_id") or 0 for p in reply_params(rig, -100))
        assert threads == [0, 7, 9]


async def test_t5_fail_closed_without_links_and_after_delete(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        last = [rig.fake.push(500 + i, f"hi {i}", from_id=500 + i) for i in range(5)][-1]
        await until(lambda: rig.fake.state()["confirmed_offset"] > last["update_id"], 5)
        assert await rig.inbound("c") == []
        assert (await rig.health())["buffered"] == 0
        assert rig.sends() == []
        await rig.link(600, "c")
        rig.fake.push(600, "linked", from_id=600)
        await settled(rig, "c", 1)
        await rig.api("DELETE", "/api/telegram/links/600")
        await rig.api("DELETE", "/api/telegram/links/600", status=404)
        after = rig.fake.push(600, "after delete", from_id=600)
        await until(lambda: rig.fake.state()["confirmed_offset"] > after["update_id"], 5)
        assert [m["content"] for m in await rig.inbound("c")] == ["linked"]
        metrics = (await rig.http.get("/metrics")).text
        assert 'skydeck_telegram_updates_total{outcome="unlinked"} 6.0' in metrics


async def test_t6_t7_t10_group_access(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("g")
        rig.fake.chat(-200, "group", title="Team")
        link = await rig.link(-200, "g", allow_users=["42", 44])
        assert link["allow_users"] == ["42", "44"] and link["trigger"] == "mention"
        rig.fake.push(-200, "not addressed", from_id=42)
        rig.fake.push(-200, f"@{BOT_USERNAME}  what's up", from_id=42)
        rig.fake.push(-200, f"@{BOT_USERNAME} stranger", from_id=43)
        rig.fake.push(-200, f"@{BOT_USERNAME} a bot", from_id=44, is_bot=True)
        await until(lambda: rig.fake.texts(-200))
        rig.fake.push(-200, "reply to you", from_id=44, reply_to_bot=True)
        await settled(rig, "g", 2)
        assert [m["content"] for m in await rig.inbound("g")] == ["what's up", "reply to you"]
        await until(lambda: len(rig.fake.texts(-200)) == 2)
        links = (await rig.api("GET", "/api/telegram/links"))["links"]
        assert links[0]["title"] == "Team" and links[0]["chat_type"] == "group"


async def test_t8_pairing_once_then_linked_by_the_cli(tmp_path: Path) -> None:
    async with running(tmp_path, telegram_pairing="on") as rig:
        await rig.agent("c")
        rig.fake.push(777, "hello?", from_id=777)
        await until(lambda: rig.fake.texts(777))
        rig.fake.push(777, "anyone?", from_id=777)
        (pairing,) = (await rig.api("GET", "/api/telegram/pairings"))["pairings"]
        assert rig.fake.texts(777) == [pairing_text(pairing["code"])]
        assert pairing["chat_id"] == "777" and pairing["chat_type"] == "private"
        from daemon_process import cli

        result = await trio.to_thread.run_sync(
            lambda: cli(rig.url, "telegram", "pair", pairing["code"], "--channel", "c")
        )
        assert result.returncode == 0, result.stderr
        assert "777" in result.stdout and "c" in result.stdout
        await until(lambda: len(rig.fake.texts(777)) == 2)
        assert rig.fake.texts(777)[1] == "Linked: this chat now talks to channel c."
        rig.fake.push(777, "now?", from_id=777)
        (message,) = await settled(rig, "c", 1)
        assert message["content"] == "now?"  # the unlinked ones were never stored
        again = await rig.api(
            "POST", "/api/telegram/pair", {"code": pairing["code"], "channel": "c"}, 404
        )
        assert again["field"] == "code"


# -- T9-T14 -------------------------------------------------------------------------------


async def test_t9_get_me_retried_while_http_serves(tmp_path: Path) -> None:
    from fake_telegram import FakeTelegram

    fake = FakeTelegram()
    fake.fail("getMe", "502", "502", "502")
    async with running(tmp_path, fake) as rig:
        health = await rig.health()
        assert health["status"] == "ok" and health["telegram"]["receive"] == "starting"
        assert rig.fake.requests("getUpdates") == []
        await until(lambda: rig.fake.requests("getUpdates"), timeout=12)
        assert len(rig.fake.requests("getMe")) == 4
        assert rig.fake.requests("deleteWebhook")[0]["params"] == {"drop_pending_updates": False}
        assert (await rig.health())["telegram"]["bot"] == BOT_USERNAME


async def test_t10_failed_polls_back_off_then_recover(tmp_path: Path) -> None:
    from fake_telegram import FakeTelegram

    fake = FakeTelegram()
    fake.fail("getUpdates", "409", "502")
    async with running(tmp_path, fake) as rig:

        async def receive_error() -> dict[str, Any] | None:
            block: dict[str, Any] = (await rig.health())["telegram"]
            return block if block["receive"] == "error" else None

        block = await until(receive_error, 3)
        assert block["last_error"] == (
            "getUpdates 409: Conflict: terminated by other getUpdates request; make sure that "
            "only one bot instance is running"
        )
        assert block["last_error_at"] is not None
        await until(lambda: len(rig.fake.requests("getUpdates")) >= 3, timeout=8)
        polls = rig.fake.requests("getUpdates")
        assert polls[0]["params"] == {"limit": 100, "timeout": 1, "allowed_updates": ["message"]}
        assert polls[1]["at"] - polls[0]["at"] >= 0.95
        assert polls[2]["at"] - polls[1]["at"] >= 1.95
        metrics = (await rig.http.get("/metrics")).text
        assert 'skydeck_telegram_polls_total{result="error"} 2.0' in metrics

        async def receiving() -> bool:
            return bool((await rig.health())["telegram"]["receive"] == "ok")

        await until(receiving, 3)


async def test_t9_a_store_failure_during_a_batch_is_retried_not_fatal(tmp_path: Path) -> None:
    """The disk fails while a batch is stored: nothing is confirmed, the receiver
    (and the daemon) stay up, and the batch comes again and lands once it commits."""
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(5, "c")
        registry = rig.service.registry
        real = registry.submit_batch
        failures = 0

        async def failing_once(inbounds: Any) -> Any:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise StoreFailure("disk I/O error")
            return await real(inbounds)

        registry.submit_batch = failing_once  # type: ignore[method-assign]
        rig.fake.push(5, "survives", from_id=5)
        (inbound,) = await settled(rig, "c", 1)
        assert inbound["content"] == "survives" and failures == 1
        assert rig.fake.texts(5) == ["echo: survives"]


async def test_t12_redelivered_updates_have_no_second_effect(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(5, "c")
        for i in range(19):
            rig.fake.push(5, f"m{i}", from_id=5)
        rig.fake.push(5, "/reset", from_id=5)
        await settled(rig, "c", 19)
        rig.fake.redeliver()
        await until(lambda: len(rig.fake.texts(5)) == 20)
        await trio.sleep(1.5)  # a poll or two more: the redelivered batch was handled
        assert len(await rig.inbound("c")) == 19
        texts = rig.fake.texts(5)
        assert (
            len(texts) == 20
            and texts.count("Session cleared: the next message starts a fresh conversation.") == 1
        )
        metrics = (await rig.http.get("/metrics")).text
        assert 'skydeck_telegram_updates_total{outcome="duplicate"} 20.0' in metrics


async def test_t13_t14_webhook_mode(tmp_path: Path) -> None:
    secret = "s3cret-webhook_token"
    async with running(
        tmp_path,
        telegram_mode="webhook",
        telegram_webhook_url="https://bot.example/api/telegram/webhook",
        telegram_webhook_secret=secret,
    ) as rig:
        await rig.agent("c")
        await rig.link(9, "c")
        (call,) = await until(lambda: rig.fake.requests("setWebhook"))
        assert call["params"] == {
            "url": "https://bot.example/api/telegram/webhook",
            "secret_token": secret,
            "allowed_updates": ["message"],
            "max_connections": 1,
            "drop_pending_updates": False,
        }
        await until(lambda: rig.health())
        update = {"update_id": 555, "message": rig.fake.message(9, "via hook", from_id=9)}
        path = "/api/telegram/webhook"
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
            bad = await rig.http.post(path, json=update, headers=headers)
            assert bad.status_code == 401 and bad.json() == {"ok": False, "error": "unauthorized"}
        assert await rig.inbound("c") == []
        good = {"X-Telegram-Bot-Api-Secret-Token": secret}
        for _ in range(2):
            answer = await rig.http.post(path, json=update, headers=good)
            assert answer.status_code == 200 and answer.json() == {"ok": True}
        assert [m["content"] for m in await rig.inbound("c")] == ["via hook"]
        assert rig.fake.webhook is not None  # the reverse proxy in front of the daemon:
        rig.fake.webhook["url"] = f"{rig.url}/api/telegram/webhook"
        rig.fake.push(9, "pushed by the fake", from_id=9)  # POSTed with the secret header
        await until(lambda: len(rig.fake.webhook_sent) == 1, 5)
        rig.fake.redeliver()  # §13.3: the last updates POSTed again
        await until(lambda: len(rig.fake.webhook_sent) == 2, 5)
        contents = [m["content"] for m in await rig.inbound("c")]
        assert contents == ["via hook", "pushed by the fake"]
        garbage = await rig.http.post(path, content=b"<html>", headers=good)
        assert garbage.json() == {"ok": True, "state": "ignored"}
        no_id = await rig.http.post(path, json={"message": {}}, headers=good)
        assert no_id.json() == {"ok": True, "state": "ignored"}
        huge = b'{"update_id": 9, "pad": "' + b"x" * (1024 * 1024) + b'"}'
        too_big = await rig.http.post(
            path, content=huge, headers={**good, "Content-Type": "application/json"}
        )
        assert too_big.status_code == 413
        await until(lambda: len(rig.fake.texts(9)) == 2)
        metrics = (await rig.http.get("/metrics")).text
        assert "skydeck_telegram_webhook_rejected_total 2.0" in metrics
        rig.service.stop()
        stopping = await rig.http.post(path, json={**update, "update_id": 556}, headers=good)
        assert stopping.status_code == 503
        assert rig.fake.requests("getUpdates") == []


# -- T16-T20 ------------------------------------------------------------------------------


async def test_t16_t17_other_updates_ignored_media_noticed(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(8, "c")
        base = rig.fake.message(8, "x", from_id=8)
        rig.fake.push_kind("edited_message", base)
        rig.fake.push_kind("callback_query", {"id": "1", "from": base["from"]})
        rig.fake.push_kind("channel_post", base)
        service = rig.fake.message(8, None, from_id=8, new_chat_title="T")
        rig.fake.push_kind("message", service)
        photo = rig.fake.message(8, None, from_id=8, photo=[{"file_id": "f"}], caption="see")
        last = rig.fake.push_kind("message", photo)
        await until(lambda: rig.fake.texts(8))
        assert rig.fake.texts(8) == [unsupported_text("photo")]
        (notice,) = reply_params(rig, 8)
        assert notice["reply_parameters"]["message_id"] == photo["message_id"]
        await until(lambda: rig.fake.state()["confirmed_offset"] > last["update_id"])
        assert await rig.inbound("c") == []


async def test_t18_hostile_batches(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(3, "c")
        n = rig.fake.next_id
        valid = rig.fake.message(3, "one", from_id=3)
        rig.fake.push_raw({"update_id": n, "message": valid})
        rig.fake.push_raw({"update_id": n + 1, "message": "x"})
        rig.fake.push_raw({"update_id": n + 2})
        rig.fake.push_raw({"update_id": n + 3, "message": {**valid, "chat": "x"}})
        rig.fake.push_raw({"update_id": n + 4, "message": {**valid, "text": "a" * 100_000}})
        extra = {f"new_field_{i}": i for i in range(30)}
        two = rig.fake.message(3, "two", from_id=3)
        rig.fake.push_raw({"update_id": n + 5, "message": {**two, **extra}, **extra})
        await settled(rig, "c", 2)
        assert [m["content"] for m in await rig.inbound("c")] == ["one", "two"]
        await until(lambda: rig.fake.state()["confirmed_offset"] == n + 6, 5)
        # A batch with an element without an integer update_id is a failed poll (the
        # garbage and wrong-shape answers are the client's: test_t2_t18_unusable_answers).
        rig.fake.push_raw({"no": "id"})
        rig.fake.push(3, "still serving", from_id=3)
        await settled(rig, "c", 3)
        metrics = (await rig.http.get("/metrics")).text
        assert 'skydeck_telegram_polls_total{result="error"} 1.0' in metrics
        assert 'skydeck_telegram_updates_total{outcome="malformed"} 3.0' in metrics


async def test_t2_t18_unusable_answers_are_errors_naming_the_method(tmp_path: Path) -> None:
    """Garbage, a wrong shape, an HTML 502, a network cut: each a `TelegramError` with
    the method, status and description, and never the URL (it holds the token)."""
    from prometheus_client import CollectorRegistry

    from fake_telegram import FakeTelegram, serving
    from skydeck.transports.telegram import (
        TelegramClient,
        TelegramError,
        TelegramMetrics,
        load_config,
    )

    fake = FakeTelegram()
    async with serving(fake) as api_url:
        config = load_config(
            token=TOKEN, token_file=None, api_url=api_url + "/", mode=None, webhook_url=None,
            webhook_secret=None, poll_timeout_s=1.0, format=None, pairing=None, wait_s=1.0,
            misconfig_retry_s=1.0,
        )  # fmt: skip
        assert config is not None
        client = TelegramClient(config, TelegramMetrics(CollectorRegistry()))
        fake.fail("getUpdates", "garbage", "shape", "502html", "net", "429:7")
        seen = []
        for _ in range(5):
            with pytest.raises(TelegramError) as raised:
                await client.call("getUpdates", {"timeout": 0})
            seen.append((str(raised.value), raised.value.status, raised.value.retry_after))
            assert TOKEN not in str(raised.value) and api_url not in str(raised.value)
        assert seen == [
            ("getUpdates 200: not a JSON answer", None, None),
            ("getUpdates: answer of the wrong shape", None, None),
            ("getUpdates 502: not a JSON answer", 502, None),
            ("getUpdates: network error (RemoteProtocolError)", None, None),
            ("getUpdates 429: Too Many Requests: retry after 7", 429, 7.0),
        ]
        assert await client.call("getUpdates", {"timeout": 0}) == []
        assert fake.requests()[0]["http"] == "POST"
        await client.aclose()


async def test_t19_buffered_notice_once_then_answered(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.link(4, "later")
        rig.fake.push(4, "first", from_id=4)
        rig.fake.push(4, "second", from_id=4)
        await until(lambda: rig.fake.texts(4))
        await until(lambda: len(rig.fake.requests("getUpdates")) >= 3)
        assert rig.fake.texts(4) == [
            "No agent serves channel later right now; your message is kept and will be "
            "answered when one does."
        ]
        await rig.agent("later")
        await until(lambda: len(rig.fake.texts(4)) == 3)
        assert rig.fake.texts(4)[1:] == ["echo: first", "echo: second"]


async def test_t20_a_migrated_group_moves_its_link(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        rig.fake.chat(-500, "group")
        rig.fake.chat(-1009, "supergroup")
        await rig.link(-500, "c", trigger="all")
        rig.fake.fail("sendMessage", "400:migrate:-1009")
        rig.fake.push(-500, "hi", from_id=1)
        await until(lambda: rig.fake.texts(-1009))
        assert rig.fake.texts(-1009) == ["echo: hi"]
        (link,) = (await rig.api("GET", "/api/telegram/links"))["links"]
        assert link["id"] == "-1009" and link["chat_id"] == "-1009"
        rig.fake.push(-1009, "after", from_id=1)
        await settled(rig, "c", 2)


# -- commands, T21-T24 ----------------------------------------------------------------------


async def test_t21_t22_t23_t24_commands(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.link(6, "cmds")
        rig.fake.push(6, "/start", from_id=6)
        await until(lambda: rig.fake.texts(6))
        assert rig.fake.texts(6)[-1] == (
            "This chat talks to channel cmds; no agent serves it yet, so messages are kept "
            "until one does."
        )
        rig.fake.push(6, "/reset", from_id=6)
        rig.fake.push(6, "/status", from_id=6)
        await until(lambda: len(rig.fake.texts(6)) == 3)
        assert rig.fake.texts(6)[1:] == [
            "No agent serves channel cmds; there is nothing to reset.",
            "No agent serves channel cmds; 0 messages are kept for it.",
        ]
        sleeper = [sys.executable, "-c", "import time, sys; sys.stdin.read(); time.sleep(2.5)"]
        await rig.api(
            "POST",
            "/api/agents",
            {"name": "worker", "channel": "cmds", "backend": "command", "command": sleeper},
            201,
        )
        rig.fake.push(6, "/help@skydeck_test_bot", from_id=6)
        await until(lambda: len(rig.fake.texts(6)) == 4)
        assert rig.fake.texts(6)[-1] == (
            "This chat talks to channel cmds (agent worker).\n\nSend a message to talk to it. "
            "/reset starts a fresh conversation; /status shows what it is doing."
        )
        for text in ("/summarize this", "two", "three"):
            rig.fake.push(6, text, from_id=6)
        await until(lambda: len(rig.fake.requests("getUpdates")) > 2)
        await trio.sleep(0.3)
        rig.fake.push(6, "/status@other_bot", from_id=6)
        rig.fake.push(6, "/status", from_id=6)
        await until(lambda: len(rig.fake.texts(6)) == 5)
        assert rig.fake.texts(6)[-1] == "worker on cmds: queued (2 waiting)"
        assert (await rig.inbound("cmds"))[0]["content"] == "/summarize this"
        rig.fake.push(6, "/reset", from_id=6)
        await until(lambda: len(rig.fake.texts(6)) == 6)
        assert rig.fake.texts(6)[-1] == (
            "Session cleared: the next message starts a fresh conversation."
        )
        await rig.api("PATCH", "/api/agents/worker", {"mode": "multi-threaded"})
        rig.fake.push(6, "/reset", from_id=6)
        await until(lambda: len(rig.fake.texts(6)) == 7)
        assert rig.fake.texts(6)[-1] == (
            "Agent worker is multi-threaded: every message already starts a fresh conversation."
        )


async def test_t23_reset_is_the_agent_reset_route(tmp_path: Path) -> None:
    """/reset runs `Registry.reset` (as `POST /api/agents/{name}/reset` does): the
    stored session is gone, so the next turn starts a fresh one (the claude argv
    that follows from it is test_claude's R27 test)."""
    async with running(tmp_path) as rig:
        await rig.agent("e")
        await rig.link(15, "e")
        rig.fake.push(15, "one", from_id=15)
        await settled(rig, "e", 1)
        store = rig.service.store
        first = await store.get_session("e")
        assert first is not None
        rig.fake.push(15, "/reset", from_id=15)
        await until(lambda: len(rig.fake.texts(15)) == 2)
        assert await store.get_session("e") is None
        rig.fake.push(15, "two", from_id=15)
        await settled(rig, "e", 2)
        assert await store.get_session("e") not in (None, first)


async def test_t23_reset_starts_a_fresh_claude_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two turns of a single-threaded claude agent (the pinned CLI, the fake Anthropic
    API), `/reset`, a third: the third runs under a new session id, without history."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from fake_anthropic import FakeAnthropic

    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        (api.url,) = await nursery.start(serve, api.app(), config)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", api.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-key")
        async with running(tmp_path) as rig:
            await rig.api(
                "POST", "/api/agents", {"name": "cl", "channel": "cl", "backend": "claude"}, 201
            )
            await rig.link(17, "cl")
            for n, text in enumerate(("one", "two", "/reset", "three"), start=1):
                rig.fake.push(17, text, from_id=17)

                def answered(n: int = n) -> bool:
                    return len(rig.fake.texts(17)) == n

                await until(answered, 60)
            assert rig.fake.texts(17)[2] == (
                "Session cleared: the next message starts a fresh conversation."
            )
        nursery.cancel_scope.cancel()
    sessions = [h["x-claude-code-session-id"] for h in api.headers]
    assert sessions[0] == sessions[1] != sessions[-1]
    assert sessions[-1] not in sessions[:-1]


# -- outbound, T25-T30 ------------------------------------------------------------------------


async def test_t25_routing_by_origin_and_deliver(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("r")
        rig.fake.chat(-300, "group")
        await rig.link(31, "r")  # deliver all
        await rig.link(-300, "r", deliver="origin", trigger="all")
        rig.fake.push(31, "from A", from_id=31)
        await until(lambda: rig.fake.texts(31))
        await rig.api("POST", "/api/channels/r/messages", {"content": "from a job"})
        await until(lambda: len(rig.fake.texts(31)) == 2)
        rig.fake.push(-300, "from B", from_id=1)
        await until(lambda: rig.fake.texts(-300))
        await trio.sleep(0.3)
        assert rig.fake.texts(31) == ["echo: from A", "echo: from a job"]
        assert rig.fake.texts(-300) == ["echo: from B"]
        broadcast = reply_params(rig, 31)[1]
        assert "reply_parameters" not in broadcast


async def test_t25_t26_a_collect_turn_answers_each_origin_chat_once(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        script = "import sys, time; p = sys.stdin.read(); time.sleep(1); print('got', p.split())"
        body = {
            "name": "col",
            "channel": "col",
            "backend": "command",
            "command": [sys.executable, "-c", script],
            "queue_mode": "collect",
        }
        await rig.api("POST", "/api/agents", body, 201)
        await rig.link(41, "col")
        await rig.link(42, "col")
        rig.fake.push(41, "a1", from_id=41)
        await until(lambda: rig.fake.requests("sendChatAction", 41))
        b1 = rig.fake.push(42, "b1", from_id=42)
        a2 = rig.fake.push(41, "a2", from_id=41)
        await settled(rig, "col", 3, timeout=15)
        await until(lambda: len(rig.fake.texts(41)) == 2 and rig.fake.texts(42))
        assert rig.fake.texts(41) == ["got ['a1']", "got ['b1', 'a2']"]
        assert rig.fake.texts(42) == ["got ['b1', 'a2']"]
        last_a = reply_params(rig, 41)[1]["reply_parameters"]["message_id"]
        assert last_a == a2["message"]["message_id"]
        only_b = reply_params(rig, 42)[0]["reply_parameters"]["message_id"]
        assert only_b == b1["message"]["message_id"]


async def test_t26_t27_t28_long_reply_in_a_topic(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("long")
        rig.fake.chat(-400, "supergroup", is_forum=True)
        await rig.link(-400, "long", topic_id=7, trigger="all")
        code = "\n".join(f"x = {i} < {i + 1}" for i in range(700))
        text = "intro **bold**\n\n" + "word " * 900 + f"\n```py\n{code}\n```\nend"
        rig.fake.fail("sendMessage", "ok", "400:parse")
        rig.fake.scripted["sendmessage"] = ["400:parse"]
        rig.fake.push(-400, text, from_id=1, thread_id=7)
        await settled(rig, "long", 1)
        sends = reply_params(rig, -400)
        assert len(sends) >= 3
        assert all(p["message_thread_id"] == 7 for p in sends)
        assert "reply_parameters" in sends[0] and all(
            "reply_parameters" not in p for p in sends[1:]
        )
        assert "parse_mode" not in sends[0] and all(p["parse_mode"] == "HTML" for p in sends[1:])
        shown = rig.fake.texts(-400)
        assert all(len(t.encode("utf-16-le")) // 2 <= 4096 for t in shown)
        assert "".join(shown).replace("\n", "").replace(" ", "").count("x=699<700") == 1
        assert (await rig.inbound("long"))[0]["state"] == "done"
        metrics = (await rig.http.get("/metrics")).text
        assert "skydeck_telegram_plain_fallbacks_total 1.0" in metrics


async def test_t28_plain_format_never_sends_parse_mode(tmp_path: Path) -> None:
    async with running(tmp_path, telegram_format="plain") as rig:
        await rig.agent("p")
        await rig.link(19, "p")
        rig.fake.push(19, "**not bold** <b>", from_id=19)
        await until(lambda: rig.fake.texts(19))
        assert rig.fake.texts(19) == ["echo: **not bold** <b>"]
        assert all("parse_mode" not in params for params in reply_params(rig, 19))


async def test_t29_typing_while_the_turn_runs(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        sleeper = [
            sys.executable,
            "-c",
            "import time, sys; sys.stdin.read(); time.sleep(4.6); print('done')",
        ]
        body = {"name": "slow", "channel": "slow", "backend": "command", "command": sleeper}
        await rig.api("POST", "/api/agents", body, 201)
        await rig.link(12, "slow")
        rig.fake.push(12, "think", from_id=12)
        await settled(rig, "slow", 1, timeout=15)
        actions = rig.fake.requests("sendChatAction")
        (reply,) = rig.fake.requests("sendMessage")
        assert [a["params"] for a in actions] == [{"chat_id": 12, "action": "typing"}] * 2
        assert 3.5 <= actions[1]["at"] - actions[0]["at"] <= 4.5
        assert all(a["at"] < reply["at"] for a in actions)
        await rig.agent("quick")
        await rig.link(13, "quick")
        rig.fake.push(13, "fast", from_id=13)
        await settled(rig, "quick", 1)
        await trio.sleep(0.2)
        assert len(rig.fake.requests("sendChatAction", 13)) == 1


async def test_t30_the_failure_reply_is_delivered_threaded(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        failing = [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit('boom')"]
        body = {"name": "f", "channel": "f", "backend": "command", "command": failing}
        await rig.api("POST", "/api/agents", body, 201)
        await rig.link(14, "f")
        update = rig.fake.push(14, "try", from_id=14)
        await until(lambda: rig.fake.texts(14), timeout=10)
        (text,) = rig.fake.texts(14)
        assert text.startswith("⚠️ I couldn't complete that — the turn failed: ")
        assert "boom" in text and text.endswith(
            "\n\nThis is often temporary; please try again in a moment."
        )
        params = reply_params(rig, 14)[0]
        assert params["reply_parameters"]["message_id"] == update["message"]["message_id"]


# -- delivery, T32-T37 -----------------------------------------------------------------------


async def test_t32_t33_a_failing_chat_never_holds_up_another(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(21, "c")
        await rig.link(22, "c")
        rig.fake.fail("sendMessage", "502", "502")
        rig.fake.push(21, "a", from_id=21)
        await until(lambda: rig.fake.texts(21), timeout=5)
        tries = rig.fake.requests("sendMessage", 21)
        assert [t["code"] for t in tries] == [502, 502, 200]
        assert 0.2 <= tries[1]["at"] - tries[0]["at"] <= 0.45
        assert 0.45 <= tries[2]["at"] - tries[1]["at"] <= 0.75
        (message,) = await settled(rig, "c", 1)
        assert message["state"] == "done"
        threads = (await rig.api("GET", "/api/threads?channel=c"))["threads"]
        assert threads[-1]["status"] == "ok"
        rig.fake.block(21)  # A now fails for good; B goes on regardless
        rig.fake.push(21, "again", from_id=21)
        rig.fake.push(22, "b", from_id=22)
        await until(lambda: rig.fake.texts(22), timeout=5)


async def test_t34_429_pauses_every_send(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(23, "c")
        await rig.link(24, "c")
        rig.fake.fail("sendMessage", "429:2")
        rig.fake.push(23, "a", from_id=23)
        await until(lambda: rig.fake.requests("sendMessage"))
        rig.fake.push(24, "b", from_id=24)
        await until(lambda: rig.fake.texts(23) and rig.fake.texts(24), timeout=6)
        first, *rest = rig.fake.requests("sendMessage")
        assert first["code"] == 429
        assert all(r["at"] - first["at"] >= 1.7 for r in rest)
        metrics = (await rig.http.get("/metrics")).text
        assert "skydeck_telegram_rate_limited_seconds_total 2.0" in metrics


async def test_t35_401_pauses_sending_refuses_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(25, "c")
        rig.fake.fail("sendMessage", "401", "401")
        rig.fake.push(25, "x", from_id=25)
        await until(lambda: rig.fake.requests("sendMessage"))
        health = (await rig.health())["telegram"]
        assert health["send"] == "error" and health["last_error"] == "sendMessage 401: Unauthorized"
        await until(lambda: rig.fake.texts(25), timeout=5)
        assert (await rig.api("GET", "/api/telegram/outbox"))["items"] == []
        assert (await rig.health())["telegram"]["send"] == "ok"


async def test_t36_t37_blocked_chat_is_refused_r21_then_cleared(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(26, "c")
        await rig.link(27, "c")
        rig.fake.chat(27)  # a chat the bot knows, that never wrote
        rig.fake.block(26)
        rig.fake.push(26, "hello", from_id=26)
        (message,) = await settled(rig, "c", 1)
        assert message["state"] == "failed"
        reason = "telegram sendMessage 403: Forbidden: bot was blocked by the user"
        assert message["error"] == f"outbound write failed: {reason}"
        thread = (await rig.api("GET", "/api/threads?channel=c"))["threads"][-1]
        assert thread["status"] == "error"
        assert thread["output"] == (
            f"reply produced but NOT delivered (outbound write failed: {reason}). "
            "Undelivered reply text: echo: hello"
        )
        links = {
            link["id"]: link for link in (await rig.api("GET", "/api/telegram/links"))["links"]
        }
        assert links["26"]["blocked_at"] is not None
        items = (await rig.api("GET", "/api/telegram/outbox"))["items"]
        assert [i["state"] for i in items] == ["refused"] and "text" not in items[0]
        await rig.api("POST", "/api/channels/c/messages", {"content": "digest"})
        await until(lambda: rig.fake.texts(27))
        assert [r["code"] for r in rig.fake.requests("sendMessage", 26)] == [403]
        rig.fake.unblock(26)
        rig.fake.push(26, "back", from_id=26)
        await until(lambda: rig.fake.texts(26))
        links = {
            link["id"]: link for link in (await rig.api("GET", "/api/telegram/links"))["links"]
        }
        assert links["26"]["blocked_at"] is None
        metrics = (await rig.http.get("/metrics")).text
        assert 'skydeck_telegram_refused_total{code="403"} 1.0' in metrics


async def test_t37_still_pending_then_flipped_to_ok(tmp_path: Path) -> None:
    async with running(tmp_path, telegram_wait_s=1.0) as rig:
        await rig.agent("c")
        await rig.link(28, "c")
        rig.fake.fail("sendMessage", *["502"] * 6)  # two rounds of R20, then accepted
        rig.fake.push(28, "hi", from_id=28)
        (message,) = await settled(rig, "c", 1)
        assert message["state"] == "failed"
        assert message["error"].startswith(
            "outbound write failed: telegram sendMessage: not delivered within 1 s ("
        )
        assert message["error"].endswith("); still retrying")
        health = (await rig.health())["telegram"]
        assert health["send"] == "retrying" and health["outbox"] == 1
        assert health["last_error"] == "sendMessage 502: Bad Gateway"
        await until(lambda: rig.fake.texts(28), timeout=8)

        async def flipped() -> bool:
            got = await rig.api("GET", f"/api/messages/{message['id']}")
            return bool(got["state"] == "done")

        await until(flipped, 3)
        thread = (await rig.api("GET", "/api/threads?channel=c"))["threads"][-1]
        assert thread["status"] == "ok" and thread["output"] == "echo: hi"
        assert thread["turn_count"] == 1


# -- T40-T42 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"chat_id": "12a", "channel": "c"}, "chat_id"),
        ({"chat_id": "1" * 17, "channel": "c"}, "chat_id"),
        ({"chat_id": True, "channel": "c"}, "chat_id"),
        ({"chat_id": 1, "channel": "bad channel"}, "channel"),
        ({"chat_id": -1, "channel": "c", "topic_id": 0}, "topic_id"),
        ({"chat_id": -1, "channel": "c", "trigger": "some"}, "trigger"),
        ({"chat_id": 1, "channel": "c", "trigger": "mention"}, "trigger"),
        ({"chat_id": 1, "channel": "c", "deliver": "none"}, "deliver"),
        ({"chat_id": 1, "channel": "c", "allow_users": "42"}, "allow_users"),
        ({"chat_id": 1, "channel": "c", "allow_users": ["x"]}, "allow_users"),
        ({"chat_id": 1, "channel": "c", "allow_users": ["1"] * 1001}, "allow_users"),
        ({"chat_id": 1, "channel": "c", "colour": "red"}, "colour"),
    ],
)
async def test_t40_link_validation(tmp_path: Path, body: dict[str, Any], field: str) -> None:
    async with running(tmp_path) as rig:
        answer = await rig.api("POST", "/api/telegram/links", body, 400)
        assert answer["ok"] is False and answer["field"] == field


async def test_t40_patch_and_unknown_ids(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.link("-100123", "a")
        patched = await rig.api(
            "PATCH", "/api/telegram/links/-100123", {"channel": "b", "allow_users": [7]}
        )
        assert patched["channel"] == "b" and patched["allow_users"] == ["7"]
        await rig.api("PATCH", "/api/telegram/links/-100123", {"chat_id": 5}, 400)
        await rig.api("PATCH", "/api/telegram/links/42", {"channel": "b"}, 404)
        listed = await rig.api("GET", "/api/telegram/links?channel=b")
        assert [link["id"] for link in listed["links"]] == ["-100123"]


async def test_t41_t42_health_block_and_metrics(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(29, "c")
        rig.fake.push(29, "x", from_id=29)
        await until(lambda: rig.fake.texts(29))
        block = (await rig.health())["telegram"]
        assert set(block) == {
            "mode", "bot", "receive", "send", "last_ok_at", "last_error", "last_error_at",
            "paused_until", "outbox", "oldest_pending_s", "refused_24h", "links", "pairings",
        }  # fmt: skip
        assert block["receive"] == "ok" and block["send"] == "ok" and block["links"] == 1
        rig.fake.fail("sendMessage", "429:2")
        rig.fake.push(29, "y", from_id=29)
        await until(lambda: rig.fake.requests("sendMessage", 29)[-1]["code"] == 429)
        block = (await rig.health())["telegram"]
        assert block["send"] == "paused" and block["paused_until"] is not None
        await until(lambda: len(rig.fake.texts(29)) == 2, 5)
        metrics = (await rig.http.get("/metrics")).text
        for line in (
            'skydeck_telegram_updates_total{outcome="accepted"} 2.0',
            'skydeck_telegram_requests_total{code="200",method="sendMessage"} 2.0',
            'skydeck_telegram_parts_sent_total{kind="reply"} 2.0',
            "skydeck_telegram_outbox_depth 0.0",
            "skydeck_telegram_delivery_seconds_count 2.0",
        ):
            assert line in metrics, line
        rows = rig.service.telegram_rows
        assert rows is not None
        offset = rows.offset()
        assert f"skydeck_telegram_offset {float(offset or 0):.8e}".replace("e+0", "e+0") in metrics
        assert offset == FIRST_UPDATE_ID + 2


async def test_mcp_notify_reaches_the_deliver_all_links(tmp_path: Path) -> None:
    """mcp.md M17 through the mirror: a `notify` from an outside MCP caller is sent to
    the channel's `deliver: all` chats like a reply to a message from elsewhere."""
    async with running(tmp_path) as rig:
        await rig.agent("n")
        await rig.link(16, "n")
        rig.fake.chat(16)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t"},
            },
        }
        opened = await rig.http.post("/mcp/n", json=init, headers=headers)
        session = {**headers, "Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
        params = {"name": "notify", "arguments": {"content": "halfway **there**"}}
        body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
        called = await rig.http.post("/mcp/n", json=body, headers=session)
        assert called.status_code == 200 and called.json()["result"]["isError"] is False
        await until(lambda: rig.fake.texts(16))
        assert rig.fake.texts(16) == ["halfway there"]
        (params_sent,) = reply_params(rig, 16)
        assert params_sent["parse_mode"] == "HTML" and "reply_parameters" not in params_sent


async def test_t38_sigterm_stops_the_receiver_first(tmp_path: Path) -> None:
    async with running(tmp_path) as rig:
        await rig.agent("c")
        await rig.link(30, "c")
        await until(lambda: rig.fake.requests("getUpdates"))
        rig.service.stop()
        polls = len(rig.fake.requests("getUpdates"))
        rig.fake.push(30, "too late", from_id=30)
        await trio.sleep(1.5)
        assert len(rig.fake.requests("getUpdates")) == polls  # the poll in flight was the last
        assert rig.fake.state()["pending_updates"] == 1  # kept by Telegram for the next start


async def test_t1_no_token_no_telegram_but_links_work(tmp_path: Path) -> None:
    async with running(tmp_path, telegram_token=None) as rig:
        assert "telegram" not in await rig.health()
        await rig.link(1, "c")
        assert len((await rig.api("GET", "/api/telegram/links"))["links"]) == 1
        assert rig.fake.requests() == []
    assert TOKEN  # the fake's token was never needed
