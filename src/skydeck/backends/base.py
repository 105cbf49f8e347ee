"""The backend seam: one call runs one turn.

A backend gets the prompt, the session to resume or create, and an ``emit``
callback for interim events (``init`` with the session id, ``text`` chunks,
``tool`` uses). It returns a `TurnResult` carrying only the session id it
actually saw echoed, or raises `BackendError` with a readable reason. Any other
exception is treated the same way by the turn (R15); cancellation is how a
turn is stopped (timeout, deregister, interrupt, shutdown), so a backend that
owns a process must kill it when cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

from ..model import AgentSpec, TurnResult, TurnSession

EventKind = Literal["init", "text", "tool"]
Emit = Callable[[EventKind, dict[str, Any]], None]


class Backend(Protocol):
    async def deliver(
        self, agent: AgentSpec, prompt: str, session: TurnSession, emit: Emit
    ) -> TurnResult: ...
