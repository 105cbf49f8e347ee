"""T-a (mcp.md §5): skydeck's MCP endpoint against the official SDK client
(``mcp==1.30.0``) and raw httpx, with a real ``skydeck serve`` process.

The module's daemon has ``SKYDECK_TOKEN`` and ``SKYDECK_JWT_SECRET``; agents
``worker`` and ``other`` (echo) and ``lead`` (a command agent running
``tests/mcp_agent.py``, which calls the tools its prompt lists through the SDK
with the ``SKYDECK_MCP_URL``/``SKYDECK_MCP_TOKEN`` of its turn, M25). Each test
names the M rule it checks; tests that stop or kill a daemon start their own.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from daemon_process import DaemonProcess, cli
from skydeck.mcp.tools import TOOLS

if TYPE_CHECKING:
    from trio_typing import TaskStatus

TOKEN = "mcp-test-static-token-0123456789"
SECRET = "mcp-test-jwt-secret-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AGENT = str(Path(__file__).parent / "mcp_agent.py")
HEX32 = re.compile(r"[0-9a-f]{32}\Z")


def init_at(version: str) -> dict[str, Any]:
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t"}}
    return {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}


INIT = init_at("2025-11-25")


def jwt_for(scope: str, **claims: Any) -> str:
    return jwt.encode({"scope": scope, **claims}, SECRET, algorithm="HS256")


def start(data_dir: Path, *extra: str) -> DaemonProcess:
    env = {"SKYDECK_TOKEN": TOKEN, "SKYDECK_JWT_SECRET": SECRET, "SKYDECK_LOG_LEVEL": "INFO"}
    # Unsandboxed: the lead agent is the venv's Python with the MCP SDK, which a sandbox
    # does not see (test_sandbox_escape.py's T1 calls the endpoint from inside one).
    return DaemonProcess(data_dir, "--no-demo", "--sandbox", "off", *extra, env=env)


def add_agents(url: str, **lead: Any) -> None:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        for name in ("worker", "other"):
            http.post("/api/agents", json={"name": name, "channel": name, "backend": "echo"})
        body: dict[str, Any] = {"name": "lead", "channel": "lead", "backend": "command"}
        body["command"] = [sys.executable, AGENT]
        http.post("/api/agents", json={**body, **lead}).raise_for_status()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("mcp")
    daemon = start(root / "data")
    add_agents(daemon.url)
    yield daemon
    assert daemon.stop() == 0


@asynccontextmanager
async def sdk(
    url: str, channel: str, token: str | None = TOKEN
) -> AsyncIterator[tuple[ClientSession, str]]:
    """An initialized SDK session acting as ``channel``, and its session id."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(f"{url}/mcp/{channel}", http_client=http) as (read, write, sid),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        session_id = sid()
        assert session_id is not None
        yield session, session_id


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert result.structuredContent is not None
    assert result.isError is (not result.structuredContent["ok"])
    return result.structuredContent


async def error_of(session: ClientSession, tool: str, **arguments: Any) -> tuple[str, str | None]:
    """M11: an isError result's text and field (the text block equals the error)."""
    result = await session.call_tool(tool, arguments)
    assert result.isError is True
    body = result.structuredContent
    assert body is not None and body["ok"] is False
    assert result.content[0].text == body["error"]  # type: ignore[union-attr]
    return body["error"], body.get("field")


async def wait_done(http: httpx.AsyncClient, message_id: str, timeout: float = 20) -> Any:
    with trio.fail_after(timeout):
        while True:
            message = (await http.get(f"/api/messages/{message_id}")).json()
            if message["state"] in ("done", "failed", "cancelled"):
                return message
            await trio.sleep(0.05)


async def lead_turn(
    http: httpx.AsyncClient, calls: list[dict[str, Any]], channel: str = "lead", **body: Any
) -> tuple[dict[str, Any], list[Any]]:
    """Post ``calls`` to the command agent and return its message and results."""
    posted = await http.post(
        f"/api/channels/{channel}/messages", json={"content": json.dumps(calls), **body}
    )
    message = await wait_done(http, posted.json()["id"])
    assert message["state"] == "done", message
    reply = (await http.get(f"/api/messages/{message['reply_id']}")).json()
    return message, json.loads(reply["content"])


async def messages(http: httpx.AsyncClient, channel: str) -> list[dict[str, Any]]:
    page = await http.get(f"/api/channels/{channel}/messages", params={"limit": 500})
    return list(page.json()["messages"])


@pytest.fixture
async def http(daemon: DaemonProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as client:
        yield client


# -- 1. handshake ---------------------------------------------------------------


async def test_m7_handshake_and_the_eight_tools(daemon: DaemonProcess) -> None:
    headers = AUTH
    async with (
        httpx.AsyncClient(headers=headers) as client,
        streamable_http_client(f"{daemon.url}/mcp/lead", http_client=client) as (read, write, sid),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.protocolVersion == "2025-11-25"
        assert HEX32.match(sid() or "")
        assert init.serverInfo.name == "skydeck"
        assert init.instructions == (
            "These tools act through skydeck as channel lead. send_message hands work to "
            "another agent's channel; when that agent's turn ends, a [callback] message "
            "arrives on lead. notify posts progress on lead that people see at once; your "
            "final answer is still your normal reply."
        )
        assert init.capabilities.tools is not None and init.capabilities.tools.listChanged is False
        listed = await session.list_tools()
        assert [t.name for t in listed.tools] == [t.name for t in TOOLS]
        assert listed.nextCursor is None
        for got, spec in zip(listed.tools, TOOLS, strict=True):
            assert got.inputSchema == spec.input_schema
            assert got.description == spec.description
            assert got.outputSchema is None
        assert spec.input_schema["additionalProperties"] is False
        assert await session.send_ping() is not None


# -- 2. delegation ----------------------------------------------------------------


async def test_m15_delegation_round_trip_with_callback(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    before = len(await messages(http, "lead"))
    turn, (sent,) = await lead_turn(
        http, [{"tool": "send_message", "arguments": {"channel": "worker", "content": "job-m15"}}]
    )
    assert sent == {
        "ok": True,
        "id": sent["id"],
        "state": "queued",
        "channel": "worker",
        "delegation_depth": 1,
        "callback": True,
    }
    inbound = await wait_done(http, sent["id"])
    assert inbound["content"] == "job-m15"
    assert inbound["metadata"] == {
        "reply_to": "lead",
        "delegation_depth": 1,
        "sender_channel": "lead",
        "sender_thread": turn["thread_id"],
    }
    with trio.fail_after(20):
        while True:
            callbacks = [
                m
                for m in (await messages(http, "lead"))[before:]
                if m["direction"] == "in" and m["content"].startswith("[callback] worker")
            ]
            if callbacks:
                break
            await trio.sleep(0.05)
    (callback,) = callbacks
    assert callback["content"].startswith("[callback] worker finished (ok) — ")
    assert callback["metadata"]["source_message"] == inbound["reply_id"]
    async with sdk(daemon.url, "lead") as (session, _):
        got = await call(session, "get_message", id=callback["metadata"]["source_message"])
    assert got["message"]["content"] == "echo: job-m15"


# -- 3. depth, reach, cap, the error texts ------------------------------------------


async def test_m16_depth_limit_through_tools(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    send = [{"tool": "send_message", "arguments": {"channel": "worker", "content": "deep"}}]
    _, (sent,) = await lead_turn(http, send, delegation_depth=6)
    assert sent["delegation_depth"] == 7
    worker_msg = await wait_done(http, sent["id"])
    assert worker_msg["metadata"]["delegation_depth"] == 7
    with trio.fail_after(20):
        while not any(
            m["metadata"].get("source_message") == worker_msg["reply_id"]
            for m in await messages(http, "lead")
        ):
            await trio.sleep(0.05)
    callback = next(
        m
        for m in await messages(http, "lead")
        if m["metadata"].get("source_message") == worker_msg["reply_id"]
    )
    assert callback["metadata"]["delegation_depth"] == "8", "R23: the callback still comes"
    count = len(await messages(http, "worker"))
    _, (refused,) = await lead_turn(http, send, delegation_depth=7)
    assert refused == {
        "ok": False,
        "error": "delegation depth limit reached: a message sent from this turn would be at "
        "depth 8 (the limit is 7)",
    }
    _, (refused,) = await lead_turn(http, send, delegation_depth="8")
    assert "would be at depth 9 (the limit is 7)" in refused["error"]
    assert len(await messages(http, "worker")) == count, "nothing stored"


async def test_m12_reach_follows_mcp_allow(daemon: DaemonProcess, http: httpx.AsyncClient) -> None:
    for name, allow in (("narrow", ["worker"]), ("closed", [])):
        body = {"name": name, "channel": name, "backend": "echo", "mcp_allow": allow}
        assert (await http.post("/api/agents", json=body)).status_code == 201
    async with sdk(daemon.url, "narrow") as (session, _):
        assert (await call(session, "send_message", channel="worker", content="x"))["ok"]
        assert await error_of(session, "send_message", channel="other", content="x") == (
            "channel 'other' is not in this agent's mcp_allow list",
            "channel",
        )
        assert (await error_of(session, "read_messages", channel="other"))[1] == "channel"
        assert (await call(session, "read_messages"))["channel"] == "narrow", "own: readable"
        agents = {a["name"]: a for a in (await call(session, "list_agents"))["agents"]}
        assert agents["worker"]["reachable"] and not agents["other"]["reachable"]
        assert agents["narrow"]["self"] and not agents["narrow"]["reachable"]
    async with sdk(daemon.url, "closed") as (session, _):
        assert (await error_of(session, "send_message", channel="worker", content="x"))[1]
        agents = (await call(session, "list_agents"))["agents"]
        assert not any(a["reachable"] for a in agents)
    async with sdk(daemon.url, "mailbox-m12") as (session, _):  # no agent: reaches all
        assert (await call(session, "send_message", channel="other", content="x"))["ok"]


async def test_m14_one_turn_posts_at_most_100_times(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    notify = {"tool": "notify", "arguments": {"content": "tick"}}
    _, results = await lead_turn(http, [notify] * 101)
    assert all(r["ok"] for r in results[:100])
    assert results[100] == {
        "ok": False,
        "error": "this turn has already posted 100 times through skydeck tools (the per-turn "
        "limit)",
    }


async def test_m11_m15_m23_argument_and_tool_error_texts(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    r1 = (
        "must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter "
        "or digit"
    )
    cases: list[tuple[str, dict[str, Any], str, str | None]] = [
        (
            "send_message",
            {"channel": "worker", "content": "x", "colour": 1},
            "unknown field 'colour'",
            "colour",
        ),
        (
            "send_message",
            {"content": "x"},
            "channel is required and must be a non-empty string",
            "channel",
        ),
        (
            "send_message",
            {"channel": "worker"},
            "content is required and must be a non-empty string",
            "content",
        ),
        ("send_message", {"channel": "..", "content": "x"}, f"channel {r1}", "channel"),
        (
            "send_message",
            {"channel": "worker", "content": ""},
            "content is required and must be a non-empty string",
            "content",
        ),
        (
            "send_message",
            {"channel": "worker", "content": "x", "callback": "no"},
            "callback must be true or false",
            "callback",
        ),
        (
            "send_message",
            {"channel": "worker", "content": "x", "correlation_id": "c" * 201},
            "correlation_id must be a string of at most 200 characters",
            "correlation_id",
        ),
        (
            "send_message",
            {"channel": "errors", "content": "x"},
            "send_message cannot target your own channel 'errors'; use notify to post on it",
            "channel",
        ),
        (
            "send_message",
            {"channel": "nobody-here", "content": "x"},
            "no agent serves channel 'nobody-here'",
            "channel",
        ),
        ("notify", {}, "content is required and must be a non-empty string", "content"),
        ("read_messages", {"limit": 0}, "limit must be an integer from 1 to 100", "limit"),
        ("read_messages", {"limit": True}, "limit must be an integer from 1 to 100", "limit"),
        ("read_messages", {"before": 5}, "before must be a string", "before"),
        (
            "read_messages",
            {"before": "1", "after": "2"},
            "give after or before, not both",
            "before",
        ),
        ("read_messages", {"after": "zz"}, "cursor is not one this daemon handed out", "after"),
        ("get_message", {}, "id is required and must be a non-empty string", "id"),
        (
            "get_message",
            {"id": "nope"},
            "no message with id 'nope' on a channel you may read",
            "id",
        ),
        ("list_agents", {"x": 1}, "unknown field 'x'", "x"),
        ("schedule", {"content": "x"}, "give exactly one of cron, at and delay_s", "cron"),
        (
            "schedule",
            {"content": "x", "cron": "* * * * *", "delay_s": 5},
            "give exactly one of cron, at and delay_s",
            "cron",
        ),
        (
            "schedule",
            {"content": "x", "cron": "* * *"},
            "cron must be a 5-field cron expression, e.g. '*/5 * * * *'",
            "cron",
        ),
        (
            "schedule",
            {"content": "x", "cron": "0 0 31 2 *"},
            "cron never fires (no such date)",
            "cron",
        ),
        (
            "schedule",
            {"content": "x", "delay_s": 5, "timezone": "UTC"},
            "timezone is only used with cron",
            "timezone",
        ),
        (
            "schedule",
            {"content": "x", "cron": "* * * * *", "timezone": "Mars/Base"},
            "timezone must be an IANA zone name, e.g. Europe/Berlin",
            "timezone",
        ),
        (
            "schedule",
            {"content": "x", "at": "tomorrow"},
            "at must be an ISO 8601 time with an offset, e.g. 2026-12-24T18:00:00Z",
            "at",
        ),
        (
            "schedule",
            {"content": "x", "at": "2026-12-24T18:00:00"},
            "at must be an ISO 8601 time with an offset, e.g. 2026-12-24T18:00:00Z",
            "at",
        ),
        (
            "schedule",
            {"content": "x", "at": "2001-01-01T00:00:00Z"},
            "at must be in the future and at most 365 days ahead",
            "at",
        ),
        (
            "schedule",
            {"content": "x", "delay_s": 0},
            "delay_s must be an integer from 1 to 31536000",
            "delay_s",
        ),
        ("schedule", {"content": "x", "delay_s": 5, "name": "a b"}, f"name {r1}", "name"),
        (
            "cancel_job",
            {"name": "no-such-job"},
            "no job named 'no-such-job' on this channel",
            "name",
        ),
    ]
    async with sdk(daemon.url, "errors") as (session, _):
        for tool, arguments, text, field in cases:
            assert await error_of(session, tool, **arguments) == (text, field), (tool, arguments)
        await call(session, "schedule", content="x", delay_s=3600, name="errors-once")
        assert await error_of(session, "schedule", content="y", delay_s=5, name="errors-once") == (
            "a job named 'errors-once' already exists",
            "name",
        )
        assert (await call(session, "list_agents"))["ok"], "the session still works"


# -- 4. credentials and the wire -----------------------------------------------------


async def test_m10_credential_matrix(daemon: DaemonProcess) -> None:
    url = f"{daemon.url}/mcp/matrix"
    credentials: dict[str, tuple[str | None, int]] = {
        "none": (None, 401),
        "garbage": ("Bearer not-a-token", 401),
        "static": (f"Bearer {TOKEN}", 200),
        "jwt-read": (f"Bearer {jwt_for('agent:read')}", 200),
        "jwt-send": (f"Bearer {jwt_for('agent:read agent:send')}", 200),
        "jwt-no-read": (f"Bearer {jwt_for('agent:send')}", 403),
        "expired": (f"Bearer {jwt_for('agent:read', exp=int(time.time()) - 10)}", 401),
        "other-channel": (f"Bearer {jwt_for('agent:read', channel='elsewhere')}", 403),
        "own-channel": (f"Bearer {jwt_for('agent:read', channel='matrix')}", 200),
        "dead-turn-token": ("Bearer sdt_" + "x" * 43, 401),
    }
    async with httpx.AsyncClient(timeout=30) as http:
        for label, (authorization, status) in credentials.items():
            headers = {"Authorization": authorization} if authorization else {}
            answer = await http.post(url, json=INIT, headers=headers)
            assert answer.status_code == status, label
            if status == 401:
                assert answer.json() == {"ok": False, "error": "unauthorized"}
                assert answer.headers["WWW-Authenticate"] == 'Bearer realm="skydeck"'
        forbidden = await http.post(
            url, json=INIT, headers={"Authorization": credentials["other-channel"][0] or ""}
        )
        assert forbidden.json() == {
            "ok": False,
            "error": "this token is scoped to channel 'elsewhere'",
        }
        lacks = await http.post(
            url, json=INIT, headers={"Authorization": credentials["jwt-no-read"][0] or ""}
        )
        assert lacks.json() == {"ok": False, "error": "this token lacks the agent:read scope"}
    read_only = jwt_for("agent:read")
    async with sdk(daemon.url, "matrix", read_only) as (session, _):
        for tool, arguments in (
            ("send_message", {"channel": "worker", "content": "x"}),
            ("notify", {"content": "x"}),
        ):
            assert await error_of(session, tool, **arguments) == (
                "this token lacks the agent:send scope",
                None,
            )
        assert await error_of(session, "schedule", content="x", delay_s=60) == (
            "this token lacks the agent:write scope",
            None,
        )
        assert await error_of(session, "cancel_job", name="x") == (
            "this token lacks the agent:write scope",
            None,
        )
        for tool in ("read_messages", "list_agents", "list_jobs"):
            assert (await call(session, tool))["ok"]
    async with sdk(daemon.url, "matrix", jwt_for("agent:read agent:send")) as (session, _):
        assert (await call(session, "notify", content="allowed"))["ok"]


async def test_m8_turn_token_lives_only_during_its_turn(
    daemon: DaemonProcess, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    body = {
        "name": "holder",
        "channel": "holder",
        "backend": "command",
        "command": [sys.executable, AGENT],
        "env": {"SKYDECK_TEST_TOKEN_FILE": str(token_file)},
    }
    assert (await http.post("/api/agents", json=body)).status_code == 201
    calls = [{"tool": "list_agents", "arguments": {}, "sleep_s": 3}]
    posted = await http.post("/api/channels/holder/messages", json={"content": json.dumps(calls)})
    with trio.fail_after(20):
        while not token_file.exists() or not token_file.read_text():
            await trio.sleep(0.05)
    token = token_file.read_text()
    assert token.startswith("sdt_") and len(token) == 47
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as raw:
        elsewhere = await raw.post("/mcp/worker", json=INIT, headers=bearer)
        assert elsewhere.status_code == 403
        assert elsewhere.json()["error"] == "this token is scoped to channel 'holder'"
        assert (await raw.get("/api/agents", headers=bearer)).status_code == 401
        assert (await raw.post("/mcp/holder", json=INIT, headers=bearer)).status_code == 200
        message = await wait_done(http, posted.json()["id"])
        assert message["state"] == "done"
        after = await raw.post("/mcp/holder", json=INIT, headers=bearer)
        assert after.status_code == 401
        assert after.headers["WWW-Authenticate"] == 'Bearer realm="skydeck"'


async def rpc(
    http: httpx.AsyncClient,
    body: Any,
    *,
    session: str | None = None,
    channel: str = "wire",
    **headers: str,
) -> httpx.Response:
    sent = {**AUTH, **headers}
    if session is not None:
        sent["Mcp-Session-Id"] = session
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http.post(f"/mcp/{channel}", content=content, headers=sent)


async def test_m1_to_m6_the_wire_table(daemon: DaemonProcess) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
        for method in ("GET", "PUT"):
            answer = await http.request(method, "/mcp/wire", headers=AUTH)
            assert answer.status_code == 405, method
            assert answer.json() == {"ok": False, "error": "method not allowed on this route"}
            assert {m.strip() for m in answer.headers["Allow"].split(",")} == {"POST", "DELETE"}
        bad = await rpc(http, INIT, channel="..x")
        assert bad.status_code == 400 and bad.json()["field"] == "channel"
        cross = await rpc(http, INIT, Origin="http://evil.example")
        assert cross.status_code == 403
        assert cross.json() == {"ok": False, "error": "cross-origin MCP requests are refused"}
        assert (await rpc(http, INIT, Origin="null")).status_code == 403
        same = await rpc(http, INIT, Origin=f"http://{httpx.URL(daemon.url).netloc.decode()}")
        assert same.status_code == 200
        big = await rpc(http, b"{" + b" " * (1024 * 1024 + 10) + b"}")
        assert big.status_code == 413 and big.headers["Connection"] == "close"

    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
        for version in ("2025-11-25", "2025-06-18", "2025-03-26"):
            init = init_at(version)
            answer = await rpc(http, init, Accept="application/json")
            assert answer.status_code == 200
            assert answer.headers["Content-Type"].startswith("application/json")
            assert answer.json()["result"]["protocolVersion"] == version
        for version in ("2024-11-05", "2026-07-28", "x"):
            init = init_at(version)
            assert (await rpc(http, init)).json()["result"]["protocolVersion"] == "2025-11-25"
        opened = await rpc(http, INIT)
        session = opened.headers["Mcp-Session-Id"]
        assert HEX32.match(session)

        def row(
            answer: httpx.Response, status: int, code: int, message: str, id: Any = None
        ) -> None:
            assert answer.status_code == status, (answer.status_code, answer.text)
            assert answer.json() == {
                "jsonrpc": "2.0",
                "id": id,
                "error": {"code": code, "message": message},
            }, answer.text

        invalid = "invalid JSON-RPC message: "
        row(
            await rpc(http, b"", session=session),
            400,
            -32700,
            "parse error: the body is not valid JSON",
        )
        row(
            await rpc(http, b"{nope", session=session),
            400,
            -32700,
            "parse error: the body is not valid JSON",
        )
        row(
            await rpc(http, b"\xff\xfe", session=session),
            400,
            -32700,
            "parse error: the body is not valid JSON",
        )
        batch = "batch requests are not supported; send one JSON-RPC message per POST"
        row(await rpc(http, [], session=session), 400, -32600, batch)
        row(await rpc(http, [INIT], session=session), 400, -32600, batch)
        row(await rpc(http, 5, session=session), 400, -32600, invalid + "expected an object")
        row(
            await rpc(http, {"jsonrpc": "1.0", "id": 3, "method": "ping"}, session=session),
            400,
            -32600,
            invalid + 'jsonrpc must be "2.0"',
            3,
        )
        row(
            await rpc(http, {"jsonrpc": "2.0", "id": 3, "method": 7}, session=session),
            400,
            -32600,
            invalid + "method must be a string",
            3,
        )
        for bad_id in (None, True, 1.5):
            row(
                await rpc(
                    http, {"jsonrpc": "2.0", "id": bad_id, "method": "ping"}, session=session
                ),
                400,
                -32600,
                invalid + "id must be a string or an integer",
            )
        ping = {"jsonrpc": "2.0", "id": "p", "method": "ping"}
        row(
            await rpc(http, ping, session=session, **{"MCP-Protocol-Version": "2026-07-28"}),
            400,
            -32600,
            "unsupported MCP-Protocol-Version '2026-07-28'; supported: 2025-11-25, "
            "2025-06-18, 2025-03-26",
            "p",
        )
        row(
            await rpc(http, INIT, session=session),
            400,
            -32600,
            "initialize must not carry an Mcp-Session-Id header",
            1,
        )
        row(
            await rpc(http, ping),
            400,
            -32600,
            "Mcp-Session-Id header is required; send initialize first",
            "p",
        )
        row(
            await rpc(http, ping, session="0" * 32),
            404,
            -32600,
            "session not found; send initialize again",
            "p",
        )
        row(
            await rpc(http, ping, session=session, channel="wire2"),
            404,
            -32600,
            "session not found; send initialize again",
            "p",
        )
        other = {"Authorization": f"Bearer {jwt_for('agent:read')}"}
        row(
            await rpc(http, ping, session=session, **other),
            404,
            -32600,
            "session not found; send initialize again",
            "p",
        )
        row(
            await rpc(
                http, {"jsonrpc": "2.0", "id": 9, "method": "resources/list"}, session=session
            ),
            200,
            -32601,
            "method not found: resources/list",
            9,
        )
        row(
            await rpc(
                http, {"jsonrpc": "2.0", "id": 9, "method": "server/discover"}, session=session
            ),
            200,
            -32601,
            "method not found: server/discover",
            9,
        )
        row(
            await rpc(
                http, {"jsonrpc": "2.0", "id": 9, "method": "ping", "params": [1]}, session=session
            ),
            200,
            -32602,
            "params must be an object",
            9,
        )
        no_version = {"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {}}
        row(await rpc(http, no_version), 200, -32602, "params.protocolVersion must be a string", 2)
        tools_call = {"jsonrpc": "2.0", "id": 4, "method": "tools/call"}
        row(
            await rpc(http, {**tools_call, "params": {"name": 5}}, session=session),
            200,
            -32602,
            "params.name must be a string",
            4,
        )
        row(
            await rpc(
                http,
                {**tools_call, "params": {"name": "notify", "arguments": [1]}},
                session=session,
            ),
            200,
            -32602,
            "params.arguments must be an object",
            4,
        )
        row(
            await rpc(http, {**tools_call, "params": {"name": "rm_rf"}}, session=session),
            200,
            -32602,
            "Unknown tool: rm_rf",
            4,
        )
        # M2: notifications and client responses are 202 with an empty body.
        for message in (
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 5, "result": {}},
        ):
            answer = await rpc(http, message, session=session)
            assert answer.status_code == 202 and answer.content == b""
        pong = await rpc(http, ping, session=session)
        assert pong.json() == {"jsonrpc": "2.0", "id": "p", "result": {}}, "the session survives"
        # M4: DELETE ends it.
        assert (
            await http.delete("/mcp/wire", headers={**AUTH, "Mcp-Session-Id": session})
        ).status_code == 204
        assert (await rpc(http, ping, session=session)).status_code == 404
        assert (
            await http.delete("/mcp/wire", headers={**AUTH, "Mcp-Session-Id": session})
        ).status_code == 404
        assert (await http.delete("/mcp/wire", headers=AUTH)).status_code == 400


async def test_m11_a_2025_03_26_session_gets_no_structured_content(daemon: DaemonProcess) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
        init = init_at("2025-03-26")
        session = (await rpc(http, init)).headers["Mcp-Session-Id"]
        params = {"name": "list_jobs", "arguments": {}}
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        result = (await rpc(http, body, session=session)).json()["result"]
        assert "structuredContent" not in result
        assert json.loads(result["content"][0]["text"]) == {"ok": True, "jobs": []}
        assert result["isError"] is False


async def test_m13_the_same_tool_use_id_twice_stores_one_message(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    send = {
        "tool": "send_message",
        "arguments": {"channel": "other", "content": "once-m13", "callback": False},
        "meta": {"claudecode/toolUseId": "t1"},
    }
    _, (first, second) = await lead_turn(http, [send, send])
    assert (first["state"], second["state"]) == ("queued", "duplicate")
    assert first["id"] == second["id"] and first["callback"] is False
    stored = [m for m in await messages(http, "other") if m["content"] == "once-m13"]
    assert len(stored) == 1 and "reply_to" not in stored[0]["metadata"]


async def test_m17_m27_notify_event_transcript_metrics_and_log(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    events: list[dict[str, Any]] = []

    async def listen(task_status: TaskStatus[None]) -> None:
        async with http.stream("GET", "/api/channels/lead/turn-events") as stream:
            task_status.started()
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    calls = [{"tool": "notify", "arguments": {"content": "secret-progress-m17"}}]
    async with trio.open_nursery() as nursery:
        await nursery.start(listen)
        turn, (notified,) = await lead_turn(http, calls)
        with trio.fail_after(10):
            while not any(e["kind"] == "done" and e["message_id"] == turn["id"] for e in events):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    mine = [e for e in events if e["message_id"] == turn["id"]]
    kinds = [e["kind"] for e in mine]
    assert kinds.index("notify") < kinds.index("done")
    assert mine[kinds.index("notify")] == {
        "kind": "notify",
        "message_id": turn["id"],
        "id": notified["id"],
        "content": "secret-progress-m17",
    }
    transcript = await messages(http, "lead")
    ids = [m["id"] for m in transcript]
    assert ids.index(notified["id"]) < ids.index(turn["reply_id"]), "notify before the reply"
    note = transcript[ids.index(notified["id"])]
    assert note["direction"] == "out" and note["state"] == "done"
    assert note["metadata"] == {"notify": "true"}
    assert note["in_reply_to"] == turn["id"] and note["thread_id"] == turn["thread_id"]
    metrics = (await http.get("/metrics")).text
    assert re.search(r'skydeck_mcp_tool_calls_total\{outcome="ok",tool="notify"\} [1-9]', metrics)
    assert "skydeck_mcp_sessions" in metrics
    log = Path(daemon.log.name).read_text()
    assert 'msg="mcp tool call" channel=lead tool=notify outcome=ok' in log
    assert "secret-progress-m17" not in log


async def test_m18_m19_m20_reads(daemon: DaemonProcess, http: httpx.AsyncClient) -> None:
    for i in range(5):
        posted = await http.post("/api/channels/other/messages", json={"content": f"read-{i}"})
        await wait_done(http, posted.json()["id"])
    async with sdk(daemon.url, "reader") as (session, _):
        page = await call(session, "read_messages", channel="other", limit=3)
        api = (
            await http.get("/api/channels/other/messages", params={"limit": 3, "tail": "true"})
        ).json()
        assert page["messages"] == api["messages"] and page["prev"] == api["prev"]
        back = await call(session, "read_messages", channel="other", limit=3, before=page["prev"])
        api = (
            await http.get(
                "/api/channels/other/messages", params={"limit": 3, "before": api["prev"]}
            )
        ).json()
        assert back["messages"] == api["messages"] and back["next"] == api["next"]
        await call(session, "notify", content="y" * 9000)
        (long,) = (await call(session, "read_messages", limit=1))["messages"]
        assert long["truncated"] is True and long["content"] == "y" * 8000 + "…"
        answered = next(m for m in api["messages"] if m["direction"] == "in")
        got = await call(session, "get_message", id=answered["id"])
        assert got["reply"]["id"] == answered["reply_id"]
        agents = (await call(session, "list_agents"))["agents"]
        keys = {"name", "channel", "backend", "mode", "status", "queued", "self", "reachable"}
        assert all(set(agent) == keys for agent in agents)
        assert [a["name"] for a in agents] == sorted(a["name"] for a in agents)
    assert "SKYDECK_TEST_TOKEN_FILE" not in json.dumps(agents), "never env"


async def test_m21_m22_m23_schedule_list_cancel(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    api_job = {"name": "sched-api", "channel": "sched", "schedule": "0 0 1 1 *", "content": "x"}
    assert (await http.post("/api/jobs", json=api_job)).status_code == 201
    foreign = {**api_job, "name": "sched-foreign", "channel": "other"}
    assert (await http.post("/api/jobs", json=foreign)).status_code == 201
    async with sdk(daemon.url, "sched") as (session, _):
        made = (await call(session, "schedule", content="fire-m21", delay_s=1))["job"]
        assert made["name"].startswith("sched-") and made["source"] == "mcp:sched"
        assert made["run_at"] is not None and made["schedule"] is None
        cron = (
            await call(
                session,
                "schedule",
                content="c",
                cron="0 9 * * 1",
                timezone="Europe/Berlin",
                name="sched-cron",
            )
        )["job"]
        assert cron["schedule"] == "0 9 * * 1" and cron["timezone"] == "Europe/Berlin"
        listed = {j["name"]: j["cancellable"] for j in (await call(session, "list_jobs"))["jobs"]}
        assert listed == {"sched-api": False, made["name"]: True, "sched-cron": True}
        assert await error_of(session, "cancel_job", name="sched-api") == (
            "job 'sched-api' was not made through skydeck tools from this channel, so it cannot "
            "be cancelled here",
            "name",
        )
        assert (await error_of(session, "cancel_job", name="sched-foreign"))[0] == (
            "no job named 'sched-foreign' on this channel"
        )
        assert await call(session, "cancel_job", name="sched-cron") == {
            "ok": True,
            "name": "sched-cron",
        }
        with trio.fail_after(5):
            while not (
                fired := [m for m in await messages(http, "sched") if m["content"] == "fire-m21"]
            ):
                await trio.sleep(0.1)
        assert fired[0]["metadata"]["job"] == made["name"]
        job = (await http.get(f"/api/jobs/{made['name']}")).json()
        assert job["enabled"] is False and job["next_run_at"] is None
        for i in range(20):
            await call(session, "schedule", content="x", delay_s=3600, name=f"sched-fill-{i}")
        assert (await error_of(session, "schedule", content="x", delay_s=3600))[0] == (
            "this channel already has 20 enabled jobs made through skydeck tools; cancel one first"
        )


async def test_m28_a_scheduled_job_carries_the_turn_depth(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    calls = [{"tool": "schedule", "arguments": {"content": "later-m28", "delay_s": 1}}]
    _, (made,) = await lead_turn(http, calls, delegation_depth=2)
    assert made["job"]["delegation_depth"] == 2
    with trio.fail_after(5):
        while not (
            fired := [m for m in await messages(http, "lead") if m["content"] == "later-m28"]
        ):
            await trio.sleep(0.1)
    assert fired[0]["metadata"]["delegation_depth"] == 2
    assert set(fired[0]["metadata"]) == {"job", "slot", "delegation_depth"}


async def test_m26_agent_fields_are_validated_and_mcp_false_gets_no_token(
    daemon: DaemonProcess, http: httpx.AsyncClient
) -> None:
    for body, error in (
        ({"mcp": "yes"}, "mcp must be true or false"),
        ({"mcp_allow": "worker"}, "mcp_allow must be null or a list of at most 100 channel names"),
        ({"mcp_allow": [".."]}, "mcp_allow must be null or a list of at most 100 channel names"),
        (
            {"mcp_allow": ["a"] * 101},
            "mcp_allow must be null or a list of at most 100 channel names",
        ),
    ):
        answer = await http.post("/api/agents", json={"name": "bad", "channel": "bad", **body})
        assert answer.status_code == 400 and answer.json()["error"] == error
    plain = {"name": "plain", "channel": "plain", "backend": "command", "mcp": False}
    plain["command"] = [
        sys.executable,
        "-c",
        "import os; print(sorted(k for k in os.environ if 'MCP' in k))",
    ]
    created = (await http.post("/api/agents", json=plain)).json()
    assert created["mcp"] is False and created["mcp_allow"] is None
    posted = await http.post("/api/channels/plain/messages", json={"content": "x"})
    message = await wait_done(http, posted.json()["id"])
    reply = (await http.get(f"/api/messages/{message['reply_id']}")).json()
    assert reply["content"] == "[]"
    agent = (await http.get("/api/agents/lead")).json()
    assert agent["mcp"] is True and agent["mcp_allow"] is None
    added = await trio.to_thread.run_sync(
        lambda: cli(daemon.url, "--token", TOKEN, "agent", "add", "by-cli", "--channel", "by-cli",
                    "--backend", "echo", "--no-mcp", "--mcp-allow", "worker,other")
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    agent = (await http.get("/api/agents/by-cli")).json()
    assert agent["mcp"] is False and agent["mcp_allow"] == ["worker", "other"]


async def test_m28_post_api_jobs_takes_exactly_one_of_schedule_and_run_at(
    http: httpx.AsyncClient,
) -> None:
    base = {"name": "m28-api", "channel": "m28", "content": "x"}
    for extra in ({}, {"schedule": "* * * * *", "run_at": "2030-01-01T00:00:00Z"}):
        answer = await http.post("/api/jobs", json={**base, **extra})
        assert answer.status_code == 400
        assert answer.json() == {
            "ok": False,
            "error": "give exactly one of schedule and run_at",
            "field": "schedule",
        }
    for edge in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"):  # beyond UTC's range
        answer = await http.post("/api/jobs", json={**base, "run_at": edge})
        assert (answer.status_code, answer.json()["field"]) == (400, "run_at")
    made = await http.post("/api/jobs", json={**base, "run_at": "2030-01-01T01:00:00+01:00"})
    assert made.status_code == 201
    job = made.json()
    assert job["run_at"] == job["next_run_at"] == "2030-01-01T00:00:00Z", "stored as UTC"
    assert job["schedule"] is None and job["enabled"] is True and job["delegation_depth"] == 0


# -- daemons of their own -------------------------------------------------------------


async def test_m29_shutdown_refuses_send_message_and_stores_notify(tmp_path: Path) -> None:
    daemon = start(tmp_path / "data")
    add_agents(daemon.url)
    calls = [
        {
            "tool": "send_message",
            "arguments": {"channel": "worker", "content": "late"},
            "sleep_s": 1.5,
        },
        {"tool": "notify", "arguments": {"content": "still-here-m29"}},
    ]
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as http:
        posted = (
            await http.post("/api/channels/lead/messages", json={"content": json.dumps(calls)})
        ).json()
        with trio.fail_after(10):
            while (await http.get("/health")).json()["agents"][0]["status"] != "working":
                await trio.sleep(0.05)
    await trio.to_thread.run_sync(daemon.stop)
    with sqlite3.connect(tmp_path / "data" / "skydeck.db") as db:
        contents = [row[0] for row in db.execute("SELECT content FROM messages")]
        state, reply_id = db.execute(
            "SELECT state, reply_id FROM messages WHERE id = ?", (posted["id"],)
        ).fetchone()
        (reply_text,) = db.execute(
            "SELECT content FROM messages WHERE id = ?", (reply_id,)
        ).fetchone()
    assert state == "done"
    reply = json.loads(reply_text)
    assert reply[0] == {
        "ok": False,
        "error": "skydeck is shutting down; try again after it restarts",
    }
    assert reply[1]["ok"] is True
    assert "still-here-m29" in contents and "late" not in contents


async def test_m30_send_message_returns_while_the_target_waits_for_a_slot(tmp_path: Path) -> None:
    daemon = start(tmp_path / "data", "--max-turns", "1")
    try:
        add_agents(daemon.url)
        calls = [
            {"tool": "send_message", "arguments": {"channel": "worker", "content": "queued-m30"}}
        ]
        async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as http:
            _, (sent,) = await lead_turn(http, calls)
            assert sent["ok"] and sent["state"] == "queued"
            assert (await wait_done(http, sent["id"]))["state"] == "done"
    finally:
        daemon.stop()


async def test_m13_m28_m8_restart_keeps_writes_fires_once_and_forgets_tokens(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    daemon = start(data)
    add_agents(daemon.url)
    token_file = tmp_path / "token"
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as http:
        await http.patch(
            "/api/agents/lead", json={"env": {"SKYDECK_TEST_TOKEN_FILE": str(token_file)}}
        )
        # The killed turn runs again at start (at least once, M13): the tool-use id makes
        # its send a duplicate, the job's name its schedule a refusal.
        calls = [
            {
                "tool": "send_message",
                "arguments": {"channel": "other", "content": "kept-m13", "callback": False},
                "meta": {"claudecode/toolUseId": "k1"},
            },
            {
                "tool": "schedule",
                "arguments": {"content": "once-m28", "delay_s": 2, "name": "once-m28"},
            },
            {"tool": "list_agents", "arguments": {}, "sleep_s": 3},
        ]
        await http.post("/api/channels/lead/messages", json={"content": json.dumps(calls)})
        with trio.fail_after(20):
            while not (
                any(m["content"] == "kept-m13" for m in await messages(http, "other"))
                and (await http.get("/api/jobs")).json()["jobs"]
            ):
                await trio.sleep(0.05)
    token = token_file.read_text()
    daemon.kill()  # SIGKILL right after the tool results
    await trio.sleep(2.5)  # the one-shot's run_at passes while the daemon is down
    daemon = start(data)
    try:
        async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as http:
            kept = [m for m in await messages(http, "other") if m["content"] == "kept-m13"]
            assert len(kept) == 1
            assert (await wait_done(http, kept[0]["id"]))["state"] == "done", "its turn runs"
            with trio.fail_after(10):
                while not [m for m in await messages(http, "lead") if m["content"] == "once-m28"]:
                    await trio.sleep(0.1)
            (job,) = (await http.get("/api/jobs")).json()["jobs"]
            assert job["enabled"] is False
            old = await http.post(
                "/mcp/lead", json=INIT, headers={"Authorization": f"Bearer {token}"}
            )
            assert old.status_code == 401
    finally:
        daemon.stop()
    daemon = start(data)
    try:
        async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as http:
            await trio.sleep(0.5)
            fired = [m for m in await messages(http, "lead") if m["content"] == "once-m28"]
            assert len(fired) == 1, "a one-shot fires once, ever"
    finally:
        daemon.stop()
