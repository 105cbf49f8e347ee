"""The backend seam: one call runs one turn.

A backend gets the prompt, the session to resume or create, and an ``emit``
callback for interim events (``init`` with the session id, ``text`` chunks,
``tool`` uses), and ``tools``: the turn's way to skydeck's MCP endpoint (a
backend that can run MCP clients passes it on; the others ignore it). It
returns a `TurnResult` carrying only the session id it actually saw echoed,
or raises `BackendError` with a readable reason. Any other exception is
treated the same way by the turn (R15); cancellation is how a turn is
stopped (timeout, deregister, interrupt, shutdown), so a backend that owns a
process must kill it when cancelled.

A backend that keeps a process per agent between turns (claude's warm pool)
also implements `Releasing`: the registry calls `release_agent` when an agent
is reset, removed or moved, so the process does not outlive what it served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from ..model import AgentSpec, ToolAccess, TurnResult, TurnSession

EventKind = Literal["init", "text", "tool"]
Emit = Callable[[EventKind, dict[str, Any]], None]


class Backend(Protocol):
    async def deliver(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        *,
        tools: ToolAccess | None = None,
    ) -> TurnResult: ...


@runtime_checkable
class Releasing(Protocol):
    def release(self, agent_name: str, reason: str) -> None: ...


@runtime_checkable
class Probing(Protocol):
    def available(self) -> bool: ...


def can_run(backend: Backend) -> bool:
    """Whether a backend's turns can run here (`GET /api` reports it): one that
    needs an outside program says so through `Probing`; the others always can."""
    return not isinstance(backend, Probing) or backend.available()


def release_agent(backends: Mapping[str, Backend], agent_name: str, reason: str) -> None:
    """Let every backend that keeps processes between turns drop this agent's (W13, W15).

    Synchronous: it only starts the close. A turn running on such a process is
    killed with it and fails with ``reason`` (unless it is being cancelled anyway).
    """
    for backend in backends.values():
        if isinstance(backend, Releasing):
            backend.release(agent_name, reason)
