"""T-b (mcp.md §5): the real Claude Code CLI (the pinned 2.1.197) calls skydeck's
MCP tools, against the fake Anthropic API in this test process, behind a real
``skydeck serve`` with agent ``lead`` (claude) and ``worker`` (echo).

The delegation round trip runs warm (the default: the turn's server and token
reach the long-lived process by an ``mcp_set_servers`` control request) and
cold (``SKYDECK_CLAUDE_WARM=off``: a config file per turn). Each test names its M rule.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from claude_rig import cli_processes
from daemon_process import DaemonProcess
from fake_anthropic import FakeAnthropic, Step

if TYPE_CHECKING:
    from trio_typing import TaskStatus

SEND = ("mcp__skydeck__send_message", {"channel": "worker", "content": "summarise the logs"})


@dataclass
class Setup:
    api: FakeAnthropic
    daemon: DaemonProcess
    http: httpx.AsyncClient
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def workspace(self) -> Path:
        return self.daemon.data_dir / "workspaces" / "lead"

    async def post(self, content: str) -> str:
        posted = await self.http.post("/api/channels/lead/messages", json={"content": content})
        return str(posted.json()["id"])

    async def done(self, message_id: str, timeout: float = 60) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                message = (await self.http.get(f"/api/messages/{message_id}")).json()
                if message["state"] in ("done", "failed"):
                    return dict(message)
                await trio.sleep(0.05)

    async def transcript(self, channel: str = "lead") -> list[dict[str, Any]]:
        page = await self.http.get(f"/api/channels/{channel}/messages", params={"limit": 500})
        return list(page.json()["messages"])

    async def wait_for(self, predicate: Any, timeout: float = 60) -> None:
        with trio.fail_after(timeout):
            while not await predicate():
                await trio.sleep(0.05)


@asynccontextmanager
async def setup(tmp_path: Path, *, warm: str = "on", **lead: Any) -> AsyncIterator[Setup]:
    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve, api.app(), config)
        api.url = url
        env = {
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "SKYDECK_CLAUDE_WARM": warm,
            "SKYDECK_LOG_LEVEL": "INFO",
        }
        daemon = await trio.to_thread.run_sync(
            lambda: DaemonProcess(tmp_path / "data", "--no-demo", env=env)
        )
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
            ready = Setup(api, daemon, http)
            try:
                worker = {"name": "worker", "channel": "worker", "backend": "echo"}
                await http.post("/api/agents", json=worker)
                body = {"name": "lead", "channel": "lead", "backend": "claude", **lead}
                (await http.post("/api/agents", json=body)).raise_for_status()
                await nursery.start(listen, ready)
                yield ready
            finally:
                await trio.to_thread.run_sync(ready.daemon.stop)  # a test may restart it
                nursery.cancel_scope.cancel()


async def listen(setup: Setup, task_status: TaskStatus[None]) -> None:
    """The lead's SSE stream into ``setup.events``, until the daemon stops."""
    with contextlib.suppress(httpx.ReadError, httpx.RemoteProtocolError):
        async with setup.http.stream("GET", "/api/channels/lead/turn-events") as stream:
            task_status.started()
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    setup.events.append(json.loads(line[6:]))


def tool_results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        block
        for message in body["messages"]
        if isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_result"
    ]


def result_text(block: dict[str, Any]) -> str:
    inner = block["content"]
    return inner if isinstance(inner, str) else "".join(b.get("text", "") for b in inner)


@pytest.mark.parametrize("warm", ["on", "off"], ids=["warm", "cold"])
async def test_m15_m24_delegation_round_trip_through_the_cli(tmp_path: Path, warm: str) -> None:
    async with setup(tmp_path, warm=warm) as s:
        s.api.script(Step(tool=SEND), Step(text="delegated"), Step(text="got the callback"))
        first = await s.post("please delegate")
        assert (await s.done(first))["state"] == "done"
        tools = {t["name"] for t in s.api.requests[0]["tools"] if t["name"].startswith("mcp__")}
        assert tools == {
            f"mcp__skydeck__{name}"
            for name in (
                "send_message",
                "notify",
                "read_messages",
                "get_message",
                "list_agents",
                "schedule",
                "list_jobs",
                "cancel_job",
            )
        }
        (sent,) = tool_results(s.api.requests[1])
        assert not sent.get("is_error")
        answer = json.loads(result_text(sent))
        assert answer["ok"] is True and answer["channel"] == "worker" and answer["id"]
        worker = await s.done(answer["id"])
        reply = (await s.http.get(f"/api/messages/{worker['reply_id']}")).json()
        assert reply["content"] == "echo: summarise the logs"

        async def called_back() -> bool:
            return len(s.api.requests) >= 3 and (await s.transcript())[-1]["content"] == (
                "got the callback"
            )

        await s.wait_for(called_back)
        assert s.api.last_prompt().startswith("[callback] worker finished (ok)")
        callback = next(m for m in await s.transcript() if m["content"].startswith("[callback]"))
        assert callback["metadata"]["delegation_depth"] == "2"
        assert callback["metadata"]["source_message"] == worker["reply_id"]
        kinds = [(e["kind"], e.get("name")) for e in s.events if e["message_id"] == first]
        assert kinds.index(("tool", "mcp__skydeck__send_message")) < kinds.index(("done", None))


async def test_m17_notify_comes_before_the_reply(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.api.script(
            Step(tool=("mcp__skydeck__notify", {"content": "halfway"})), Step(text="all done")
        )
        first = await s.post("work on it")
        assert (await s.done(first))["state"] == "done"
        await s.wait_for(lambda: _has_done(s, first))
        mine = [e for e in s.events if e["message_id"] == first]
        kinds = [e["kind"] for e in mine]
        assert kinds.index("notify") < kinds.index("done")
        assert mine[kinds.index("notify")]["content"] == "halfway"
        contents = [m["content"] for m in await s.transcript()]
        assert contents == ["work on it", "halfway", "all done"]


async def _has_done(s: Setup, message_id: str) -> bool:
    return any(e["kind"] == "done" and e["message_id"] == message_id for e in s.events)


async def test_m9_the_token_is_only_in_the_config_file_and_only_during_the_turn(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path, warm="off") as s:
        hold = trio.Event()
        s.api.script(Step(text="held", hold=hold))
        first = await s.post("hold on")

        async def waiting() -> bool:
            return len(s.api.requests) >= 1

        await s.wait_for(waiting)
        (config,) = (s.daemon.data_dir / "mcp").iterdir()
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        server = json.loads(config.read_text())["mcpServers"]["skydeck"]
        assert server["type"] == "http" and server["url"].endswith("/mcp/lead")
        token = server["headers"]["Authorization"].removeprefix("Bearer ")
        assert token.startswith("sdt_") and len(token) == 47
        (cli,) = cli_processes(s.workspace)
        cmdline = cli.cmdline()
        assert cmdline[cmdline.index("--mcp-config") + 1] == str(config)
        assert not any(token in arg for arg in cmdline)
        assert token not in json.dumps(psutil.Process(cli.pid).environ())
        hold.set()
        assert (await s.done(first))["state"] == "done"
        assert list((s.daemon.data_dir / "mcp").iterdir()) == [], "removed at the turn's end"
        async with httpx.AsyncClient(base_url=s.daemon.url) as raw:
            dead = await raw.post(
                "/mcp/lead", json={}, headers={"Authorization": f"Bearer {token}"}
            )
            assert dead.status_code == 401
        for path in s.workspace.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path
    assert token not in Path(s.daemon.log.name).read_text()
    with sqlite3.connect(s.daemon.data_dir / "skydeck.db") as db:
        assert token not in "\n".join(db.iterdump())


async def test_m9_a_warm_process_never_has_the_token_in_its_argv(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        hold = trio.Event()
        s.api.script(Step(text="held", hold=hold))
        first = await s.post("hold on")
        await s.wait_for(lambda: _requests(s, 1))
        (config,) = (s.daemon.data_dir / "mcp").iterdir()
        token = json.loads(config.read_text())["mcpServers"]["skydeck"]["headers"]["Authorization"]
        (cli,) = cli_processes(s.workspace)
        cmdline = cli.cmdline()
        assert "--input-format" in cmdline, "the warm process"
        assert not any(token.removeprefix("Bearer ") in arg for arg in cmdline)
        assert cmdline[cmdline.index("--mcp-config") + 1] == '{"mcpServers": {}}'
        hold.set()
        assert (await s.done(first))["state"] == "done"


async def _requests(s: Setup, count: int) -> bool:
    return len(s.api.requests) >= count


async def test_m11_a_schema_invalid_call_reaches_the_model_as_an_error_result(
    tmp_path: Path,
) -> None:
    async with setup(tmp_path) as s:
        s.api.script(
            Step(tool=("mcp__skydeck__send_message", {"channel": "worker"})), Step(text="oops")
        )
        assert (await s.done(await s.post("send something")))["state"] == "done"
        (block,) = tool_results(s.api.requests[1])
        assert block.get("is_error") is True
        assert "content is required and must be a non-empty string" in result_text(block)
        assert [m["content"] for m in await s.transcript("worker")] == []


async def test_m26_mcp_false_gives_the_cli_no_skydeck_tools(tmp_path: Path) -> None:
    async with setup(tmp_path, mcp=False) as s:
        hold = trio.Event()
        s.api.script(Step(text="plain", hold=hold))
        first = await s.post("hello")
        await s.wait_for(lambda: _requests(s, 1))
        assert list((s.daemon.data_dir / "mcp").iterdir()) == [], "no token, no config"
        hold.set()
        assert (await s.done(first))["state"] == "done"
        assert not any(t["name"].startswith("mcp__") for t in s.api.requests[0].get("tools", []))


async def test_m24_a_turn_replayed_at_start_waits_for_the_listener_and_gets_the_tools(
    tmp_path: Path,
) -> None:
    """A claude turn killed mid-way runs again at the next start (R28), before the
    HTTP server listens; its CLI still gets the eight tools of a live endpoint."""
    async with setup(tmp_path, warm="off") as s:
        s.api.script(Step(stall=True))
        first = await s.post("replay me")
        await s.wait_for(lambda: _requests(s, 1))
        await trio.to_thread.run_sync(s.daemon.kill)
        s.api.script(Step(tool=("mcp__skydeck__list_agents", {})), Step(text="replayed"))
        env = {
            "ANTHROPIC_BASE_URL": s.api.url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "SKYDECK_CLAUDE_WARM": "off",
        }
        s.daemon = await trio.to_thread.run_sync(
            lambda: DaemonProcess(s.daemon.data_dir, "--no-demo", env=env)
        )
        async with httpx.AsyncClient(base_url=s.daemon.url, timeout=30) as http:
            s.http = http
            assert (await s.done(first))["state"] == "done"
            tools = {t["name"] for t in s.api.requests[-2]["tools"]}
            assert "mcp__skydeck__list_agents" in tools
            (listed,) = tool_results(s.api.requests[-1])
            assert not listed.get("is_error")
            assert json.loads(result_text(listed))["ok"] is True
