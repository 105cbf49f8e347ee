"""R31: any program as an agent. The prompt goes to stdin, the reply is stdout.

The prompt never becomes an argument, so a prompt like ``-v --help`` cannot be
read as a flag, and no shell ever sees it. With skydeck's MCP tools on
(mcp.md M25) the program finds the endpoint and its turn's token in
``SKYDECK_MCP_URL`` and ``SKYDECK_MCP_TOKEN``. The reply is the head of stdout, up
to the agent's ``max_reply_bytes``: the rest is read and dropped, the program
runs to its end, and the reply says where it was cut (`output.cut_reply`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..errors import BackendError
from ..model import AgentSpec, ToolAccess, TurnResult, TurnSession
from ..procs import ProcessRegistry
from ..sandbox import Sandbox
from .base import Emit
from .output import HeadBuffer, TailBuffer, cut_reply
from .process import (
    STDERR_TAIL,
    check_executable,
    describe_exit,
    feed,
    minimal_env,
    open_group_process,
    pump,
    run_until_exit,
    workspace_for,
)


class CommandBackend:
    def __init__(
        self,
        workspaces: Path,
        processes: ProcessRegistry | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.workspaces = workspaces
        self.processes = processes
        self.sandbox = sandbox

    async def deliver(
        self,
        agent: AgentSpec,
        prompt: str,
        session: TurnSession,
        emit: Emit,
        *,
        tools: ToolAccess | None = None,
    ) -> TurnResult:
        if not agent.command:
            raise BackendError("agent has no command configured")
        home = workspace_for(self.workspaces, agent)
        env = minimal_env(agent, home)
        if tools is not None:
            # mcp.md M25: after the agent's own env, which cannot override them.
            env["SKYDECK_MCP_URL"] = tools.url
            env["SKYDECK_MCP_TOKEN"] = tools.token
        stdout = HeadBuffer(agent.max_reply_bytes)
        stderr = TailBuffer.for_chars(STDERR_TAIL)
        jail = None
        try:
            program = check_executable(agent.command[0], path=env.get("PATH"), cwd=home)
            if self.sandbox is not None:
                jail = self.sandbox.jail(
                    agent,
                    workspace=home,
                    env=env,
                    executable=str(program),
                    claude=False,
                    mcp_channel=agent.channel if tools is not None else None,
                )
            async with open_group_process(
                agent.command,
                env=env if jail is None else jail.env,
                cwd=home,
                processes=self.processes,
                owner=agent,
                jail=jail,
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
        if jail is not None:
            returncode = jail.judge(returncode, stderr.tail(STDERR_TAIL))
        if returncode != 0:
            tail = stderr.tail(STDERR_TAIL).strip()
            raise BackendError(tail or f"command {describe_exit(returncode)}")
        reply = cut_reply(stdout.text().rstrip(), agent.max_reply_bytes, cut=stdout.overflowed)
        if reply:
            emit("text", {"text": reply})
        return TurnResult(reply=reply)
