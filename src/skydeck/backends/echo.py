"""R32: replies ``echo: <prompt>``. The demo agent and most tests use it."""

from __future__ import annotations

from ..model import AgentSpec, ToolAccess, TurnResult, TurnSession
from .base import Emit


class EchoBackend:
    async def deliver(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        *,
        tools: ToolAccess | None = None,
    ) -> TurnResult:
        emit("init", {"session_id": session.id})
        reply = f"echo: {prompt}"
        emit("text", {"text": reply})
        return TurnResult(reply=reply, session_id=session.id)
