"""Auth on every route x {no token, bad token, expired JWT, wrong scope, good}."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from skydeck.auth import scope_for
from skydeck.service import Service, Settings

TOKEN = "static-token-0123456789"
SECRET = "jwt-secret-abcdefghijklmnopqrstuvwxyz"
UNAUTHORIZED = {"ok": False, "error": "unauthorized"}

#: Every route the app serves behind auth, with a concrete path.
ROUTES = [
    ("GET", "/api/agents"),
    ("POST", "/api/agents"),
    ("GET", "/api/agents/demo"),
    ("PATCH", "/api/agents/demo"),
    ("DELETE", "/api/agents/demo"),
    ("POST", "/api/agents/demo/reset"),
    ("POST", "/api/inbound"),
    ("POST", "/api/inbound/batch"),
    ("POST", "/api/vault/inbound"),
    ("POST", "/api/channels/demo/messages"),
    ("GET", "/api/channels/demo/messages"),
    ("GET", "/api/messages/some-id"),
    ("GET", "/api/threads"),
    ("GET", "/api/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/api/jobs"),
    ("POST", "/api/jobs"),
    ("GET", "/api/jobs/demo"),
    ("PATCH", "/api/jobs/demo"),
    ("DELETE", "/api/jobs/demo"),
    ("POST", "/api/jobs/demo/run"),
    # telegram.md T40: GET agent:read (pairings agent:admin), writes agent:admin
    ("GET", "/api/telegram/links"),
    ("POST", "/api/telegram/links"),
    ("PATCH", "/api/telegram/links/111"),
    ("DELETE", "/api/telegram/links/111"),
    ("GET", "/api/telegram/pairings"),
    ("POST", "/api/telegram/pair"),
    ("GET", "/api/telegram/outbox"),
]
#: Routes outside bearer auth: Telegram's webhook authenticates by its secret header (T14).
EXEMPT = {("POST", "/api/telegram/webhook")}


def token(scope: str, *, expires_in: float = 300) -> str:
    return jwt.encode({"scope": scope, "exp": int(time.time() + expires_in)}, SECRET, "HS256")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    service = Service(Settings(port=0, data_dir=tmp_path / "d", token=TOKEN, jwt_secret=SECRET))
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield http
        service.stop()


def test_every_served_route_is_in_the_table(tmp_path: Path) -> None:
    service = Service(Settings(port=0, data_dir=tmp_path))
    concrete = {"<channel>": "demo", "<name>": "demo", "<message_id>": "some-id", "<lid>": "111"}
    served = set()
    for rule in service.app.url_map.iter_rules():
        path = rule.rule
        if not (path.startswith("/api/") or path == "/metrics") or "turn-events" in path:
            continue  # the stream is checked on its own below
        for placeholder, value in concrete.items():
            path = path.replace(placeholder, value)
        served |= {(m, path) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    assert served == set(ROUTES) | EXEMPT
    service.store.close()


def test_t40_telegram_scopes() -> None:
    assert scope_for("GET", "/api/telegram/links") == "agent:read"
    assert scope_for("GET", "/api/telegram/outbox") == "agent:read"
    assert scope_for("GET", "/api/telegram/pairings") == "agent:admin"
    for method, path in (
        ("POST", "/api/telegram/links"),
        ("PATCH", "/api/telegram/links/1"),
        ("DELETE", "/api/telegram/links/1"),
        ("POST", "/api/telegram/pair"),
    ):
        assert scope_for(method, path) == "agent:admin"


async def test_t14_webhook_is_outside_bearer_auth(client: httpx.AsyncClient) -> None:
    """No bearer token needed (nor taken): without webhook mode the route is a 404, not a 401."""
    answer = await client.post("/api/telegram/webhook", json={"update_id": 1})
    assert answer.status_code == 404


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_route_auth_matrix(client: httpx.AsyncClient, method: str, path: str) -> None:
    needed = scope_for(method, path)
    wrong = next(
        s for s in ("agent:read", "agent:send", "agent:write", "agent:admin") if s != needed
    )
    cases: list[tuple[dict[str, str], int]] = [
        ({}, 401),
        ({"Authorization": "Bearer not-the-token"}, 401),
        ({"Authorization": f"Bearer {TOKEN}x"}, 401),
        ({"Authorization": f"Token {TOKEN}"}, 401),
        ({"Authorization": f"Bearer {token(needed, expires_in=-60)}"}, 401),
        (
            {
                "Authorization": "Bearer "
                + jwt.encode({"scope": needed}, "another-secret-of-thirty-two-bytes!", "HS256")
            },
            401,
        ),
        ({"Authorization": f"Bearer {token(wrong)}"}, 403),
    ]
    for headers, status in cases:
        response = await client.request(method, path, headers=headers, json={})
        assert response.status_code == status, (headers, response.text)
        if status == 401:
            assert response.json() == UNAUTHORIZED, "uniform: no hint which part failed"
    for good in (TOKEN, token(needed), token(f"agent:read {needed}")):
        response = await client.request(
            method, path, headers={"Authorization": f"Bearer {good}"}, json={}
        )
        assert response.status_code not in (401, 403), (good, response.text)


async def test_turn_events_stream_needs_read_scope(client: httpx.AsyncClient) -> None:
    path = "/api/channels/demo/turn-events"
    assert (await client.get(path)).status_code == 401
    forbidden = await client.get(path, headers={"Authorization": f"Bearer {token('agent:send')}"})
    assert forbidden.status_code == 403
    async with client.stream(
        "GET", path, headers={"Authorization": f"Bearer {token('agent:read')}"}
    ) as ok:
        assert ok.status_code == 200
        assert (await ok.aiter_lines().__anext__()).startswith(": subscribed")


async def test_health_is_open_and_content_free(client: httpx.AsyncClient) -> None:
    await client.post(
        "/api/channels/demo/messages",
        json={"content": "top secret plan"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    health = await client.get("/health")
    assert health.status_code == 200
    assert "top secret" not in health.text


def test_tokens_never_reach_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        service = Service(Settings(port=0, data_dir=tmp_path / "l", token=TOKEN, jwt_secret=SECRET))
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(service.run)
            async with httpx.AsyncClient(base_url=url) as http:
                for value in (TOKEN, "wrong", token("agent:read")):
                    await http.get("/api/agents", headers={"Authorization": f"Bearer {value}"})
            service.stop()

    caplog.set_level("DEBUG")
    trio.run(main)
    assert TOKEN not in caplog.text and SECRET not in caplog.text


def test_scopes_follow_the_route_not_the_path_text() -> None:
    """A job named `run` or `reset` is an ordinary job (review finding)."""
    from skydeck.auth import scope_for

    assert scope_for("PATCH", "/api/jobs/run") == "agent:write"
    assert scope_for("DELETE", "/api/jobs/run") == "agent:write"
    assert scope_for("GET", "/api/jobs/reset") == "agent:read"
    assert scope_for("POST", "/api/jobs/run/run") == "agent:send"
    assert scope_for("POST", "/api/agents/reset/reset") == "agent:admin"
    assert scope_for("DELETE", "/api/agents/reset") == "agent:write"
    assert scope_for("POST", "/api/channels/reset/messages") == "agent:send"
