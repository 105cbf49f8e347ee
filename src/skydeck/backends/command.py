"""R31: any program as an agent. The prompt goes to stdin, the reply is stdout.

The prompt never becomes an argument, so a prompt like ``-v --help`` cannot be
read as a flag, and no shell ever sees it. The reply is the head of stdout, up
to the agent's ``max_reply_bytes``: the rest is read and dropped, the program
runs to its end, and the reply says where it was cut (`output.cut_reply`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..errors import BackendError
from ..model import AgentSpec, TurnResult, TurnSession
from ..procs import ProcessRegistry
from .base import Emit
from .output import HeadBuffer, TailBuffer, cut_reply
from .process import (
    STDERR_TAIL,
    describe_exit,
    feed,
    minimal_env,
    open_group_process,
    pump,
    run_until_exit,
    workspace_for,
)


class CommandBackend:
    def __init__(self, workspaces: Path, processes: ProcessRegistry | None = None) -> None:
        self.workspaces = workspaces
        self.processes = processes

    async def deliver(
        self, agent: AgentSpec, prompt: str, session: TurnSession, emit: Emit
    ) -> TurnResult:
        if not agent.command:
            raise BackendError("agent has no command configured")
        home = workspace_for(self.workspaces, agent)
        stdout = HeadBuffer(agent.max_reply_bytes)
        stderr = TailBuffer.for_chars(STDERR_TAIL)
        try:
            async with open_group_process(
                agent.command,
                env=minimal_env(agent, home),
                cwd=home,
                processes=self.processes,
                owner=agent,
            ) as process:
                returncode = await run_until_exit(
                    process,
                    partial(feed, process.stdin, prompt.encode()),
                    partial(pump, process.stdout, stdout.add),
                    partial(pump, process.stderr, stderr.add),
                )
        except FileNotFoundError:
            raise BackendError(f"command not found: {agent.command[0]}") from None
        except PermissionError:
            raise BackendError(f"command not executable: {agent.command[0]}") from None
        if returncode != 0:
            tail = stderr.tail(STDERR_TAIL).strip()
            raise BackendError(tail or f"command {describe_exit(returncode)}")
        reply = cut_reply(stdout.text().rstrip(), agent.max_reply_bytes, cut=stdout.overflowed)
        if reply:
            emit("text", {"text": reply})
        return TurnResult(reply=reply)
