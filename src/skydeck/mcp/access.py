"""Who is calling ``/mcp/{channel}``, and the sessions they hold (mcp.md M4, M8, M10).

Three kinds of caller, all acting as the path's channel:

- a **turn token** (``sdt_…``): minted when a turn of an agent with ``mcp`` on
  starts, held in memory only (by its SHA-256, never the token itself), valid on
  its own channel, dead when the turn's backend returns (or at the latest
  ``timeout_s + 60`` s after minting). A daemon restart forgets every one.
- an **outside client**: the static ``SKYDECK_TOKEN`` or an HS256 JWT (scopes,
  optional ``channel`` claim), checked by `Auth.outside_scopes`;
- **nobody**, when the daemon has no credential configured (loopback only).

Sessions (`Sessions`) are bound to the exact credential, the channel and the
negotiated version; at most `MAX_SESSIONS` live, least recently used evicted,
idle ones expire. Pure bookkeeping on Trio's clock; no I/O.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..store import Fence

TOKEN_PREFIX = "sdt_"
#: M8: a token outlives its turn's timeout by at most this much (a backend that
#: ignores cancellation cannot keep it alive).
TOKEN_GRACE_S = 60.0
MAX_SESSIONS = 1000
SESSION_IDLE_S = 30 * 60.0
#: The three scopes a turn token holds (M10).
TURN_SCOPES = frozenset({"agent:read", "agent:send", "agent:write"})


def digest(credential: str) -> str:
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class TurnGrant:
    """What one turn token allows: act as the turn's channel, at its depth (M8)."""

    key: str
    channel: str
    agent: str
    thread_id: str
    message_id: str
    depth: int
    expires_at: float
    #: The turn's: what the tools' writes for this turn carry.
    fence: Fence
    #: Successful send_message, notify and schedule calls so far (M14).
    posts: int = 0


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: it acts as ``channel`` with ``scopes``."""

    channel: str
    scopes: frozenset[str]
    #: The SHA-256 of the bearer credential, "" without one: what sessions bind to.
    credential: str
    grant: TurnGrant | None = None


class TurnTokens:
    """The live turn tokens, by digest."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._grants: dict[str, TurnGrant] = {}

    def __len__(self) -> int:
        return len(self._grants)

    def mint(
        self,
        *,
        channel: str,
        agent: str,
        thread_id: str,
        message_id: str,
        depth: int,
        timeout_s: float,
        fence: Fence | None = None,
    ) -> tuple[str, TurnGrant]:
        """A fresh token (47 characters) and its grant."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        grant = TurnGrant(
            key=digest(token),
            channel=channel,
            agent=agent,
            thread_id=thread_id,
            message_id=message_id,
            depth=depth,
            expires_at=self._clock() + timeout_s + TOKEN_GRACE_S,
            fence=fence or Fence.local(channel),
        )
        self._grants[grant.key] = grant
        return token, grant

    def revoke(self, grant: TurnGrant) -> None:
        self._grants.pop(grant.key, None)

    def find(self, token: str) -> TurnGrant | None:
        """The live grant of ``token``; an expired one is forgotten here."""
        key = digest(token)
        grant = self._grants.get(key)
        if grant is not None and self._clock() >= grant.expires_at:
            del self._grants[key]
            return None
        return grant


@dataclass(slots=True)
class Session:
    id: str
    credential: str
    channel: str
    version: str
    #: The turn token's digest: the session ends with the token.
    grant: str | None
    last_used: float


class Sessions:
    """``Mcp-Session-Id`` -> `Session`, least recently used first (M4)."""

    def __init__(
        self,
        *,
        cap: int = MAX_SESSIONS,
        idle_s: float = SESSION_IDLE_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.cap = cap
        self.idle_s = idle_s
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, caller: Caller, version: str) -> Session:
        while len(self._sessions) >= self.cap:
            self._sessions.popitem(last=False)
        session = Session(
            id=secrets.token_hex(16),
            credential=caller.credential,
            channel=caller.channel,
            version=version,
            grant=caller.grant.key if caller.grant is not None else None,
            last_used=self._clock(),
        )
        self._sessions[session.id] = session
        return session

    def find(self, session_id: str, caller: Caller) -> Session | None:
        """The caller's live session of that id, now the most recently used; None
        for an unknown or expired one, or one made with another credential or channel."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_used >= self.idle_s:
            del self._sessions[session_id]
            return None
        if session.credential != caller.credential or session.channel != caller.channel:
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def close(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def end_grant(self, grant: TurnGrant) -> None:
        """A turn token died: its sessions go with it."""
        for session_id in [s.id for s in self._sessions.values() if s.grant == grant.key]:
            del self._sessions[session_id]
