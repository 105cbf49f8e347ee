"""The HTTP API against a real Hypercorn server on a loopback port."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from conftest import Daemon
from skydeck.turn import failure_reply_text


@pytest.fixture
def daemon(daemon_on_both: Daemon) -> Daemon:
    """multi-host.md §8: every test here runs on both stores."""
    return daemon_on_both


async def wait_done(client: httpx.AsyncClient, message_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            message: dict[str, Any] = (await client.get(f"/api/messages/{message_id}")).json()
            if message["state"] in ("done", "failed", "cancelled", "dropped"):
                return message
            await trio.sleep(0.02)


async def test_post_then_read_the_reply_over_real_http(daemon: Daemon) -> None:
    client = daemon.client
    health = (await client.get("/health")).json()
    owner: dict[str, str] = {}
    if daemon.service.pg is None:
        assert health.pop("store") == {"kind": "sqlite"}  # P26
    else:  # P26: the host's own part, and each agent's owner
        assert health.pop("store")["kind"] == "postgres"
        assert health.pop("host")["id"] == "h1"
        owner = {"owner": "h1"}
    assert health.pop("claude_warm")["processes"] == [], "no warm claude process yet"
    assert health.pop("sandbox")["default"] == "workspace", "bwrap works here (make test)"
    assert health == {
        "status": "ok",
        "agents": [
            {
                "name": "demo",
                "channel": "demo",
                "backend": "echo",
                "status": "idle",
                "queued": 0,
                **owner,
            }
        ],
        "buffered": 0,
    }
    ack = await client.post("/api/channels/demo/messages", json={"content": "hello"})
    assert ack.status_code == 200
    body = ack.json()
    assert body["ok"] is True and body["state"] == "queued"
    message = await wait_done(client, body["id"])
    reply = (await client.get(f"/api/messages/{message['reply_id']}")).json()
    assert reply["content"] == "echo: hello"
    assert (reply["direction"], reply["in_reply_to"]) == ("out", body["id"])
    threads = (await client.get("/api/threads", params={"channel": "demo"})).json()["threads"]
    assert [(t["status"], t["output"], t["turn_count"]) for t in threads] == [
        ("ok", "echo: hello", 1)
    ]


async def test_webhook_plain_and_vault_trigger_bodies(daemon: Daemon) -> None:
    client = daemon.client
    plain = await client.post(
        "/api/inbound",
        json={
            "channel": "demo",
            "content": "a",
            "id": "ext-1",
            "correlation_id": "c1",
            "reply_to": "boss",
            "delegation_depth": "2",
            "metadata": {"k": "v"},
        },
    )
    assert plain.json()["state"] == "queued"
    again = await client.post(
        "/api/inbound", json={"channel": "demo", "content": "a", "id": "ext-1"}
    )
    assert again.json() == {"ok": True, "id": plain.json()["id"], "state": "duplicate"}
    stored = await wait_done(client, plain.json()["id"])
    assert stored["metadata"] == {
        "k": "v",
        "reply_to": "boss",
        "correlation_id": "c1",
        "delegation_depth": "2",
    }
    trigger: dict[str, Any] = {
        "trigger": "channel_inbound_demo",
        "event": "created",
        "note": {
            "id": "2026-06-24-10-31-07-123004",
            "content": "from the vault",
            "path": "channel/demo/x",
            "tags": ["#agent/message", "#agent/message/inbound"],
            "metadata": {"agent": "demo", "direction": "inbound", "delegation_depth": "junk"},
        },
    }
    vault = await client.post("/api/vault/inbound", json=trigger)
    assert vault.status_code == 200
    assert set(vault.json()) == {"ok", "id", "state"}, "no content/metadata keys for the vault"
    outbound = dict(
        trigger,
        note={
            **trigger["note"],
            "id": "n2",
            "tags": ["#agent/message", "#agent/message/outbound"],
        },
    )
    ignored = await client.post("/api/vault/inbound", json=outbound)
    assert ignored.json() == {"ok": True, "state": "ignored"}
    done = await wait_done(client, vault.json()["id"])
    assert done["state"] == "done"


BAD_BODIES: list[tuple[str, bytes, str | None]] = [
    ("/api/inbound", b"{not json", None),
    ("/api/inbound", b"[1, 2]", None),
    ("/api/inbound", b'"text"', None),
    ("/api/inbound", b"\xff\xfe", None),
    ("/api/inbound", b'{"channel": "demo"}', "content"),
    ("/api/inbound", b'{"channel": "demo", "content": ""}', "content"),
    ("/api/inbound", b'{"channel": "demo", "content": 5}', "content"),
    ("/api/inbound", b'{"content": "hi"}', "channel"),
    ("/api/inbound", b'{"channel": "__proto__", "content": "hi"}', "channel"),
    ("/api/inbound", b'{"channel": "../x", "content": "hi"}', "channel"),
    ("/api/inbound", b'{"channel": "", "content": "hi"}', "channel"),
    ("/api/inbound", b'{"channel": " ", "content": "hi"}', "channel"),
    ("/api/inbound", ('{"channel": "%s", "content": "hi"}' % ("a" * 80)).encode(), "channel"),
    ("/api/inbound", b'{"channel": "demo", "content": "hi", "metadata": []}', "metadata"),
    ("/api/inbound", b'{"channel": "demo", "content": "hi", "reply_to": "a/b"}', "reply_to"),
    (
        "/api/inbound",
        b'{"channel": "demo", "content": "hi", "correlation_id": 7}',
        "correlation_id",
    ),
    (
        "/api/inbound",
        b'{"channel": "demo", "content": "hi", "delegation_depth": -1}',
        "delegation_depth",
    ),
    (
        "/api/inbound",
        b'{"channel": "demo", "content": "hi", "delegation_depth": "x"}',
        "delegation_depth",
    ),
    (
        "/api/inbound",
        b'{"channel": "demo", "content": "hi", "delegation_depth": true}',
        "delegation_depth",
    ),
    ("/api/inbound", b'{"channel": "demo", "content": "hi", "id": 5}', "id"),
    ("/api/inbound", b'{"channel": "demo", "content": "hi", "bogus": 1}', "bogus"),
    # T25: only the Telegram receiver may mark a message as a chat's (replies follow it)
    (
        "/api/inbound",
        b'{"channel": "demo", "content": "hi", "metadata": {"source": "telegram"}}',
        "metadata.source",
    ),
    (
        "/api/channels/demo/messages",
        b'{"content": "hi", "metadata": {"telegram_chat_id": "-100777"}}',
        "metadata.telegram_chat_id",
    ),
    ("/api/vault/inbound", b'{"note": []}', "note"),
    ("/api/vault/inbound", b'{"note": {"content": "x", "metadata": {"agent": "demo"}}}', "note.id"),
    ("/api/vault/inbound", b'{"note": {"id": "n", "content": "x", "metadata": {}}}', "channel"),
    ("/api/channels/demo/messages", b'{"channel": "demo", "content": "x"}', "channel"),
    ("/api/channels/__proto__/messages", b'{"content": "x"}', "channel"),
    ("/api/agents", b'{"name": "x"}', "channel"),
    ("/api/agents", b'{"name": "x", "channel": "y", "backend": "gpt"}', "backend"),
    ("/api/agents", b'{"name": "x", "channel": "y", "backend": "command"}', "command"),
    (
        "/api/agents",
        b'{"name": "x", "channel": "y", "backend": "command", "command": "ls"}',
        "command",
    ),
    ("/api/agents", b'{"name": "x", "channel": "y", "timeout_s": 0}', "timeout_s"),
    ("/api/agents", b'{"name": "x", "channel": "y", "timeout_s": "9"}', "timeout_s"),
    ("/api/agents", b'{"name": "x", "channel": "y", "env": {"A": 1}}', "env"),
    ("/api/agents", b'{"name": "x", "channel": "y", "mode": "both"}', "mode"),
    ("/api/agents", b'{"name": "x", "channel": "y", "colour": "red"}', "colour"),
    ("/api/agents", b'{"name": ".hidden", "channel": "y"}', "name"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_BODIES)
async def test_bad_input_is_a_clear_400_and_stores_nothing(
    daemon: Daemon, path: str, body: bytes, field: str | None
) -> None:
    before = daemon.count_rows(), daemon.count_rows("agents")
    response = await daemon.client.post(
        path, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    data = response.json()
    assert data["ok"] is False and isinstance(data["error"], str) and data["error"]
    assert data.get("field") == field
    assert (daemon.count_rows(), daemon.count_rows("agents")) == before


async def test_oversized_body_is_413_and_unknown_routes_404(daemon: Daemon) -> None:
    client = daemon.client
    big = json.dumps({"channel": "demo", "content": "x" * (1024 * 1024)})
    response = await client.post("/api/inbound", content=big)
    assert response.status_code == 413
    assert response.json()["ok"] is False
    assert daemon.count_rows() == 0
    for method, path, status in [
        ("GET", "/api/nope", 404),
        ("GET", "/api/messages/unknown-id", 404),
        ("GET", "/api/agents/ghost", 404),
        ("DELETE", "/api/agents/ghost", 404),
        ("POST", "/api/agents/ghost/reset", 404),
        ("PATCH", "/api/agents/ghost", 404),
        ("PUT", "/api/inbound", 405),
        ("GET", "/api/channels/a%2Fb/messages", 404),
        ("POST", "/api/channels/0%2F/messages", 404),  # found by the fuzzer: was a 308 in HTML
    ]:
        response = await client.request(method, path, json={})
        assert response.status_code == status, (method, path, response.text)
        assert response.json()["ok"] is False


async def test_agents_crud_and_conflicts(daemon: Daemon) -> None:
    client = daemon.client
    spec = {"name": "up", "channel": "up", "backend": "command", "command": ["tr", "a-z", "A-Z"]}
    created = await client.post("/api/agents", json=spec)
    assert created.status_code == 201
    assert created.json()["status"] == "idle" and created.json()["timeout_s"] == 900
    assert (await client.post("/api/agents", json=spec)).status_code == 409
    taken = await client.post("/api/agents", json={"name": "other", "channel": "up"})
    assert (taken.status_code, taken.json()["field"]) == (409, "channel")
    patched = await client.patch("/api/agents/up", json={"timeout_s": 60, "channel": "loud"})
    assert patched.status_code == 200
    assert (patched.json()["timeout_s"], patched.json()["channel"]) == (60, "loud")
    bad_patch = await client.patch("/api/agents/up", json={"name": "renamed"})
    assert (bad_patch.status_code, bad_patch.json()["field"]) == (400, "name")
    ack = (await client.post("/api/channels/loud/messages", json={"content": "hi"})).json()
    message = await wait_done(client, ack["id"])
    reply = (await client.get(f"/api/messages/{message['reply_id']}")).json()
    assert reply["content"] == "HI"
    assert (await client.post("/api/agents/up/reset")).json() == {"ok": True}
    names = [a["name"] for a in (await client.get("/api/agents")).json()["agents"]]
    assert names == ["demo", "up"]
    assert (await client.delete("/api/agents/up")).json() == {"ok": True}
    assert (await client.get("/api/agents/up")).status_code == 404
    parked = (await client.post("/api/channels/loud/messages", json={"content": "x"})).json()
    assert parked["state"] == "buffered"


async def test_failed_turn_reply_over_http(daemon: Daemon) -> None:
    client = daemon.client
    await client.post(
        "/api/agents",
        json={
            "name": "bad",
            "channel": "bad",
            "backend": "command",
            "command": ["sh", "-c", "echo broken >&2; exit 1"],
        },
    )
    ack = (await client.post("/api/channels/bad/messages", json={"content": "x"})).json()
    message = await wait_done(client, ack["id"])
    assert (message["state"], message["error"]) == ("failed", "broken")
    reply = (await client.get(f"/api/messages/{message['reply_id']}")).json()
    assert reply["content"] == failure_reply_text("broken")


async def test_transcript_over_1000_messages_pages_both_ways(daemon: Daemon) -> None:
    """Regression (parachute-agent 0.2.2): transcripts over 1,000 messages paged wrongly."""
    client = daemon.client
    for i in range(1050):
        await client.post("/api/channels/big/messages", json={"content": f"m{i}"})
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["after"] = cursor
        page = (await client.get("/api/channels/big/messages", params=params)).json()
        seen += [m["content"] for m in page["messages"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [f"m{i}" for i in range(1050)]
    back: list[str] = []
    page = (
        await client.get("/api/channels/big/messages", params={"tail": "true", "limit": 100})
    ).json()
    while True:
        back = [m["content"] for m in page["messages"]] + back
        if page["prev"] is None:
            break
        page = (
            await client.get(
                "/api/channels/big/messages", params={"before": page["prev"], "limit": 100}
            )
        ).json()
    assert back == seen
    bad_params: list[tuple[dict[str, Any], str]] = [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"after": "zzz"}, "after"),
        ({"before": "-1"}, "before"),
    ]
    for params, field in bad_params:
        bad = await client.get("/api/channels/big/messages", params=params)
        assert (bad.status_code, bad.json()["field"]) == (400, field)


async def test_token_guards_every_api_route_with_a_uniform_401(tmp_path: Any) -> None:
    from skydeck.service import Service, Settings

    service = Service(Settings(port=0, data_dir=tmp_path / "tok", token="s3cret-token"))
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).status_code == 200
            for headers in [
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "s3cret-token"},
                {"Authorization": "Basic s3cret-token"},
            ]:
                for method, path in [
                    ("GET", "/api/agents"),
                    ("POST", "/api/inbound"),
                    ("GET", "/api/messages/x"),
                    ("DELETE", "/api/agents/demo"),
                ]:
                    response = await client.request(method, path, headers=headers)
                    assert response.status_code == 401
                    assert response.json() == {"ok": False, "error": "unauthorized"}
            good = await client.get("/api/agents", headers={"Authorization": "Bearer s3cret-token"})
            assert good.status_code == 200
        service.stop()


async def test_batch_ingest_answers_each_item_in_order(daemon: Daemon) -> None:
    """Issue 13: POST /api/inbound/batch, one bad item fails only itself, R8 per item."""
    client = daemon.client
    items: list[object] = [
        {"channel": "demo", "content": "one", "id": "b-1"},
        {"channel": "demo", "content": ""},  # bad: empty content
        {"channel": "later", "content": "kept for later"},  # no agent: buffered
        {"channel": "demo", "content": "one again", "id": "b-1"},  # R8 within the batch
        "not an object",
        {"note": {"id": "n", "content": "x", "metadata": {"agent": "demo"}}},
        {"channel": "demo", "content": "two", "metadata": {"k": 1}},
    ]
    response = await client.post("/api/inbound/batch", json={"messages": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(items)
    assert results[0]["state"] == "queued" and results[3] == {
        "id": results[0]["id"],
        "state": "duplicate",
    }
    assert (results[1]["field"], results[1]["index"]) == ("content", 1)
    assert results[2]["state"] == "buffered"
    assert (results[4]["index"], results[4]["field"]) == (4, None)
    assert (results[5]["index"], results[5]["field"]) == (5, "note")
    assert results[6]["state"] == "queued"
    for result in (results[0], results[6]):
        message = await wait_done(client, result["id"])
        assert message["state"] == "done"
    contents = [
        m["content"]
        for m in (await client.get("/api/channels/demo/messages")).json()["messages"]
        if m["direction"] == "in"
    ]
    assert contents == ["one", "two"], "only the good, new items were stored"


async def test_batch_ingest_limits(daemon: Daemon) -> None:
    client = daemon.client
    too_many: dict[str, object] = {"messages": [{"channel": "demo", "content": "x"}] * 1001}
    bodies: list[dict[str, object]] = [
        {"messages": []},
        {"messages": "x"},
        too_many,
        {"messages": [], "x": 1},
    ]
    for body in bodies:
        response = await client.post("/api/inbound/batch", json=body)
        assert response.status_code == 400, body if len(str(body)) < 100 else "too many"
    big = {"messages": [{"channel": "demo", "content": "x" * 600_000}] * 2}
    assert (await client.post("/api/inbound/batch", json=big)).status_code == 413
    assert (await client.get("/api/channels/demo/messages")).json()["messages"] == []
