"""The MCP endpoint's pure parts, in-process (mcp.md M4, M8, M24): sessions and
turn tokens under Trio's autojump clock, the claude argv, the init line's
server status, the turn's config file and the base URL."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from helpers import agent, running_registry
from skydeck.backends.claude import ClaudeBackend
from skydeck.backends.claude_stream import StreamParser
from skydeck.backends.claude_warm_protocol import servers_line
from skydeck.definitions import parse_definition
from skydeck.errors import InvalidNote
from skydeck.mcp.access import (
    SESSION_IDLE_S,
    TOKEN_GRACE_S,
    Caller,
    Sessions,
    TurnGrant,
    TurnTokens,
    digest,
)
from skydeck.mcp.tools import TOOLS, Invocation, Toolbox
from skydeck.mcp.wiring import base_url, prepare_dir, write_config
from skydeck.model import AgentSpec, ToolAccess, TurnSession
from skydeck.store.sqlite import SQLiteStore


def caller(channel: str = "c", credential: str = "a") -> Caller:
    return Caller(channel=channel, scopes=frozenset({"agent:read"}), credential=digest(credential))


async def test_m4_the_1001st_session_evicts_the_least_recently_used() -> None:
    sessions = Sessions()
    first, second = sessions.open(caller(), "2025-11-25"), sessions.open(caller(), "2025-11-25")
    for _ in range(998):
        sessions.open(caller(), "2025-11-25")
    assert sessions.find(first.id, caller()) is first  # now the most recently used
    sessions.open(caller(), "2025-11-25")
    assert len(sessions) == 1000
    assert sessions.find(second.id, caller()) is None, "the least recently used went"
    assert sessions.find(first.id, caller()) is first


async def test_m4_a_session_idle_for_30_minutes_expires(autojump_clock: trio.abc.Clock) -> None:
    sessions = Sessions()
    kept, idle = sessions.open(caller(), "2025-11-25"), sessions.open(caller(), "2025-11-25")
    await trio.sleep(SESSION_IDLE_S - 1)
    assert sessions.find(kept.id, caller()) is kept
    await trio.sleep(2)
    assert sessions.find(idle.id, caller()) is None
    assert sessions.find(kept.id, caller()) is kept, "each request restarts its idle time"


async def test_m4_a_session_is_bound_to_its_credential_and_channel() -> None:
    sessions = Sessions()
    session = sessions.open(caller(), "2025-06-18")
    assert sessions.find(session.id, caller(credential="b")) is None
    assert sessions.find(session.id, caller(channel="d")) is None
    assert sessions.find(session.id, caller()) is session


async def test_m8_a_turn_token_dies_at_revoke_or_timeout_plus_60_s(
    autojump_clock: trio.abc.Clock,
) -> None:
    tokens, sessions = TurnTokens(), Sessions()

    def mint() -> tuple[str, TurnGrant]:
        return tokens.mint(
            channel="c", agent="a", thread_id="t", message_id="m", depth=2, timeout_s=10
        )

    token, grant = mint()
    assert token.startswith("sdt_") and len(token) == 47
    assert tokens.find(token) is grant and tokens.find(token + "x") is None
    session = sessions.open(Caller("c", frozenset(), digest(token), grant), "2025-11-25")
    tokens.revoke(grant)
    sessions.end_grant(grant)
    assert tokens.find(token) is None
    assert sessions.find(session.id, Caller("c", frozenset(), digest(token), grant)) is None
    late, _ = mint()
    await trio.sleep(10 + TOKEN_GRACE_S - 0.5)
    assert tokens.find(late) is not None
    await trio.sleep(1)
    assert tokens.find(late) is None and len(tokens) == 0


def test_m24_the_argv_pins_the_mcp_flags() -> None:
    backend = ClaudeBackend("/bin/claude", Path("/w"))
    agent = AgentSpec(name="a", channel="a")
    access = ToolAccess(url="http://127.0.0.1:1/mcp/a", token="sdt_x", config=Path("/d/mcp/t.json"))
    argv = backend.argv(agent, "hi", TurnSession(id="s", resume=False), access)
    assert argv[argv.index("--mcp-config") + 1 :][:4] == [
        "/d/mcp/t.json",
        "--strict-mcp-config",
        "--allowedTools",
        "mcp__skydeck",
    ]
    assert argv[-2:] == ["--", "hi"]
    assert not any("sdt_" in arg for arg in argv), "M9: no token in an argv"
    off = backend.argv(AgentSpec(name="a", channel="a", mcp=False), "hi", TurnSession("s", False))
    assert off[off.index("--mcp-config") + 1] == '{"mcpServers": {}}'
    assert "--allowedTools" not in off


def test_w11_a_warm_process_gets_its_servers_by_control_request_not_argv() -> None:
    access = ToolAccess(url="http://127.0.0.1:1/mcp/a", token="sdt_secret")
    line = json.loads(servers_line({"skydeck": access.server}, "r1"))
    assert line == {
        "type": "control_request",
        "request_id": "r1",
        "request": {
            "subtype": "mcp_set_servers",
            "servers": {
                "skydeck": {
                    "type": "http",
                    "url": "http://127.0.0.1:1/mcp/a",
                    "headers": {"Authorization": "Bearer sdt_secret"},
                }
            },
        },
    }
    backend = ClaudeBackend("/bin/claude", Path("/w"))
    spec = backend.warm_spec(AgentSpec(name="a", channel="a"), TurnSession("s", False))
    assert "mcp__skydeck" in spec.argv and not any("sdt_" in arg for arg in spec.argv)
    assert "sdt_" not in repr(access), "never in a log line"


def test_m24_a_failed_skydeck_server_in_the_init_line_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    init = {
        "type": "system",
        "subtype": "init",
        "session_id": "s",
        "mcp_servers": [{"name": "skydeck", "status": "failed"}],
    }
    with caplog.at_level(logging.WARNING):
        assert StreamParser().feed(json.dumps(init)) == [("init", {"session_id": "s"})]
        connected = {**init, "mcp_servers": [{"name": "skydeck", "status": "connected"}]}
        StreamParser().feed(json.dumps(connected))
    warned = [r for r in caplog.records if r.getMessage() == "skydeck MCP server not connected"]
    assert len(warned) == 1 and warned[0].status == "failed"  # type: ignore[attr-defined]


def test_m9_the_config_file_is_0600_in_a_0700_directory_emptied_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "mcp"
    directory.mkdir(mode=0o755)
    (directory / "leftover.json").write_text("{}")
    prepare_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert list(directory.iterdir()) == []
    access = ToolAccess(url="http://127.0.0.1:1/mcp/a", token="sdt_t", config=directory / "t.json")
    old = os.umask(0)
    try:
        write_config(directory / "t.json", access)
    finally:
        os.umask(old)
    assert stat.S_IMODE((directory / "t.json").stat().st_mode) == 0o600
    assert json.loads((directory / "t.json").read_text()) == {
        "mcpServers": {"skydeck": access.server}
    }


def test_m24_the_base_url_is_the_first_bind_on_loopback() -> None:
    assert base_url("http://127.0.0.1:1941") == "http://127.0.0.1:1941"
    assert base_url("http://0.0.0.0:80") == "http://127.0.0.1:80"
    assert base_url("http://[::]:1941") == "http://[::1]:1941"
    assert base_url("http://[::1]:5") == "http://[::1]:5"


def test_m26_vault_definitions_carry_mcp_and_mcp_allow() -> None:
    def note(**metadata: str) -> dict[str, Any]:
        return {"id": "n1", "content": "", "metadata": {"name": "v", "backend": "echo", **metadata}}

    plain = parse_definition(note())
    assert plain.mcp is True and plain.mcp_allow is None
    off = parse_definition(note(mcp="false", mcp_allow="worker, other  lead"))
    assert off.mcp is False and off.mcp_allow == ["worker", "other", "lead"]
    with pytest.raises(InvalidNote, match="mcp_allow must be null or a list"):
        parse_definition(note(mcp_allow="a b .."))


class SlowFlushStore(SQLiteStore):
    """Commits take a while (a busy disk): a tool awaits them with other calls in flight."""

    async def flushed(self) -> None:
        await trio.sleep(0.01)
        await super().flushed()


async def test_m14_concurrent_posts_take_their_slots_before_awaiting(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """150 notifies of one turn at once: each takes its slot before it awaits the
    commit, so exactly 100 are stored and 50 refused (checking first and counting
    after the await let every one of them through)."""
    store = SlowFlushStore(tmp_path / "skydeck.db")
    async with running_registry(store, agents=[agent("lead")]) as registry:
        toolbox = Toolbox(registry, store, registry.events, None)
        _, grant = TurnTokens().mint(
            channel="lead", agent="lead", thread_id="t", message_id="m", depth=0, timeout_s=60
        )
        (notify,) = [tool for tool in TOOLS if tool.name == "notify"]
        scopes = frozenset({notify.scope})
        caller = Caller(channel="lead", scopes=scopes, credential="", grant=grant)
        results: list[dict[str, Any]] = []

        async def one() -> None:
            invocation = Invocation(caller=caller, version="2025-11-25")
            results.append(await toolbox.call(notify, invocation, {"content": "burst"}))

        async with trio.open_nursery() as nursery:
            for _ in range(150):
                nursery.start_soon(one)
        page = await store.list_messages("lead", limit=500)
    assert sum(1 for r in results if not r["isError"]) == 100
    assert grant.posts == 100
    assert sum(1 for m in page.messages if m.content == "burst") == 100
