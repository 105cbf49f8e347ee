"""Records that cross module boundaries.

Plain dataclasses, no behaviour beyond small derived views: the store, the
registry, the turn pipeline, the backends and the HTTP layer all speak these,
so none of them has to know how another keeps its data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import uuid6

from .ledger import MessageState, ThreadStatus

#: R1: names and channels. Anchored with \Z so a trailing newline never sneaks in.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

Backend = Literal["claude", "command", "echo"]
Mode = Literal["single-threaded", "multi-threaded"]
QueueMode = Literal["followup", "collect", "interrupt"]
Direction = Literal["in", "out"]
#: S1: how an agent's process is sandboxed (None: the daemon's default, `sandbox/`).
SandboxMode = Literal["off", "workspace", "strict"]

BACKENDS: tuple[Backend, ...] = ("claude", "command", "echo")
MODES: tuple[Mode, ...] = ("single-threaded", "multi-threaded")
QUEUE_MODES: tuple[QueueMode, ...] = ("followup", "collect", "interrupt")
SANDBOX_MODES: tuple[SandboxMode, ...] = ("off", "workspace", "strict")

DEFAULT_TIMEOUT_S = 900
#: The longest reply a backend may give, in UTF-8 bytes; the rest is cut (1 MiB).
DEFAULT_MAX_REPLY_BYTES = 1024 * 1024


def is_valid_name(value: str) -> bool:
    """R1: the one rule for agent names, channels and job names."""
    return NAME_PATTERN.match(value) is not None


def new_id() -> str:
    """A time-ordered UUID (v7) for stored rows.

    New ids sort after old ones, so the unique indexes grow at their right edge
    instead of taking a random B-tree page per insert (measured: ~17 % more
    durable turns/s than uuid4 at 100,000 messages).
    """
    return str(uuid6.uuid7())


def _as_json(record: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's fields as a dict (shallow: the values are JSON-ready already)."""
    return {f.name: getattr(record, f.name) for f in fields(record) if f.name not in exclude}


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds: sortable as text, readable by JS `Date`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class AgentSpec:
    """An agent definition: what serves a channel, and how."""

    name: str
    channel: str
    backend: Backend = "claude"
    mode: Mode = "single-threaded"
    queue_mode: QueueMode = "followup"
    model: str | None = None
    system_prompt: str | None = None
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: int = DEFAULT_TIMEOUT_S
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    #: S1: None means the daemon's ``--sandbox`` default.
    sandbox: SandboxMode | None = None
    #: S2: extra ``host:port`` targets a ``workspace`` sandbox may reach.
    egress: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=utc_now)
    #: Where the definition lives: None for the HTTP API, "vault:<note id>" for a vault note.
    source: str | None = None
    #: mcp.md M26: whether its turns get skydeck's MCP tools, and which other
    #: channels they may reach (None: every one).
    mcp: bool = True
    mcp_allow: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process skydeck started and has not reaped yet (`procs.ProcessRegistry`).

    ``start_time`` is field 22 of ``/proc/<pid>/stat`` (clock ticks after boot)
    and ``boot_id`` the kernel's boot id: together with the pid they name one
    process for ever, so a recycled pid is never mistaken for it.
    """

    pid: int
    start_time: int
    boot_id: str
    agent: str
    channel: str
    started_at: str = field(default_factory=utc_now)


@dataclass(slots=True)
class Inbound:
    """A validated request to put a message into a channel (not stored yet)."""

    channel: str
    content: str
    external_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def reply_to(self) -> str | None:
        value = self.metadata.get("reply_to")
        return value if isinstance(value, str) else None


@dataclass(slots=True)
class Message:
    """A stored message, inbound (`in`) or a reply (`out`)."""

    id: str
    seq: int
    channel: str
    direction: Direction
    content: str
    state: MessageState
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)
    external_id: str | None = None
    in_reply_to: str | None = None
    thread_id: str | None = None
    reply_id: str | None = None
    attempts: int = 0
    error: str | None = None

    @property
    def reply_to(self) -> str | None:
        value = self.metadata.get("reply_to")
        return value if isinstance(value, str) else None

    @property
    def delegation_depth(self) -> int:
        """R23: depth as received; strings from vault metadata coerce, garbage is 0."""
        raw = self.metadata.get("delegation_depth", 0)
        if isinstance(raw, bool):
            return 0
        if isinstance(raw, int):
            return max(raw, 0)
        text = raw.strip() if isinstance(raw, str) else ""
        # ASCII digits only (`"²".isdigit()` is true, and int() refuses it), and short
        # enough for int(): a garbage depth is 0, never an exception in a turn.
        if text.isascii() and text.isdigit() and len(text) <= 18:
            return int(text)
        return 0

    def to_json(self) -> dict[str, Any]:
        """The API shape: everything but the internal row number and external id."""
        return _as_json(self, exclude=("seq", "external_id"))


@dataclass(slots=True)
class Accepted:
    """What an inbound post is acknowledged with (http-api.md, Inbound responses)."""

    id: str
    #: `queued`, `buffered`, or the answer `duplicate` (never a stored state, R8).
    state: MessageState | Literal["duplicate"]
    message: Message
    #: The host whose lease runs the channel (a PostgreSQL store; None: this one, or nobody).
    owner: str | None = None


@dataclass(slots=True)
class ThreadRecord:
    """One turn's record (R12, R16, R17, R21)."""

    id: str
    channel: str
    agent: str
    mode: Mode
    status: ThreadStatus
    input: str
    output: str = ""
    session: str | None = None
    turn_count: int = 0
    usage: dict[str, Any] | None = None
    started_at: str = field(default_factory=utc_now)
    ended_at: str | None = None
    message_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


#: The slot of a job's run-now (outside its schedule): ``run-now:<ISO time>``.
RUN_NOW_PREFIX = "run-now:"


@dataclass(slots=True)
class Job:
    """A job: post ``content`` to ``channel`` at every slot of the cron ``schedule``,
    or once at ``run_at`` (a one-shot, mcp.md M28: exactly one of the two is set).

    ``last_slot`` is the scheduled time last fired or skipped (UTC, ISO 8601):
    a slot at or before it never fires again. Times are UTC ISO strings.
    """

    name: str
    channel: str
    schedule: str | None
    content: str
    timezone: str = "UTC"
    enabled: bool = True
    created_at: str = field(default_factory=utc_now)
    next_run_at: str | None = None
    last_slot: str | None = None
    last_run_at: str | None = None
    last_outcome: str | None = None
    last_message_id: str | None = None
    skipped: int = 0
    source: str | None = None
    run_at: str | None = None
    #: R23 carried through jobs: its messages carry this depth when it is above 0.
    delegation_depth: int = 0

    def to_json(self) -> dict[str, Any]:
        return _as_json(self)


@dataclass(frozen=True, slots=True)
class TurnSession:
    """The session a turn runs in: resume an existing one, or create `id` fresh."""

    id: str
    resume: bool


@dataclass(frozen=True, slots=True)
class ToolAccess:
    """How one turn's backend reaches skydeck's MCP tools (mcp.md M24, M25).

    ``token`` is the turn's own credential, dead when the turn ends: it goes into
    a command's environment, or into the 0600 ``config`` file a claude CLI reads
    (never into an argv). ``server`` is the ``mcpServers`` entry itself.
    """

    url: str
    token: str
    config: Path | None = None

    @property
    def server(self) -> dict[str, Any]:
        return {
            "type": "http",
            "url": self.url,
            "headers": {"Authorization": f"Bearer {self.token}"},
        }

    def __repr__(self) -> str:  # never the token, in a log line or a traceback
        return f"ToolAccess(url={self.url!r}, config={self.config!r})"


@dataclass(slots=True)
class TurnResult:
    """A backend's successful answer. `session_id` is only what the backend echoed."""

    reply: str
    session_id: str | None = None
    usage: dict[str, Any] | None = None


class EventKind(StrEnum):
    """What a live turn event says (http-api.md, turn-events)."""

    QUEUED = "queued"
    INIT = "init"
    TEXT = "text"
    TOOL = "tool"
    DONE = "done"
    ERROR = "error"
    #: mcp.md M27: a `notify` tool call's message, out before the turn's end.
    NOTIFY = "notify"


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """A live event of a turn, fanned out to subscribers (SSE, web chat, `send --wait`)."""

    kind: EventKind
    message_id: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message_id": self.message_id, **self.data}
