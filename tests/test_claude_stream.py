"""The stream-json parser on recorded lines (shared/spec/claude-cli.md §3), and
the retry/heal policy of the claude backend under the autojump clock (R18, R33)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from skydeck.backends.base import EventKind
from skydeck.backends.claude import ClaudeBackend, _ResumeNotFound, _Retry
from skydeck.backends.claude_stream import StreamOutcome, StreamParser
from skydeck.errors import BackendError
from skydeck.model import AgentSpec, TurnResult, TurnSession

SID = "ec858e3a-1111-2222-3333-444455556666"
INIT = {"type": "system", "subtype": "init", "cwd": "/srv", "session_id": SID, "tools": ["Bash"]}


def assistant(*blocks: dict[str, Any], parent: str | None = None) -> dict[str, Any]:
    return {
        "type": "assistant",
        "message": {"id": "msg_1", "content": list(blocks)},
        "parent_tool_use_id": parent,
        "session_id": SID,
    }


TOOL_RESULT = {
    "type": "user",
    "message": {
        "role": "user",
        "content": [
            {"tool_use_id": "toolu_1", "type": "tool_result", "content": "hi", "is_error": False}
        ],
    },
    "session_id": SID,
}
RESULT_OK = {
    "type": "result",
    "subtype": "success",
    "is_error": False,
    "api_error_status": None,
    "result": "Part B.",
    "session_id": SID,
    "total_cost_usd": 0.000235,
    "usage": {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 0},
}


def run(
    lines: list[bytes | str | dict[str, Any]],
) -> tuple[list[tuple[EventKind, dict[str, Any]]], StreamOutcome]:
    parser = StreamParser()
    events = []
    for line in lines:
        raw = json.dumps(line) if isinstance(line, dict) else line
        events += parser.feed(raw)
    return events, parser.outcome


def test_plain_turn() -> None:
    events, outcome = run([INIT, assistant({"type": "text", "text": "Hello."}), RESULT_OK])
    assert events == [("init", {"session_id": SID}), ("text", {"text": "Hello."})]
    assert outcome.ok and outcome.session_id == SID
    assert outcome.reply == "Hello."
    assert outcome.usage == {
        "input_tokens": 12,
        "output_tokens": 7,
        "cache_read_input_tokens": 0,
        "cost_usd": 0.000235,
    }


def test_reply_is_every_text_block_after_the_last_tool_result() -> None:
    events, outcome = run(
        [
            INIT,
            assistant({"type": "text", "text": "Let me look."}),
            assistant(
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
            ),
            TOOL_RESULT,
            assistant({"type": "text", "text": "Part A."}),
            assistant({"type": "text", "text": "Part B."}),
            assistant({"type": "text", "text": "sub-agent noise"}, parent="toolu_9"),
            RESULT_OK,
        ]
    )
    assert outcome.reply == "Part A.\n\nPart B.", "result.result alone would lose Part A."
    assert ("tool", {"name": "Bash", "input": {"command": "ls"}}) in events


def test_garbage_and_truncated_lines_are_skipped() -> None:
    events, outcome = run(
        [
            b"",
            b"not json at all",
            b'{"type": "assistant", "message": {"content": [{"type": "te',
            b"[1, 2, 3]",
            b"\xff\xfe\x00",
            INIT,
            {"type": "something_new", "session_id": SID},
            {"type": "assistant", "message": "not an object"},
            RESULT_OK,
        ]
    )
    assert outcome.ok and outcome.skipped_lines == 4
    assert events == [("init", {"session_id": SID})]


def test_api_error_result_is_not_ok_and_keeps_its_facts() -> None:
    error = {
        "type": "result",
        "subtype": "success",
        "is_error": True,
        "api_error_status": 500,
        "result": "API Error: 500 Internal server error.",
        "session_id": SID,
    }
    _, outcome = run([INIT, error])
    assert not outcome.ok and outcome.api_status == 500
    assert outcome.error_text == "API Error: 500 Internal server error."


def test_resume_not_found_shape() -> None:
    gone = {
        "type": "result",
        "subtype": "error_during_execution",
        "is_error": True,
        "num_turns": 0,
        "session_id": SID,
        "errors": [f"No conversation found with session ID: {SID}"],
    }
    _, outcome = run([gone])
    assert outcome.resume_not_found and not outcome.ok
    assert outcome.error_text.startswith("No conversation found")


def test_no_result_line_is_never_ok() -> None:
    _, outcome = run([INIT, assistant({"type": "text", "text": "half"})])
    assert not outcome.ok and outcome.result is None


class ScriptedClaude(ClaudeBackend):
    """The policy of `ClaudeBackend.deliver`, with each attempt's outcome scripted."""

    def __init__(self, outcomes: list[BaseException | str]) -> None:
        super().__init__("claude", Path("/nonexistent"))
        self.outcomes = outcomes
        self.attempts: list[tuple[float, TurnSession]] = []

    async def _attempt(
        self, agent: AgentSpec, prompt: str, session: TurnSession, emit: Any, tools: Any
    ) -> TurnResult:
        self.attempts.append((trio.current_time(), session))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return TurnResult(reply=outcome, session_id=session.id)


AGENT = AgentSpec(name="a", channel="a")
FRESH = TurnSession(id="s-1", resume=False)


def transient(echoed: str | None = None) -> _Retry:
    return _Retry("API Error: 529 Overloaded", StreamOutcome(session_id=echoed))


async def test_r33_transient_failures_retry_after_2_then_5_seconds(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = ScriptedClaude([transient("s-1"), transient("s-1"), "finally"])
    result = await backend.deliver(AGENT, "p", FRESH, lambda kind, data: None)
    assert result.reply == "finally"
    times = [t for t, _ in backend.attempts]
    assert [b - a for a, b in itertools.pairwise(times)] == [2.0, 5.0]
    assert [s.resume for _, s in backend.attempts] == [False, True, True], (
        "an echoed session is resumed on retry, never re-created"
    )


async def test_r33_gives_up_after_three_attempts(autojump_clock: trio.abc.Clock) -> None:
    backend = ScriptedClaude([transient(), transient(), transient()])
    with pytest.raises(BackendError) as failed:
        await backend.deliver(AGENT, "p", FRESH, lambda kind, data: None)
    assert failed.value.reason == "API Error: 529 Overloaded"
    assert len(backend.attempts) == 3


async def test_r33_permanent_failure_is_not_retried(autojump_clock: trio.abc.Clock) -> None:
    backend = ScriptedClaude([BackendError("Invalid API key · Fix external API key")])
    with pytest.raises(BackendError):
        await backend.deliver(AGENT, "p", FRESH, lambda kind, data: None)
    assert len(backend.attempts) == 1


async def test_r18_resume_not_found_retries_once_with_a_fresh_session(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = ScriptedClaude([_ResumeNotFound(), "healed"])
    result = await backend.deliver(
        AGENT, "p", TurnSession(id="old", resume=True), lambda k, d: None
    )
    (_, first), (_, second) = backend.attempts
    assert first == TurnSession(id="old", resume=True)
    assert not second.resume and second.id != "old"
    assert result.session_id == second.id
    twice = ScriptedClaude([_ResumeNotFound(), _ResumeNotFound()])
    with pytest.raises(BackendError):
        await twice.deliver(AGENT, "p", TurnSession(id="old", resume=True), lambda k, d: None)
    assert len(twice.attempts) == 2, "only once"


def test_argv_puts_the_prompt_after_double_dash() -> None:
    backend = ClaudeBackend("/bin/claude", Path("/w"))
    agent = AgentSpec(name="a", channel="a", model="sonnet", system_prompt="be brief")
    argv = backend.argv(agent, "-v --help", TurnSession(id="s", resume=True))
    assert argv[0] == "/bin/claude" and argv[-2:] == ["--", "-v --help"]
    assert argv[argv.index("--resume") + 1] == "s"
    assert argv[argv.index("--model") + 1] == "sonnet"
    assert argv[argv.index("--system-prompt") + 1] == "be brief"
    assert "--strict-mcp-config" in argv and "--verbose" in argv
    new = backend.argv(AgentSpec(name="a", channel="a"), "hi", TurnSession(id="n", resume=False))
    assert new[new.index("--session-id") + 1] == "n" and "--model" not in new


def test_a_non_finite_cost_from_the_stream_is_not_kept() -> None:
    """D6 through the back door: json.loads reads NaN and 1e400 from a stream line."""
    for cost in ("NaN", "Infinity", "1e400"):
        parser = StreamParser()
        line = (
            '{"type":"result","subtype":"success","is_error":false,"result":"hi",'
            f'"session_id":"{SID}","total_cost_usd":{cost},"usage":{{"output_tokens":3}}}}'
        )
        parser.feed(line)
        assert parser.outcome.usage == {"output_tokens": 3}, cost
