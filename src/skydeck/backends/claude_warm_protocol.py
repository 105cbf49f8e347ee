"""Warm ``claude`` processes (``--input-format stream-json``): the decisions, without any I/O.

A warm process holds one agent's conversation in memory and answers one
``{"type":"user",...}`` stdin line per turn. Everything here is pure, so it is
tested on recorded lines (`claude_warm.py` does the processes and pipes):

- `WarmProtocol`: one process's line discipline. It hands out the turn's stdin
  line only when no turn is in flight (W3: a line written while a tool runs is
  absorbed into the running turn, and only one ``result`` comes for two lines),
  ends the turn at the first ``result``, gives every line in between to a fresh
  `StreamParser`, turns the process's cumulative cost into this turn's (W4),
  and calls everything else a `Surprise` (W6).
- `Fingerprint`: what a process was started with; a turn whose fingerprint
  differs needs a new process (W11).
- `recycle_reason`, `pick_lru`, `SurpriseLog`: the pool's rules (W10, W6).

Facts and rules: ``shared/spec/claude-warm.md``.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ..model import DEFAULT_MAX_REPLY_BYTES
from .base import EventKind
from .claude_stream import RESUME_NOT_FOUND, StreamOutcome, StreamParser
from .output import MIB, Overlong
from .process import describe_exit

#: W10: a process past either limit is closed after its result; the next turn resumes.
RECYCLE_RSS_BYTES = 512 * MIB
RECYCLE_TURNS = 500
#: W6: this many surprises within the window keep an agent cold until the daemon restarts.
SURPRISE_LIMIT = 3
SURPRISE_WINDOW_S = 3600.0

Events = list[tuple[EventKind, dict[str, Any]]]


def user_line(prompt: str) -> bytes:
    """W3: the one stdin line of a turn (JSON escapes newlines, so it stays one line)."""
    message = {"type": "user", "message": {"role": "user", "content": prompt}}
    return (json.dumps(message) + "\n").encode()


def servers_line(servers: Mapping[str, Any], request_id: str) -> bytes:
    """The ``mcp_set_servers`` control request that gives a warm process this turn's
    MCP servers (mcp.md M24 for warm processes: the turn's own token, dead after it).

    Written right before the turn's user line; the CLI answers with a
    ``control_response`` inside the turn, which the turn's parser ignores.
    """
    request = {"subtype": "mcp_set_servers", "servers": dict(servers)}
    line = {"type": "control_request", "request_id": request_id, "request": request}
    return (json.dumps(line) + "\n").encode()


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """The turn's ``result`` arrived. ``cost_usd`` is this turn's share (W4)."""

    outcome: StreamOutcome
    cost_usd: float | None

    @property
    def usage(self) -> dict[str, Any] | None:
        """`StreamOutcome.usage` with the per-turn cost, never the process's running total."""
        usage = self.outcome.usage
        if usage is not None and self.cost_usd is not None:
            usage["cost_usd"] = self.cost_usd
        return usage


@dataclass(frozen=True, slots=True)
class Surprise:
    """W6: the process did something the warm protocol does not allow; it must go.

    ``before_init`` tells whether the turn in flight (if any) had seen its
    ``system/init``: before it, the turn runs cold as if nothing happened.
    ``returncode`` is set when the process exited by itself.
    """

    reason: str
    before_init: bool
    returncode: int | None = None
    outcome: StreamOutcome | None = None


@dataclass(frozen=True, slots=True)
class Stopped:
    """The pool stopped the process during a turn (reset, shutdown): the turn fails with this."""

    reason: str


Verdict = TurnEnd | Surprise | Stopped


class WarmProtocol:
    """One warm process's stdout/stdin discipline (W3, W4, W6)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.turns = 0
        #: The CLI said it is exiting on its own (a resume of a missing session, W14).
        self.expect_exit = False
        self.broken: Surprise | None = None
        self._parser: StreamParser | None = None
        self._init_seen = False
        self._cost_seen = 0.0

    @property
    def outcome(self) -> StreamOutcome | None:
        return None if self._parser is None else self._parser.outcome

    def start_turn(self, prompt: str, *, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> bytes:
        """The line to write for a new turn. Refused while a turn is in flight (W3)."""
        if self._parser is not None:
            raise RuntimeError("a turn is in flight on this process: wait for its result")
        if self.broken is not None:
            raise RuntimeError(f"this process is broken: {self.broken.reason}")
        self._parser = StreamParser(max_reply_bytes=max_reply_bytes)
        self._init_seen = False
        return user_line(prompt)

    def feed(self, line: bytes | Overlong) -> tuple[Events, TurnEnd | Surprise | None]:
        """One stdout line -> live events for the turn, and the verdict if it ends the turn."""
        if self.broken is not None:
            return [], None
        if isinstance(line, Overlong):
            if self._parser is None:
                return [], self.surprise(f"a {line.size}-byte line while no turn was in flight")
            # Dropped by our own line cap (a huge tool result), not a protocol error.
            return self._parser.overlong(line.size), None
        text = line.decode(errors="replace")
        if not text.strip():
            return [], None
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            return [], self.surprise(f"printed a line that is not JSON: {text[:200]!r}")
        if not isinstance(message, dict):
            return [], self.surprise(f"printed a line that is not a JSON object: {text[:200]!r}")
        parser = self._parser
        kind = message.get("type")
        if parser is None:
            return [], self.surprise(f"printed a {kind!r} line while no turn was in flight")
        events = parser.feed_message(message)
        if kind == "system" and message.get("subtype") == "init":
            self._init_seen = True
        if kind != "result":
            return events, None
        outcome = parser.outcome
        if outcome.resume_not_found:
            # W14: the CLI exits right after this; the turn heals with a fresh session.
            self.expect_exit = True
        elif message.get("session_id") != self.session_id:
            return events, self.surprise(
                f"answered for session {message.get('session_id')!r}, not {self.session_id!r}"
            )
        self._parser = None
        self.turns += 1
        return events, TurnEnd(outcome, self._turn_cost(message.get("total_cost_usd")))

    def stderr(self, chunk: bytes) -> Surprise | None:
        """Any stderr output is a surprise (W6): the CLI writes none on a normal turn.

        One exception: a resume of a missing session says so on stderr as well as in
        its ``result`` line, then exits (W14); that is the heal, not a surprise.
        """
        text = chunk.decode(errors="replace").strip()
        if text.startswith(RESUME_NOT_FOUND) and self._parser is not None:
            self.expect_exit = True
            return None
        return self.surprise(f"wrote to stderr: {text[:300]!r}")

    def exited(self, returncode: int) -> Surprise | None:
        """The process exited without being asked to; None when the CLI had said it would."""
        if self.expect_exit and self._parser is None:
            return None
        how = describe_exit(returncode)
        if self._parser is not None:
            return self.surprise(f"{how} during a turn, without a result", returncode=returncode)
        return self.surprise(f"{how} while idle", returncode=returncode)

    def surprise(self, reason: str, *, returncode: int | None = None) -> Surprise:
        """Record the surprise that ends this process (the first one wins)."""
        if self.broken is None:
            self.broken = Surprise(
                reason,
                before_init=not self._init_seen,
                returncode=returncode,
                outcome=self.outcome,
            )
            self._parser = None
        return self.broken

    def _turn_cost(self, total: object) -> float | None:
        """W4: ``total_cost_usd`` is cumulative for the process; this turn's part of it.

        A failed turn may report 0 instead of the running total, so the baseline
        only ever moves up and a turn never costs less than nothing.
        """
        if not isinstance(total, int | float) or isinstance(total, bool):
            return None
        cost = max(float(total) - self._cost_seen, 0.0)
        self._cost_seen = max(self._cost_seen, float(total))
        return round(cost, 10)


# -- definitions (W11) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Everything a running process cannot change (claude-warm.md §5): the binary on
    disk, the argv without the session flags, the environment and the working directory."""

    executable: str
    inode: int | None
    mtime_ns: int | None
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str

    @classmethod
    def of(
        cls,
        executable: str,
        stat: os.stat_result | None,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
    ) -> Fingerprint:
        return cls(
            executable=executable,
            inode=None if stat is None else stat.st_ino,
            mtime_ns=None if stat is None else stat.st_mtime_ns,
            argv=tuple(argv),
            env=tuple(sorted(env.items())),
            cwd=cwd,
        )

    def changes(self, other: Fingerprint) -> list[str]:
        """What differs, in words, for the log."""
        names = ("executable", "inode", "mtime_ns", "argv", "env", "cwd")
        return [name for name in names if getattr(self, name) != getattr(other, name)]


# -- the pool's rules (W10, W6) ----------------------------------------------------------


def recycle_reason(
    turns: int,
    rss_bytes: int | None,
    *,
    max_turns: int = RECYCLE_TURNS,
    max_rss_bytes: int = RECYCLE_RSS_BYTES,
) -> str | None:
    """W10: why a process should be closed after its result, or None to keep it."""
    if turns >= max_turns:
        return f"recycled after {turns} turns"
    if rss_bytes is not None and rss_bytes > max_rss_bytes:
        return f"recycled at {rss_bytes // MIB} MiB RSS"
    return None


class Slot(Protocol):
    @property
    def evictable(self) -> bool: ...
    @property
    def last_used(self) -> float: ...


S = TypeVar("S", bound=Slot)


def pick_lru(slots: Iterable[S]) -> S | None:
    """W10: the least recently used process that may be closed now (idle, not closing)."""
    idle = [slot for slot in slots if slot.evictable]
    return min(idle, key=lambda slot: slot.last_used) if idle else None


@dataclass
class SurpriseLog:
    """W6: surprises per agent; `SURPRISE_LIMIT` within `SURPRISE_WINDOW_S` and the
    agent stays cold until the daemon restarts."""

    limit: int = SURPRISE_LIMIT
    window_s: float = SURPRISE_WINDOW_S
    _times: dict[str, deque[float]] = field(default_factory=dict)
    _cold: set[str] = field(default_factory=set)

    def add(self, agent: str, now: float) -> bool:
        """Count one; True when this one sends the agent cold for good."""
        times = self._times.setdefault(agent, deque())
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.limit and agent not in self._cold:
            self._cold.add(agent)
            return True
        return False

    def cold(self, agent: str) -> bool:
        return agent in self._cold
