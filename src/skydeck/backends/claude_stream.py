"""The `claude -p --output-format stream-json` protocol, without any I/O.

Feed it stdout one line at a time; it returns the live events each line means
and keeps what the end of the turn needs (echoed session id, final answer,
usage, error facts). Kept apart from the process handling so it can be tested
on recorded lines, garbage included (the hypercorn way: protocol logic
separate from I/O). Field facts: ``shared/spec/claude-cli.md`` §3-§5.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..model import DEFAULT_MAX_REPLY_BYTES
from .base import EventKind
from .output import MAX_LINE_BYTES, cut_reply, human_size

log = logging.getLogger(__name__)

RESUME_NOT_FOUND = "No conversation found with session ID"


@dataclass(slots=True)
class StreamOutcome:
    """What the stream said about the turn, once it ended.

    The answer's text is kept up to ``max_reply_bytes`` (`keep_text`): a
    model that writes without end costs the cap, not its output.
    """

    session_id: str | None = None
    result: dict[str, Any] | None = None
    final_text: list[str] = field(default_factory=list)
    skipped_lines: int = 0
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    text_bytes: int = 0
    cut: bool = False

    def keep_text(self, text: str) -> str | None:
        """Add a text block to the answer: what of it was kept, None once the cap is full."""
        if self.cut:
            return None
        room = self.max_reply_bytes - self.text_bytes
        encoded = text.encode()
        if len(encoded) > room:
            self.cut = True
            encoded = encoded[:room]
            text = encoded.decode(errors="ignore")
        self.final_text.append(text)
        self.text_bytes += len(encoded)
        return text

    def clear_text(self) -> None:
        """A tool result came: the answer is only what follows it."""
        self.final_text.clear()
        self.text_bytes = 0
        self.cut = False

    @property
    def ok(self) -> bool:
        """Success needs a `result` line with ``is_error: false``; exit 0 alone is not enough."""
        return self.result is not None and self.result.get("is_error") is False

    @property
    def reply(self) -> str:
        """The full final answer: the text blocks after the last tool result.

        ``result.result`` holds only the last text block, so it is the fallback.
        Either way at most ``max_reply_bytes``, marker included.
        """
        if self.final_text:
            return cut_reply("\n\n".join(self.final_text), self.max_reply_bytes, cut=self.cut)
        text = (self.result or {}).get("result")
        return cut_reply(text, self.max_reply_bytes) if isinstance(text, str) else ""

    @property
    def api_status(self) -> int | None:
        status = (self.result or {}).get("api_error_status")
        return status if isinstance(status, int) and not isinstance(status, bool) else None

    @property
    def errors(self) -> list[str]:
        errors = (self.result or {}).get("errors")
        return [e for e in errors if isinstance(e, str)] if isinstance(errors, list) else []

    @property
    def resume_not_found(self) -> bool:
        return any(e.startswith(RESUME_NOT_FOUND) for e in self.errors)

    @property
    def error_text(self) -> str:
        """A readable sentence for a failed result."""
        text = (self.result or {}).get("result")
        if isinstance(text, str) and text.strip():
            return text.strip()
        if self.errors:
            return "; ".join(self.errors)
        subtype = (self.result or {}).get("subtype", "unknown")
        return f"claude ended the turn with an error ({subtype})"

    @property
    def usage(self) -> dict[str, Any] | None:
        if self.result is None:
            return None
        raw = self.result.get("usage")
        usage: dict[str, Any] = {}
        if isinstance(raw, dict):
            for key in (
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            ):
                if isinstance(raw.get(key), int):
                    usage[key] = raw[key]
        cost = self.result.get("total_cost_usd")
        # A NaN or 1e400 from the stream (json.loads takes both) would make every
        # later page of thread records invalid JSON (issue 11, D6): finite only.
        if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost):
            usage["cost_usd"] = cost
        return usage or None


def skydeck_server_status(init: dict[str, Any]) -> str | None:
    """The status the init line gives the ``skydeck`` MCP server, None when it lists none."""
    servers = init.get("mcp_servers")
    for server in servers if isinstance(servers, list) else ():
        if isinstance(server, dict) and server.get("name") == "skydeck":
            status = server.get("status")
            return status if isinstance(status, str) else "unknown"
    return None


class StreamParser:
    def __init__(self, *, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self.outcome = StreamOutcome(max_reply_bytes=max_reply_bytes)

    def feed(self, line: bytes | str) -> list[tuple[EventKind, dict[str, Any]]]:
        """One stdout line -> the live events it carries. Bad lines are logged and skipped."""
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        if not text.strip():
            return []
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            return self._skip("not JSON", text)
        if not isinstance(message, dict):
            return self._skip("not an object", text)
        return self.feed_message(message)

    def feed_message(self, message: dict[str, Any]) -> list[tuple[EventKind, dict[str, Any]]]:
        """One stdout line already parsed (the warm protocol parses it to judge it first)."""
        session = message.get("session_id")
        if isinstance(session, str) and session and self.outcome.session_id is None:
            self.outcome.session_id = session
        kind = message.get("type")
        if kind == "system" and message.get("subtype") == "init":
            status = skydeck_server_status(message)
            if status not in (None, "connected"):
                # mcp.md M24: the turn goes on without the tools.
                log.warning("skydeck MCP server not connected", extra={"status": status})
            return [("init", {"session_id": session})] if isinstance(session, str) else []
        if kind == "assistant":
            return self._assistant(message)
        if kind == "user":
            self._user(message)
            return []
        if kind == "result":
            self.outcome.result = message
            if isinstance(session, str) and session:
                self.outcome.session_id = session
        return []

    def overlong(self, size: int) -> list[tuple[EventKind, dict[str, Any]]]:
        """A line over `output.MAX_LINE_BYTES`, dropped unread: a bad line like any other."""
        return self._skip(f"longer than {human_size(MAX_LINE_BYTES)} ({size} bytes)", "")

    def _skip(self, why: str, text: str) -> list[tuple[EventKind, dict[str, Any]]]:
        self.outcome.skipped_lines += 1
        log.warning("skipped a claude output line", extra={"why": why, "line": text[:200]})
        return []

    def _blocks(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        inner = message.get("message")
        content = inner.get("content") if isinstance(inner, dict) else None
        if not isinstance(content, list):
            return []
        return [block for block in content if isinstance(block, dict)]

    def _assistant(self, message: dict[str, Any]) -> list[tuple[EventKind, dict[str, Any]]]:
        events: list[tuple[EventKind, dict[str, Any]]] = []
        if message.get("parent_tool_use_id"):
            return events  # a sub-agent's chatter is not this turn's answer
        for block in self._blocks(message):
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                kept = self.outcome.keep_text(block["text"])
                if kept is not None:
                    events.append(("text", {"text": kept}))
            elif block.get("type") == "tool_use":
                name = block.get("name")
                events.append(
                    (
                        "tool",
                        {
                            "name": name if isinstance(name, str) else "?",
                            "input": block.get("input"),
                        },
                    )
                )
        return events

    def _user(self, message: dict[str, Any]) -> None:
        if any(block.get("type") == "tool_result" for block in self._blocks(message)):
            self.outcome.clear_text()
