"""A skydeck `Service` on a real socket talking to the fake Bot API on another
(both in the test's Trio run, real time), for the Telegram tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from fake_telegram import TOKEN, FakeTelegram, serving
from skydeck.service import Service, Settings

SECRET_PART = TOKEN.split(":", 1)[1]
#: T39: the only Bot API methods skydeck ever calls (checked after every rig test).
METHODS = {"getMe", "getUpdates", "sendMessage", "sendChatAction", "setWebhook", "deleteWebhook"}


@dataclass
class Rig:
    fake: FakeTelegram
    service: Service
    http: httpx.AsyncClient
    url: str

    async def api(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        answer = await self.http.request(method, path, json=body)
        assert answer.status_code == status, (answer.status_code, answer.text)
        return answer.json()

    async def agent(self, name: str, channel: str | None = None, **spec: Any) -> Any:
        body = {"name": name, "channel": channel or name, "backend": "echo", **spec}
        return await self.api("POST", "/api/agents", body, 201)

    async def link(self, chat_id: int | str, channel: str, **extra: Any) -> Any:
        body = {"chat_id": chat_id, "channel": channel, **extra}
        return await self.api("POST", "/api/telegram/links", body, 201)

    async def messages(self, channel: str) -> list[dict[str, Any]]:
        page = await self.api("GET", f"/api/channels/{channel}/messages?limit=500")
        return list(page["messages"])

    async def inbound(self, channel: str) -> list[dict[str, Any]]:
        return [m for m in await self.messages(channel) if m["direction"] == "in"]

    async def health(self) -> dict[str, Any]:
        return dict((await self.http.get("/health")).json())

    def sends(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.fake.requests("sendMessage", chat_id) if r["code"] == 200]


async def until(check: Callable[[], Any], timeout: float = 10, every: float = 0.02) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    with trio.fail_after(timeout):
        while True:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(every)


@asynccontextmanager
async def running(
    tmp_path: Path, fake: FakeTelegram | None = None, **settings: Any
) -> AsyncIterator[Rig]:
    fake = fake or FakeTelegram()
    async with serving(fake) as api_url, trio.open_nursery() as nursery:
        values: dict[str, Any] = {
            "port": 0,
            "data_dir": tmp_path / "data",
            "demo": False,
            "grace_s": 2.0,
            "telegram_token": TOKEN,
            "telegram_api_url": api_url,
            "telegram_poll_timeout_s": 1.0,
            "telegram_misconfig_retry_s": 1.0,
            "telegram_pairing": "off",
            **settings,
        }
        service = Service(Settings(**values))
        (url,) = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield Rig(fake, service, http, url)
        service.stop()  # service.run returns once it is down (R29)
    called = {request["method"] for request in fake.requests()}
    assert called <= METHODS, f"T39: called {called - METHODS}"
