"""Hypothesis against a real daemon process: every route, every body shape, and
``/mcp/{channel}`` with JSON-RPC messages, ids and MCP headers of every kind.
Zero 5xx, no crashed channel task (the daemon keeps serving every agent), and
a consistent store afterwards."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_process import DaemonProcess

ROUTES = [
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/metrics"),
    ("POST", "/api/inbound"),
    ("POST", "/api/inbound/batch"),
    ("POST", "/api/vault/inbound"),
    ("POST", "/api/channels/{}/messages"),
    ("GET", "/api/channels/{}/messages"),
    ("GET", "/api/messages/{}"),
    ("GET", "/api/threads"),
    ("GET", "/api/agents"),
    ("POST", "/api/agents"),
    ("GET", "/api/agents/{}"),
    ("PATCH", "/api/agents/{}"),
    ("DELETE", "/api/agents/{}"),
    ("POST", "/api/agents/{}/reset"),
    ("PUT", "/api/agents/{}"),
    ("GET", "/api/nope/{}"),
    ("GET", "/api/jobs"),
    ("POST", "/api/jobs"),
    ("GET", "/api/jobs/{}"),
    ("PATCH", "/api/jobs/{}"),
    ("DELETE", "/api/jobs/{}"),
    ("POST", "/api/jobs/{}/run"),
    ("POST", "/mcp/{}"),
    ("DELETE", "/mcp/{}"),
    ("GET", "/mcp/{}"),
]
FIELDS = [
    "channel",
    "content",
    "id",
    "reply_to",
    "correlation_id",
    "delegation_depth",
    "metadata",
    "name",
    "backend",
    "mode",
    "queue_mode",
    "model",
    "system_prompt",
    "command",
    "env",
    "timeout_s",
    "note",
    "trigger",
    "event",
]
NASTY = ["demo", "fz", "__proto__", "..", "a" * 80, "x y", "ü", "-", "0", "null", "%00"]

#: Values Python's `json` writes but strict JSON (RFC 8259) has no place for (issue 11, D6):
#: NaN/Infinity, integers past 64 bits, lone surrogates (json.dumps escapes them as \\udXXX).
unrepresentable = (
    st.sampled_from([math.nan, math.inf, -math.inf])
    | st.integers(min_value=2**63)
    | st.integers(max_value=-(2**63) - 1)
    | st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(NASTY)
    | unrepresentable,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
shaped = st.dictionaries(st.sampled_from(FIELDS), json_values | st.sampled_from(NASTY), max_size=6)
vault_note = st.fixed_dictionaries(
    {
        "note": st.fixed_dictionaries(
            {},
            optional={
                "id": json_values,
                "content": json_values,
                "tags": json_values,
                "metadata": st.dictionaries(
                    st.sampled_from(
                        ["agent", "channel", "reply_to", "delegation_depth", "direction"]
                    ),
                    json_values | st.sampled_from(NASTY),
                    max_size=4,
                ),
            },
        )
    }
)


def defuse(body: Any) -> Any:
    """Never let the fuzzer configure a real program to run: any command is a missing file."""
    if isinstance(body, dict) and isinstance(body.get("command"), list) and body["command"]:
        body = {**body, "command": ["/nonexistent/fuzz", *map(str, body["command"][1:])]}
    return body


bodies = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.just(b'{"content": "x", "metadata": {"n": ' + b"7" * 5000 + b"}}"),
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda d: json.dumps(defuse(d)).encode()),
    vault_note.map(lambda d: json.dumps(d).encode()),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "after", "before", "tail", "channel"]),
    st.text(max_size=8)
    | st.sampled_from(["0", "1", "500", "501", "-1", "true", "99999999999999999999"]),
    max_size=3,
)


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaemonProcess, httpx.Client]]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("fuzz") / "data")
    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        client.post("/api/agents", json={"name": "fz", "channel": "fz", "backend": "echo"})
        yield daemon, client
    assert daemon.stop() == 0


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(ROUTES),
    segment=st.sampled_from(NASTY) | st.text(min_size=1, max_size=12),
    body=bodies,
    query=queries,
    content_type=st.sampled_from(["application/json"] * 8 + ["text/plain", None]),
)
def test_fuzz_every_route_never_5xx(
    fuzzed: tuple[DaemonProcess, httpx.Client],
    route: tuple[str, str],
    segment: str,
    body: bytes | None,
    query: dict[str, str],
    content_type: str | None,
) -> None:
    _, client = fuzzed
    method, template = route
    path = template.format(quote(segment, safe=""))
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.request(method, path, content=body, params=query, headers=headers)
    assert response.status_code < 500, (method, path, body, response.text)
    # httpx resolves dot segments (`/mcp/..` is `/`): look at the path it sent.
    if response.request.url.path not in ("/metrics", "/") and response.content:
        data = strict_json(response.content)
        if response.status_code >= 400:
            assert_error(data)


def assert_error(data: Any) -> None:
    """skydeck's error shape, or (on /mcp past its HTTP checks) a JSON-RPC error object."""
    if "jsonrpc" in data:
        assert isinstance(data["error"]["code"], int) and data["error"]["message"], data
    else:
        assert data["ok"] is False and data["error"], data


#: mcp.md M6: JSON-RPC messages of every shape the table names, and tools/call of
#: every tool with arguments drawn from the tools' own fields.
MCP_METHODS = ["initialize", "ping", "tools/list", "tools/call", "notifications/initialized"]
MCP_METHODS += ["resources/list", "server/discover", "x"]
TOOL_NAMES = ["send_message", "notify", "read_messages", "get_message", "list_agents"]
TOOL_NAMES += ["schedule", "list_jobs", "cancel_job", "nope"]
TOOL_FIELDS = ["channel", "content", "callback", "correlation_id", "limit", "before", "after"]
TOOL_FIELDS += ["id", "cron", "timezone", "at", "delay_s", "name", "x"]
rpc_ids = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
tool_arguments = st.dictionaries(
    st.sampled_from(TOOL_FIELDS),
    json_values | st.sampled_from([*NASTY, "fz", "*/5 * * * *", "2030-01-01T00:00:00Z"]),
    max_size=4,
)
mcp_params = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "protocolVersion": st.sampled_from(["2025-11-25", "2025-03-26", "x"]) | json_values,
            "name": st.sampled_from(TOOL_NAMES) | json_values,
            "arguments": tool_arguments | json_values,
            "_meta": st.dictionaries(st.sampled_from(["claudecode/toolUseId"]), json_values),
        },
    ),
)
mcp_messages = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0"] * 6 + ["1.0"]) | json_values,
        "id": rpc_ids,
        "method": st.sampled_from(MCP_METHODS) | json_values,
        "params": mcp_params,
        "result": json_values,
    },
)
mcp_bodies = st.one_of(
    mcp_messages.map(lambda d: json.dumps(d).encode()),
    st.lists(mcp_messages, max_size=2).map(lambda d: json.dumps(d).encode()),
    bodies.filter(lambda b: b is not None),
)
header_values = st.sampled_from(["", "x", "2025-11-25", "2026-07-28", "null", "0" * 32])
header_values |= st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40
).map(str.strip)  # h11 sends no value with a space at either end


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["POST"] * 8 + ["DELETE", "GET"]),
    channel=st.sampled_from(["fz", "mcp-fuzz"] * 4 + NASTY),
    body=mcp_bodies,
    live_session=st.booleans(),
    headers=st.dictionaries(
        st.sampled_from(["Mcp-Session-Id", "MCP-Protocol-Version", "Origin", "Authorization"]),
        header_values,
        max_size=3,
    ),
)
def test_fuzz_mcp_never_5xx(
    fuzzed: tuple[DaemonProcess, httpx.Client],
    method: str,
    channel: str,
    body: bytes,
    live_session: bool,
    headers: dict[str, str],
) -> None:
    """mcp.md M6: bodies, headers and ids against ``/mcp/{channel}``, half of them in a
    live session: never a 5xx, every answer strict JSON (or empty: 202, 204)."""
    _, client = fuzzed
    path = f"/mcp/{quote(channel, safe='')}"
    if live_session and "Mcp-Session-Id" not in headers:
        params = {"protocolVersion": "2025-11-25"}
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
        opened = client.post(path, json=init)
        if opened.status_code == 200:
            headers = {**headers, "Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code < 500, (method, path, body, headers, response.text)
    if not response.request.url.path.startswith("/mcp/"):
        return  # `/mcp/..` resolves to `/` (the web UI) before it is sent
    if response.status_code in (202, 204):
        assert response.content == b""
        return
    data = strict_json(response.content)
    if response.status_code >= 400:
        assert_error(data)
    assert client.get("/health").status_code == 200


def strict_json(raw: bytes) -> Any:
    """What a browser's JSON.parse accepts: no NaN/Infinity, valid Unicode throughout."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in a response body")

    value = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    json.dumps(value, allow_nan=False).encode("utf-8")  # raises on a lone surrogate
    return value


def test_after_the_fuzz_every_agent_still_serves_and_the_store_is_consistent(
    fuzzed: tuple[DaemonProcess, httpx.Client],
) -> None:
    daemon, client = fuzzed
    assert daemon.proc.poll() is None, "the daemon is alive: no channel task crashed it"
    assert client.get("/health").status_code == 200
    client.post("/api/agents", json={"name": "fz", "channel": "fz", "backend": "echo"})
    agents = client.get("/api/agents").json()["agents"]
    for agent in agents:
        if agent["backend"] == "echo":
            ack = client.post(
                f"/api/channels/{agent['channel']}/messages", json={"content": "ping"}
            ).json()
            deadline = time.monotonic() + 30
            while client.get(f"/api/messages/{ack['id']}").json()["state"] != "done":
                assert time.monotonic() < deadline, f"agent {agent['name']} stopped serving"
                time.sleep(0.02)
    deadline = time.monotonic() + 60
    db_path = daemon.data_dir / "skydeck.db"
    while True:
        with sqlite3.connect(db_path) as db:
            working = db.execute(
                "SELECT COUNT(*) FROM messages WHERE state IN ('queued','working')"
            ).fetchone()[0]
            # A `notify` (mcp.md M17) is an outbound of its own, never a second reply.
            doubled = db.execute(
                "SELECT COUNT(*) FROM (SELECT in_reply_to FROM messages WHERE direction = 'out' "
                "AND json_extract(metadata, '$.notify') IS NULL "
                "GROUP BY in_reply_to HAVING COUNT(*) > 1)"
            ).fetchone()[0]
            orphan_done = db.execute(
                "SELECT COUNT(*) FROM messages m WHERE direction = 'in' AND state = 'done' "
                "AND reply_id IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM messages r WHERE r.id = m.reply_id)"
            ).fetchone()[0]
        if working == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (working, doubled, orphan_done) == (0, 0, 0)
    with sqlite3.connect(db_path) as db:
        channels = [row[0] for row in db.execute("SELECT DISTINCT channel FROM messages")]
    for channel in channels:  # D6: every stored transcript still reads as strict JSON
        page = client.get(f"/api/channels/{quote(channel, safe='')}/messages?limit=500")
        assert page.status_code == 200
        strict_json(page.content)
