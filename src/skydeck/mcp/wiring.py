"""Each turn's way to the tools (mcp.md M8, M9, M24, M25).

`TurnTools.open` is what a turn wraps its backend call in: for a ``claude`` or
``command`` agent with ``mcp`` on it mints the turn token, writes a claude
turn's config file, and yields the `ToolAccess` the backend passes on; when the
block ends (the backend returned, raised or was cancelled) the token dies, its
sessions end and the file is removed, before the turn writes its end record.

The token is in memory here, in the 0600 file a claude CLI reads, and in a
command's environment; never in an argv, a log line, a stored row or the
agent's workspace.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import trio

from ..model import AgentSpec, Message, ToolAccess
from ..store import Fence
from .access import Sessions, TurnTokens

#: The backends whose programs can be MCP clients (echo cannot).
TOOL_BACKENDS = ("claude", "command")


def base_url(bind: str) -> str:
    """M24: the daemon's first bind as a loopback URL clients on this host can reach."""
    parts = urlsplit(bind)
    host = parts.hostname or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{parts.port}" if parts.port else f"http://{host}"


def depth_of(messages: Sequence[Message]) -> int:
    """M8: D, the highest ``delegation_depth`` among a turn's messages (R23 coercion)."""
    return max((message.delegation_depth for message in messages), default=0)


def write_config(path: Path, access: ToolAccess) -> None:
    """The claude CLI's ``--mcp-config`` file, created 0600 (never readable by others,
    not even for a moment: the mode is set when the file is made)."""
    body = json.dumps({"mcpServers": {"skydeck": access.server}}).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, body)
    finally:
        os.close(fd)


def prepare_dir(directory: Path) -> None:
    """M9: ``<data dir>/mcp`` exists, is 0700, and holds no file from a killed daemon."""
    directory.mkdir(mode=0o700, exist_ok=True)
    directory.chmod(0o700)
    for leftover in directory.iterdir():
        leftover.unlink(missing_ok=True)


class TurnTools:
    """The turn side of the endpoint: tokens and config files around backend calls."""

    def __init__(
        self,
        tokens: TurnTokens,
        sessions: Sessions,
        config_dir: Path,
        *,
        sandboxed_base: Callable[[AgentSpec], str | None] | None = None,
    ) -> None:
        self.tokens = tokens
        self.sessions = sessions
        self.config_dir = config_dir
        #: sandbox.md S11: a sandboxed agent reaches the endpoint through its relay.
        self.sandboxed_base = sandboxed_base
        self.url: str | None = None
        self._listening = trio.Event()

    def listening(self, binds: Sequence[str]) -> None:
        """The HTTP server is up: turns that waited for its address go on (M24)."""
        self.url = base_url(binds[0])
        self._listening.set()

    @asynccontextmanager
    async def open(
        self, agent: AgentSpec, thread_id: str, messages: Sequence[Message], fence: Fence
    ) -> AsyncIterator[ToolAccess | None]:
        """The turn's access for the block, or None (no tools for this agent);
        its writes through the tools carry the turn's ``fence``."""
        if not agent.mcp or agent.backend not in TOOL_BACKENDS:
            yield None
            return
        await self._listening.wait()  # a turn replayed at start waits for the listener
        assert self.url is not None
        token, grant = self.tokens.mint(
            channel=agent.channel,
            agent=agent.name,
            thread_id=thread_id,
            message_id=messages[0].id,
            depth=depth_of(messages),
            timeout_s=agent.timeout_s,
            fence=fence,
        )
        config = self.config_dir / f"{thread_id}.json" if agent.backend == "claude" else None
        base = (self.sandboxed_base(agent) if self.sandboxed_base else None) or self.url
        access = ToolAccess(url=f"{base}/mcp/{agent.channel}", token=token, config=config)
        try:
            if config is not None:
                write_config(config, access)
            yield access
        finally:
            self.tokens.revoke(grant)
            self.sessions.end_grant(grant)  # M4: its sessions end with it
            if config is not None:
                config.unlink(missing_ok=True)
