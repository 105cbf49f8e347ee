"""R31: any program as an agent. The prompt goes to stdin, the reply is stdout.

The prompt never becomes an argument, so a prompt like ``-v --help`` cannot be
read as a flag, and no shell ever sees it.
"""

from __future__ import annotations

from pathlib import Path

from ..model import AgentSpec, TurnResult, TurnSession
from .base import BackendError, Emit
from .process import describe_exit, minimal_env, run_in_group, workspace_for

STDERR_TAIL = 2000


class CommandBackend:
    def __init__(self, workspaces: Path) -> None:
        self.workspaces = workspaces

    async def deliver(
        self, agent: AgentSpec, prompt: str, session: TurnSession, emit: Emit
    ) -> TurnResult:
        if not agent.command:
            raise BackendError("agent has no command configured")
        home = workspace_for(self.workspaces, agent)
        try:
            done = await run_in_group(
                agent.command,
                stdin=prompt.encode(),
                env=minimal_env(agent, home),
                cwd=home,
            )
        except FileNotFoundError:
            raise BackendError(f"command not found: {agent.command[0]}") from None
        except PermissionError:
            raise BackendError(f"command not executable: {agent.command[0]}") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace")[-STDERR_TAIL:].strip()
            raise BackendError(tail or f"command {describe_exit(done.returncode)}")
        reply = done.stdout.decode(errors="replace").rstrip()
        if reply:
            emit("text", {"text": reply})
        return TurnResult(reply=reply)
