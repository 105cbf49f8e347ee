"""The claude backend with the real Claude Code CLI (the pinned npm package that
`make test` installs) against a fake Anthropic API on loopback (R11-R18, R30, R33, R14).

Every test runs twice: with warm mode on (the default, a long-lived CLI per
single-threaded agent) and with ``SKYDECK_CLAUDE_WARM=off`` (a process per turn)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from claude_rig import API_KEY, DAEMON_SECRET, Rig, claude_processes, claude_rig
from fake_anthropic import FakeAnthropic, Step
from helpers import post, reply_of, settle
from skydeck.backends.claude_warm import WarmConfig
from skydeck.model import TurnEvent
from skydeck.turn import failure_reply_text

# Turn timeouts in the stall tests leave the CLI (0.5 s to start, more on a busy
# box) ample time to reach the fake API before the turn is cut.


@pytest.fixture(params=["on", "off"], ids=["warm", "cold"])
async def rig(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    monkeypatch.setenv("SKYDECK_CLAUDE_WARM", request.param)
    async with claude_rig(tmp_path, monkeypatch, WarmConfig.from_env(os.environ)) as rig:
        yield rig


async def test_r11_new_session_then_resume_carries_history(rig: Rig) -> None:
    await rig.add("solo")
    rig.api.script(Step(text="first answer"), Step(text="second answer"))
    first = await rig.turn("solo", "remember the word kumquat")
    second = await rig.turn("solo", "what was the word?")
    assert (await reply_of(rig.store, first)).content == "first answer"
    assert (await reply_of(rig.store, second)).content == "second answer"
    history = FakeAnthropic.texts(rig.api.requests[1])
    assert any("kumquat" in t for t in history) and "first answer" in history
    (thread,) = await rig.store.list_threads("solo")  # R4: one record for the conversation
    sessions = {h["x-claude-code-session-id"] for h in rig.api.headers}
    assert len(sessions) == 1 and thread.session in sessions, "R17: the echoed id"
    assert thread.turn_count == 2
    assert thread.usage is not None and thread.usage["output_tokens"] == 14, "7 + 7, cumulative"


async def test_r4_multi_threaded_turns_carry_no_history(rig: Rig) -> None:
    await rig.add("multi", mode="multi-threaded")
    await rig.turn("multi", "remember the word kumquat")
    await rig.turn("multi", "what was the word?")
    assert not any("kumquat" in t for t in FakeAnthropic.texts(rig.api.requests[1]))
    assert len({h["x-claude-code-session-id"] for h in rig.api.headers}) == 2


async def test_r18_resume_not_found_falls_back_once_and_heals(rig: Rig) -> None:
    await rig.add("heal")
    lost = str(uuid.uuid4())
    with rig.store._tx() as db:
        db.execute("INSERT INTO sessions (agent, session_id) VALUES ('heal', ?)", (lost,))
    rig.api.script(Step(text="fresh start"))
    message = await rig.turn("heal", "hello again")
    assert message.state == "done"
    assert (await reply_of(rig.store, message)).content == "fresh start"
    healed = await rig.store.get_session("heal")
    assert healed not in (None, lost)
    assert rig.api.headers[-1]["x-claude-code-session-id"] == healed
    await rig.turn("heal", "and again")
    assert rig.api.headers[-1]["x-claude-code-session-id"] == healed, "resumes the healed one"


async def test_r18_session_persisted_only_when_echoed(rig: Rig) -> None:
    await rig.add("stall", timeout_s=8)
    rig.api.script(Step(stall=True))
    timed_out = await rig.turn("stall", "this will hang")
    assert timed_out.error == "turn timed out after 8 s"
    assert await rig.store.get_session("stall") is None, "nothing echoed back to us: nothing kept"
    await rig.turn("stall", "second try")
    first_id, second_id = (h["x-claude-code-session-id"] for h in rig.api.headers)
    assert first_id != second_id, "a fresh session, not a resume of one never established"
    assert await rig.store.get_session("stall") == second_id


async def test_r33_5xx_is_retried_then_succeeds(rig: Rig) -> None:
    await rig.add("flaky")
    rig.api.script(
        Step(status=529, error_type="overloaded_error", message="Overloaded"), Step(text="made it")
    )
    message = await rig.turn("flaky", "try hard")
    assert message.state == "done"
    assert (await reply_of(rig.store, message)).content == "made it"
    assert len(rig.api.requests) == 2


async def test_r33_401_is_not_retried_and_the_reason_is_readable(rig: Rig) -> None:
    await rig.add("denied")
    rig.api.script(Step(status=401, error_type="authentication_error", message="invalid x-api-key"))
    message = await rig.turn("denied", "hello")
    assert message.state == "failed"
    assert len(rig.api.requests) == 1, "auth errors are not retried"
    assert message.error is not None and "Traceback" not in message.error
    assert "API key" in message.error or "401" in message.error, message.error
    assert (await reply_of(rig.store, message)).content == failure_reply_text(message.error)


async def test_r14_stall_times_out_and_kills_the_process_group(rig: Rig) -> None:
    await rig.add("hung", timeout_s=8)
    rig.api.script(Step(stall=True))
    message_id = await post(rig.registry, "hung", "wait forever")
    with trio.fail_after(30):
        while not rig.api.requests:
            await trio.sleep(0.05)
    assert claude_processes(rig.workspaces / "hung"), "the CLI runs while the API stalls"
    (message,) = await settle(rig.store, [message_id], 30)
    assert (message.state, message.error) == ("failed", "turn timed out after 8 s")
    assert claude_processes(rig.workspaces / "hung") == [], "no orphan left"


async def test_r26_deregister_mid_turn_kills_the_cli(rig: Rig) -> None:
    await rig.add("gone")
    rig.api.script(Step(stall=True))
    message_id = await post(rig.registry, "gone", "wait forever")
    with trio.fail_after(30):
        while not rig.api.requests:
            await trio.sleep(0.05)
    await rig.registry.remove("gone")
    with trio.fail_after(10):
        while claude_processes(rig.workspaces / "gone"):
            await trio.sleep(0.05)
    message = await rig.store.get_message(message_id)
    assert message is not None and message.state == "cancelled"


async def test_r30_prompt_that_looks_like_flags_is_delivered_verbatim(rig: Rig) -> None:
    await rig.add("flags")
    message = await rig.turn("flags", "-v --help")
    assert message.state == "done"
    assert rig.api.last_prompt() == "-v --help"


async def test_r30_child_env_has_no_daemon_secret_and_tools_stream_before_done(
    rig: Rig,
) -> None:
    await rig.add("tools", system_prompt="You are a test agent.", model="claude-fake-1")
    rig.api.script(
        Step(tool=("Bash", {"command": "env", "description": "show env"})), Step(text="env shown")
    )
    with rig.registry.events.subscribe("tools", buffer=-1) as events:
        message = await rig.turn("tools", "show me your environment")
        seen: list[TurnEvent] = []
        while True:
            try:
                seen.append(events.receive_nowait())
            except trio.WouldBlock:
                break
    assert message.state == "done"
    kinds: list[str] = [e.kind for e in seen]
    assert "tool" in kinds and kinds.index("tool") < kinds.index("done")
    tool = next(e for e in seen if e.kind == "tool")
    assert tool.data == {"name": "Bash", "input": {"command": "env", "description": "show env"}}
    tool_output = FakeAnthropic.texts(rig.api.requests[1])
    assert any("HOME=" in t for t in tool_output), "the tool ran and reported its env"
    everything = json.dumps(rig.api.requests) + json.dumps(rig.api.headers)
    assert DAEMON_SECRET not in everything, "a daemon secret reached the agent"
    assert all(h.get("x-api-key") == API_KEY for h in rig.api.headers)
    assert rig.api.requests[0]["model"] == "claude-fake-1"
    assert "You are a test agent." in json.dumps(rig.api.requests[0]["system"])
