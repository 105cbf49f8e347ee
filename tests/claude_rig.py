"""The claude test rig: the real pinned CLI (`make test` installs it) against the fake
Anthropic API on loopback, behind a real registry; warm or cold.

`tests/test_claude.py` runs each of its tests with warm mode on (the default) and
with ``SKYDECK_CLAUDE_WARM=off``; `tests/test_claude_warm.py` uses it for the W rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from fake_anthropic import FakeAnthropic
from helpers import make_store, post, running_registry, settle
from skydeck.backends.claude import ClaudeBackend, find_claude
from skydeck.backends.claude_warm import WarmConfig
from skydeck.model import AgentSpec, Message
from skydeck.registry import Registry
from skydeck.sandbox import Policy, Sandbox, bwrap_path, probe
from skydeck.store.sqlite import SQLiteStore

DAEMON_SECRET = "daemon-secret-7f3a"
API_KEY = "sk-ant-fake-key"


@dataclass
class Rig:
    api: FakeAnthropic
    store: SQLiteStore
    registry: Registry
    workspaces: Path
    backend: ClaudeBackend
    spawns: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    sandbox: Sandbox | None = None

    async def add(self, name: str, **kwargs: object) -> AgentSpec:
        spec = AgentSpec(name=name, channel=name, backend="claude", **kwargs)  # type: ignore[arg-type]
        return await self.registry.create(spec)

    async def turn(self, channel: str, prompt: str, timeout: float = 60) -> Message:
        """Post, and return once the turn has ended: its final event (R24) is out, which
        is one group commit after the store shows the message terminal."""
        with self.registry.events.subscribe(channel, buffer=-1) as events:
            message_id = await post(self.registry, channel, prompt)
            with trio.fail_after(timeout):
                async for event in events:
                    if event.message_id == message_id and event.kind in ("done", "error"):
                        break
        (message,) = await settle(self.store, [message_id], timeout)
        return message


@asynccontextmanager
async def claude_rig(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    warm: WarmConfig | None,
    *,
    retry_delays: Sequence[float] = (0.2, 0.4),
    sandbox: Policy | None = None,
) -> AsyncIterator[Rig]:
    """``sandbox``: run the backend with a `Sandbox` of that policy (real /usr/bin/bwrap,
    data dir ``tmp_path``); None: no sandboxing at all, as before."""
    executable = find_claude()
    assert executable is not None, "the pinned claude CLI is missing: `make test` installs it"
    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    spawns: list[str] = []
    fallbacks: list[str] = []
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve, api.app(), config)
        api.url = url
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
        monkeypatch.setenv("SKYDECK_TOKEN", DAEMON_SECRET)
        monkeypatch.setenv("SKYDECK_JWT_SECRET", DAEMON_SECRET)
        store = make_store(tmp_path)
        workspaces = tmp_path / "workspaces"
        boxes = None
        if sandbox is not None:
            boxes = Sandbox(sandbox, probe(bwrap_path(None)), data_dir=tmp_path)
        backend = ClaudeBackend(
            executable,
            workspaces,
            retry_delays=retry_delays,
            warm=warm,
            on_warm_spawn=spawns.append,
            on_cold_fallback=fallbacks.append,
            sandbox=boxes,
        )
        if backend.pool is not None:
            await nursery.start(backend.pool.run)
        async with running_registry(store, backends={"claude": backend}) as registry:
            yield Rig(api, store, registry, workspaces, backend, spawns, fallbacks, boxes)
        if backend.pool is not None:
            await backend.pool.close()
        if boxes is not None:
            await boxes.aclose()
        nursery.cancel_scope.cancel()


def claude_processes(workspace: Path) -> list[psutil.Process]:
    """Every process working in ``workspace`` (the reaper shim, the CLI, its tools)."""
    found = []
    for proc in psutil.process_iter(["cwd", "name"]):
        try:
            if proc.info["cwd"] and Path(proc.info["cwd"]) == workspace:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def cli_processes(workspace: Path) -> list[psutil.Process]:
    """The live ``claude`` CLIs working in ``workspace``: no shim, no zombie, and none of
    a CLI's own children (it forks helpers such as ``rg``; until they exec, they carry
    its name)."""
    named = []
    for proc in claude_processes(workspace):
        try:
            if proc.name() == "claude" and proc.status() != psutil.STATUS_ZOMBIE:
                named.append((proc, proc.ppid()))
        except psutil.Error:
            continue
    pids = {proc.pid for proc, _ in named}
    return [proc for proc, parent in named if parent not in pids]
