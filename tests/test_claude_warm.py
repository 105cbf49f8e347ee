"""Warm claude processes (issue 14; rules W1-W17 of shared/spec/claude-warm.md), with the
real pinned CLI against the fake Anthropic API; the pure protocol on recorded lines."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from claude_rig import API_KEY, Rig, claude_processes, claude_rig, cli_processes
from daemon_process import DaemonProcess
from fake_anthropic import FakeAnthropic, Step
from helpers import post, reply_of, settle
from skydeck.backends.claude import find_claude
from skydeck.backends.claude_warm import WarmConfig
from skydeck.backends.claude_warm_protocol import (
    Fingerprint,
    Surprise,
    SurpriseLog,
    TurnEnd,
    WarmProtocol,
    pick_lru,
    recycle_reason,
)
from skydeck.backends.output import MIB
from skydeck.backends.process import KILL_GRACE_S
from skydeck.model import TurnSession

WARM_LOG = "skydeck.backends.claude_warm"


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    async with claude_rig(tmp_path, monkeypatch, WarmConfig()) as rig:
        yield rig


async def until(check: Callable[[], object], what: str, timeout: float = 10) -> None:
    try:
        with trio.fail_after(timeout):
            while not check():
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def one_cli(rig: Rig, agent: str) -> psutil.Process:
    found = cli_processes(rig.workspaces / agent)
    assert len(found) == 1, f"{agent}: {len(found)} claude processes"
    return found[0]


def heard(rig: Rig, prompt: str) -> bool:
    """The fake API has received a request holding ``prompt``."""
    return any(prompt in json.dumps(request) for request in rig.api.requests)


def history(rig: Rig) -> list[str]:
    return FakeAnthropic.texts(rig.api.requests[-1])


# -- W1-W3: one process per single-threaded agent ------------------------------------


async def test_w1_w3_two_turns_run_in_one_process_that_holds_the_history(rig: Rig) -> None:
    await rig.add("solo")
    rig.api.script(Step(text="first answer"), Step(text="second answer"))
    first = await rig.turn("solo", "remember the word kumquat")
    cli = one_cli(rig, "solo")
    assert "--input-format" in cli.cmdline() and "--" not in cli.cmdline(), "no positional prompt"
    second = await rig.turn("solo", "what was the word?")
    assert one_cli(rig, "solo").pid == cli.pid, "the second turn ran in the same process"
    assert (await reply_of(rig.store, first)).content == "first answer"
    assert (await reply_of(rig.store, second)).content == "second answer"
    assert any("kumquat" in t for t in history(rig)) and "first answer" in history(rig)
    assert rig.spawns == ["new"]
    assert rig.backend.pool is not None
    (row,) = rig.backend.pool.health()["processes"]
    assert (row["agent"], row["pid"], row["turns"], row["state"]) == ("solo", cli.pid, 2, "idle")
    assert row["rss_bytes"] > 50 * MIB and row["idle_s"] >= 0


async def test_w1_multi_threaded_agents_keep_no_process(rig: Rig) -> None:
    await rig.add("multi", mode="multi-threaded")
    await rig.turn("multi", "hello there")
    assert claude_processes(rig.workspaces / "multi") == []
    await rig.add("switch")
    await rig.turn("switch", "remember the word kumquat")
    cli = one_cli(rig, "switch")
    await rig.registry.update("switch", {"mode": "multi-threaded"})
    await rig.turn("switch", "what was the word?")
    assert gone(cli) and claude_processes(rig.workspaces / "switch") == []
    assert not any("kumquat" in t for t in history(rig)), "a fresh session, cold"
    assert rig.spawns == ["new"]


async def test_w3_a_second_line_is_written_only_after_the_first_result(rig: Rig) -> None:
    """Written while a tool runs, a line would be absorbed into the running turn
    (one result for two lines); the pool waits for the result instead."""
    agent = await rig.add("serial")
    await rig.turn("serial", "hello there")
    stored = await rig.store.get_session("serial")
    assert stored is not None
    session = TurnSession(id=stored, resume=True)
    rig.api.script(
        Step(tool=("Bash", {"command": "sleep 1", "description": "wait"})),
        Step(text="first done"),
        Step(text="second done"),
    )
    replies: dict[str, str] = {}

    async def deliver(prompt: str) -> None:
        result = await rig.backend.deliver(agent, prompt, session, lambda kind, data: None)
        replies[prompt] = result.reply

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver, "run the slow tool")
        await until(lambda: heard(rig, "run the slow tool"), "the first turn reached the API")
        await trio.sleep(0.3)  # the tool is running now
        nursery.start_soon(deliver, "the second message")
    assert replies == {"run the slow tool": "first done", "the second message": "second done"}
    assert not heard(rig, "while you were working"), "the second line was absorbed"
    assert rig.api.last_prompt() == "the second message"
    assert rig.spawns == ["new"]


def test_w3_the_protocol_refuses_a_line_while_a_turn_is_in_flight() -> None:
    protocol = WarmProtocol("s1")
    line = protocol.start_turn("hello\nworld")
    assert line.count(b"\n") == 1 and json.loads(line)["message"]["content"] == "hello\nworld"
    with pytest.raises(RuntimeError, match="in flight"):
        protocol.start_turn("too early")
    protocol.feed(b'{"type":"system","subtype":"init","session_id":"s1"}')
    _, verdict = protocol.feed(
        b'{"type":"result","subtype":"success","is_error":false,"session_id":"s1"}'
    )
    assert isinstance(verdict, TurnEnd)
    protocol.start_turn("now it may")


# -- W4, W5: usage, cost and failures ----------------------------------------------


def test_w4_cost_is_this_turns_share_of_the_cumulative_total() -> None:
    protocol = WarmProtocol("s1")
    costs = []
    for total in (0.000235, 0.00047, 0.0, 0.000705):  # the third: an error turn reporting 0
        protocol.start_turn("go")
        _, verdict = protocol.feed(
            json.dumps(
                {"type": "result", "is_error": False, "session_id": "s1", "total_cost_usd": total}
            ).encode()
        )
        assert isinstance(verdict, TurnEnd) and verdict.usage is not None
        costs.append(verdict.usage["cost_usd"])
    assert costs == [0.000235, 0.000235, 0.0, 0.000235]


async def test_w4_recorded_cost_per_turn_is_not_cumulative(rig: Rig) -> None:
    await rig.add("costly")
    totals = []
    for prompt in ("one, please", "two, please", "three, please"):
        await rig.turn("costly", prompt)
        (thread,) = await rig.store.list_threads("costly")
        assert thread.usage is not None
        totals.append(thread.usage["cost_usd"])
    one = totals[0]
    assert one > 0 and totals == pytest.approx([one, 2 * one, 3 * one]), "equal turns, equal cost"
    assert rig.spawns == ["new"]


async def test_w5_a_500_is_retried_on_the_same_process(rig: Rig) -> None:
    await rig.add("flaky")
    await rig.turn("flaky", "hello there")
    cli = one_cli(rig, "flaky")
    rig.api.script(Step(status=500), Step(text="made it"))
    message = await rig.turn("flaky", "try hard")
    assert message.state == "done" and (await reply_of(rig.store, message)).content == "made it"
    assert "try hard" in FakeAnthropic.texts(rig.api.requests[-2])
    assert rig.api.last_prompt() == "try hard", "the same line, written again"
    assert len(rig.api.requests) == 3
    assert one_cli(rig, "flaky").pid == cli.pid and rig.spawns == ["new"]


async def test_w5_a_401_fails_at_once_and_closes_the_process(rig: Rig) -> None:
    await rig.add("denied")
    await rig.turn("denied", "remember the word kumquat")
    cli = one_cli(rig, "denied")
    rig.api.script(Step(status=401, error_type="authentication_error", message="bad key"))
    message = await rig.turn("denied", "hello")
    assert message.state == "failed" and message.error is not None
    assert "API key" in message.error or "401" in message.error, message.error
    assert len(rig.api.requests) == 2, "not retried"
    await until(lambda: gone(cli), "the process is closed after a 401")
    again = await rig.turn("denied", "what was the word?")
    assert again.state == "done" and any("kumquat" in t for t in history(rig))
    assert rig.spawns == ["new", "auth"]


# -- W6: protocol surprises -----------------------------------------------------------

# Passes the first turn through to the real CLI; on the second stdin line it prints
# a line that is not JSON and exits. Cold turns (a positional prompt) run the real CLI.
WRAPPER = """
import os, subprocess, sys
REAL = {real!r}
args = sys.argv[1:]
if "--input-format" not in args:
    os.execv(REAL, [REAL, *args])
child = subprocess.Popen([REAL, *args], stdin=subprocess.PIPE)
for number, line in enumerate(sys.stdin.buffer, 1):
    if number == 2:
        child.terminate()  # SIGTERM, and wait: the CLI writes its session file out first
        child.wait()
        sys.stdout.write("this is not json\\n")
        sys.stdout.flush()
        sys.exit(1)
    child.stdin.write(line)
    child.stdin.flush()
child.stdin.close()
sys.exit(child.wait())
"""


async def test_w6_a_non_json_line_drops_the_process_and_the_turn_runs_cold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WARM_LOG)
    real = find_claude()
    wrapper = tmp_path / "claude-wrapper"
    wrapper.write_text(f"#!{sys.executable}\n{WRAPPER.format(real=real)}")
    wrapper.chmod(0o755)
    monkeypatch.setenv("SKYDECK_CLAUDE_BIN", str(wrapper))
    async with claude_rig(tmp_path, monkeypatch, WarmConfig()) as rig:
        await rig.add("odd")
        rig.api.script(Step(text="first answer"), Step(text="cold answer"))
        first = await rig.turn("odd", "remember the word kumquat")
        assert first.state == "done" and rig.fallbacks == []
        second = await rig.turn("odd", "what was the word?")
        assert second.state == "done", second.error
        assert (await reply_of(rig.store, second)).content == "cold answer"
        assert rig.fallbacks == ["surprise"], "the turn ran cold"
        assert any("kumquat" in t for t in history(rig)), "cold --resume: the history is kept"
        surprises = [r for r in caplog.records if "protocol surprise" in r.getMessage()]
        assert [r.before_init for r in surprises] == [True]  # type: ignore[attr-defined]
        assert "not JSON" in surprises[0].reason  # type: ignore[attr-defined]
        third = await rig.turn("odd", "and now?")
        assert third.state == "done" and rig.spawns == ["new", "surprise"], "warm again"


async def test_w6_sigkill_while_idle_is_logged_and_the_next_turn_succeeds(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WARM_LOG)
    await rig.add("oom")
    await rig.turn("oom", "remember the word kumquat")
    cli = one_cli(rig, "oom")
    # The CLI writes its session file up to ~0.1 s after a result (a SIGKILL right after
    # one loses it, measured); the OOM killer strikes an idle process later than that.
    await trio.sleep(0.5)
    cli.kill()
    assert rig.backend.pool is not None
    pool = rig.backend.pool
    await until(lambda: pool.count == 0, "the pool dropped the dead process")
    (surprise,) = [r for r in caplog.records if "protocol surprise" in r.getMessage()]
    assert "killed by SIGKILL while idle" in surprise.reason  # type: ignore[attr-defined]
    message = await rig.turn("oom", "what was the word?")
    assert message.state == "done" and any("kumquat" in t for t in history(rig))
    assert one_cli(rig, "oom").pid != cli.pid and rig.spawns == ["new", "surprise"]


async def test_w6_an_agent_over_the_surprise_limit_stays_cold(rig: Rig) -> None:
    assert rig.backend.pool is not None
    pool = rig.backend.pool
    pool.surprises = SurpriseLog(limit=1)  # the rule itself (3 an hour) is tested below
    await rig.add("shaky")
    await rig.turn("shaky", "remember the word kumquat")
    cli = one_cli(rig, "shaky")
    await trio.sleep(0.5)  # see the OOM test: let the CLI write its session file
    cli.kill()
    await until(lambda: pool.count == 0, "the pool dropped the dead process")
    for prompt in ("what was the word?", "and again?"):
        message = await rig.turn("shaky", prompt)
        assert message.state == "done" and any("kumquat" in t for t in history(rig))
        assert cli_processes(rig.workspaces / "shaky") == [], "cold: nothing left running"
    assert rig.spawns == ["new"] and rig.fallbacks == ["surprise_limit"] * 2


def test_w6_surprises_end_a_warm_process_and_three_in_an_hour_keep_the_agent_cold() -> None:
    protocol = WarmProtocol("s1")
    _, verdict = protocol.feed(b'{"type":"system","subtype":"status"}')
    assert isinstance(verdict, Surprise) and "no turn was in flight" in verdict.reason
    protocol = WarmProtocol("s1")
    protocol.start_turn("go")
    protocol.feed(b'{"type":"system","subtype":"init","session_id":"s1"}')
    _, verdict = protocol.feed(b'{"type":"result","is_error":false,"session_id":"other"}')
    assert isinstance(verdict, Surprise) and not verdict.before_init, "after init: cold rules"
    assert protocol.feed(b"garbage") == ([], None), "a broken process says nothing more"
    protocol = WarmProtocol("s1")
    protocol.start_turn("go")
    assert protocol.stderr(b"No conversation found with session ID: s1") is None, "W14"
    assert protocol.exited(1) is not None, "but it must also have said so in a result"
    protocol = WarmProtocol("s1")
    protocol.start_turn("go")
    surprise = protocol.stderr(b"Error: boom")
    assert surprise is not None and surprise.before_init
    log = SurpriseLog()
    assert not log.add("a", 0) and not log.add("a", 1000) and not log.add("b", 1500)
    assert not log.add("a", 3601), "the first one has left the hour"
    assert log.add("a", 3700) and log.cold("a") and not log.cold("b")


# -- W7, W8: a stopped turn kills its process -----------------------------------------


async def test_w7_timeout_kills_the_group_and_the_next_turn_keeps_the_history(
    rig: Rig,
) -> None:
    await rig.add("slow")
    await rig.turn("slow", "remember the word kumquat")
    cli = one_cli(rig, "slow")
    await rig.registry.update("slow", {"timeout_s": 1})  # not part of the definition: same process
    rig.api.script(Step(stall=True))
    message = await rig.turn("slow", "this one hangs")
    assert message.error == "turn timed out after 1 s"
    await until(lambda: gone(cli), "the group is killed", timeout=KILL_GRACE_S)
    await rig.registry.update("slow", {"timeout_s": 60})  # room for a start-up on a busy box
    again = await rig.turn("slow", "what was the word?")
    assert again.state == "done", again.error
    texts = history(rig)
    assert any("kumquat" in t for t in texts) and any("this one hangs" in t for t in texts)
    assert "--resume" in one_cli(rig, "slow").cmdline() and rig.spawns == ["new", "stopped"]


async def test_w8_an_interrupting_message_kills_the_process_and_runs(rig: Rig) -> None:
    await rig.add("eager", queue_mode="interrupt")
    await rig.turn("eager", "remember the word kumquat")
    cli = one_cli(rig, "eager")
    rig.api.script(Step(stall=True))
    first = await post(rig.registry, "eager", "a long question")
    await until(lambda: heard(rig, "a long question"), "the first turn reached the API")
    second = await rig.turn("eager", "never mind: what was the word?")
    assert second.state == "done" and any("kumquat" in t for t in history(rig))
    (cancelled,) = await settle(rig.store, [first], 10)
    assert cancelled.state == "cancelled" and gone(cli)


# -- W9, W10: idle timeout, the cap, recycling -----------------------------------------


async def test_w9_idle_timeout_closes_the_process_and_resume_keeps_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WARM_LOG)
    async with claude_rig(tmp_path, monkeypatch, WarmConfig(idle_s=1)) as rig:
        await rig.add("idler")
        await rig.turn("idler", "remember the word kumquat")
        cli = one_cli(rig, "idler")
        assert rig.backend.pool is not None
        pool = rig.backend.pool
        await until(lambda: pool.count == 0, "the idle process exits", timeout=5)
        assert gone(cli)
        (closed,) = [r for r in caplog.records if r.getMessage() == "warm claude process closed"]
        assert (closed.why, closed.returncode) == ("idle", 0)  # type: ignore[attr-defined]
        message = await rig.turn("idler", "what was the word?")
        assert message.state == "done" and any("kumquat" in t for t in history(rig))
        assert "--resume" in one_cli(rig, "idler").cmdline()
        assert rig.spawns == ["new", "idle"]


async def test_w10_cap_closes_the_lru_process_and_a_busy_cap_runs_cold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with claude_rig(tmp_path, monkeypatch, WarmConfig(max_processes=1)) as rig:
        await rig.add("a")
        await rig.add("b")
        workspaces = (rig.workspaces / "a", rig.workspaces / "b")
        most = 0

        async def sample() -> None:
            nonlocal most
            while True:
                alive = await trio.to_thread.run_sync(
                    lambda: sum(len(cli_processes(w)) for w in workspaces)
                )
                most = max(most, alive)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            await rig.turn("a", "remember the word kumquat")
            a_cli = one_cli(rig, "a")
            await rig.turn("b", "hello from b")
            b_cli = one_cli(rig, "b")
            assert gone(a_cli), "a, the least recently used, was closed"
            nursery.cancel_scope.cancel()
        assert most == 1, f"{most} warm processes were alive at once with a cap of 1"
        assert rig.spawns == ["new", "new"]

        hold = trio.Event()
        rig.api.script(Step(hold=hold, text="b is done"))
        busy = await post(rig.registry, "b", "a slow one")
        await until(lambda: heard(rig, "a slow one"), "b's turn reached the API")
        cold = await rig.turn("a", "what was the word?")
        assert cold.state == "done" and rig.fallbacks == ["cap"], "ran cold, without waiting"
        assert any("kumquat" in t for t in history(rig)), "cold --resume keeps a's history"
        assert cli_processes(rig.workspaces / "a") == []
        hold.set()
        (done,) = await settle(rig.store, [busy], 30)
        assert done.state == "done" and one_cli(rig, "b").pid == b_cli.pid


async def test_w10_a_process_is_recycled_after_its_turn_limit(rig: Rig) -> None:
    assert rig.backend.pool is not None
    rig.backend.pool.recycle_turns = 2
    await rig.add("busy")
    await rig.turn("busy", "remember the word kumquat")
    cli = one_cli(rig, "busy")
    await rig.turn("busy", "and another turn")
    await until(lambda: gone(cli), "recycled after 2 turns")
    message = await rig.turn("busy", "what was the word?")
    assert message.state == "done" and any("kumquat" in t for t in history(rig))
    assert rig.spawns == ["new", "recycled"]


def test_w10_rules_recycle_and_lru() -> None:
    assert recycle_reason(499, 100 * MIB) is None
    assert recycle_reason(500, 100 * MIB) == "recycled after 500 turns"
    assert recycle_reason(3, 600 * MIB) == "recycled at 600 MiB RSS"

    class Proc:
        def __init__(self, evictable: bool, last_used: float) -> None:
            self.evictable, self.last_used = evictable, last_used

    old_busy, idle, newer = Proc(False, 1), Proc(True, 5), Proc(True, 9)
    assert pick_lru([old_busy, newer, idle]) is idle
    assert pick_lru([old_busy]) is None


def test_w9_w10_settings_from_the_environment() -> None:
    assert WarmConfig.from_env({}) == WarmConfig(enabled=True, max_processes=4, idle_s=600)
    assert not WarmConfig.from_env({"SKYDECK_CLAUDE_WARM": "off"}).active
    assert not WarmConfig.from_env({"SKYDECK_CLAUDE_WARM_MAX": "0"}).active
    assert WarmConfig.from_env({"SKYDECK_CLAUDE_WARM_IDLE_S": "2.5"}).idle_s == 2.5
    for bad in (
        {"SKYDECK_CLAUDE_WARM": "maybe"},
        {"SKYDECK_CLAUDE_WARM_MAX": "-1"},
        {"SKYDECK_CLAUDE_WARM_MAX": "four"},
        {"SKYDECK_CLAUDE_WARM_IDLE_S": "0"},
        {"SKYDECK_CLAUDE_WARM_IDLE_S": "inf"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WarmConfig.from_env(bad)


# -- W11-W15: definition, session, reset, removal --------------------------------------


async def test_w11_a_changed_definition_restarts_the_process_with_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper = tmp_path / "claude"  # stands for the binary `make claude` replaces
    wrapper.write_text(f'#!/bin/sh\nexec {find_claude()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("SKYDECK_CLAUDE_BIN", str(wrapper))
    async with claude_rig(tmp_path, monkeypatch, WarmConfig()) as rig:
        await rig.add("def")
        await rig.turn("def", "remember the word kumquat")
        pids = {one_cli(rig, "def").pid}
        changes: list[tuple[dict[str, Any], Callable[[psutil.Process], bool]]] = [
            ({"model": "claude-fake-2"}, lambda p: "claude-fake-2" in p.cmdline()),
            ({"system_prompt": "You are warm."}, lambda p: "You are warm." in p.cmdline()),
            ({"env": {"WARM_TEST": "1"}}, lambda p: p.environ().get("WARM_TEST") == "1"),
        ]
        for change, shows in changes:
            await rig.registry.update("def", change)
            message = await rig.turn("def", f"what was the word? ({next(iter(change))})")
            assert message.state == "done" and any("kumquat" in t for t in history(rig))
            cli = one_cli(rig, "def")  # exactly one: the old one was gone first (W12)
            assert cli.pid not in pids and shows(cli) and "--resume" in cli.cmdline(), change
            pids.add(cli.pid)
        os.utime(wrapper, ns=(0, 0))
        await rig.turn("def", "and after an upgrade?")
        assert one_cli(rig, "def").pid not in pids and any("kumquat" in t for t in history(rig))
        assert rig.spawns == ["new", *["definition"] * 4]
        assert rig.api.requests[-1]["model"] == "claude-fake-2"


async def test_w12_w14_a_missing_session_heals_and_the_healed_one_stays_warm(
    rig: Rig,
) -> None:
    await rig.add("heal")
    lost = str(uuid.uuid4())
    with rig.store._tx() as db:
        db.execute("INSERT INTO sessions (agent, session_id) VALUES ('heal', ?)", (lost,))
    message = await rig.turn("heal", "hello again")
    healed = await rig.store.get_session("heal")
    assert message.state == "done" and healed not in (None, lost)
    cli = one_cli(rig, "heal")
    assert cli.cmdline()[-2:] == ["--session-id", healed]
    await rig.turn("heal", "and again")
    assert one_cli(rig, "heal").pid == cli.pid and len(rig.spawns) == 2


async def test_w13_reset_closes_the_process_and_the_next_turn_starts_fresh(rig: Rig) -> None:
    await rig.add("fresh")
    await rig.turn("fresh", "remember the word kumquat")
    cli = one_cli(rig, "fresh")
    await rig.registry.reset("fresh")
    await until(lambda: gone(cli), "reset closes the idle process")
    message = await rig.turn("fresh", "what was the word?")
    assert message.state == "done" and not any("kumquat" in t for t in history(rig))
    first, last = rig.api.headers[0], rig.api.headers[-1]
    assert first["x-claude-code-session-id"] != last["x-claude-code-session-id"]
    assert "--session-id" in one_cli(rig, "fresh").cmdline()

    busy = one_cli(rig, "fresh")
    hold = trio.Event()
    rig.api.script(Step(hold=hold))
    running = await post(rig.registry, "fresh", "a slow one")
    await until(lambda: heard(rig, "a slow one"), "the turn reached the API")
    await rig.registry.reset("fresh")
    (failed,) = await settle(rig.store, [running], 10)
    assert failed.state == "failed"
    assert failed.error == "claude was stopped (the conversation was reset)"
    assert await rig.store.get_session("fresh") is None, "the reset holds"
    assert gone(busy)
    hold.set()


async def test_w15_deregister_busy_or_idle_leaves_no_process(rig: Rig) -> None:
    await rig.add("idle")
    await rig.add("busy")
    await rig.turn("idle", "hello there")
    await rig.turn("busy", "hello there")
    hold = trio.Event()
    rig.api.script(Step(hold=hold))
    running = await post(rig.registry, "busy", "a slow one")
    await until(lambda: heard(rig, "a slow one"), "the turn reached the API")
    await rig.registry.remove("busy")
    await rig.registry.remove("idle")
    workspaces = [rig.workspaces / "idle", rig.workspaces / "busy"]
    await until(lambda: not any(claude_processes(w) for w in workspaces), "no process left", 5)
    message = await rig.store.get_message(running)
    assert message is not None and message.state == "cancelled"
    hold.set()


async def test_w15_a_channel_move_restarts_the_process_on_the_new_channel(rig: Rig) -> None:
    await rig.add("mover")
    await rig.turn("mover", "remember the word kumquat")
    cli = one_cli(rig, "mover")
    await rig.registry.update("mover", {"channel": "elsewhere"})
    await until(lambda: gone(cli), "the move closes the process")
    message = await rig.turn("elsewhere", "what was the word?")
    assert message.state == "done" and any("kumquat" in t for t in history(rig))
    assert one_cli(rig, "mover").pid != cli.pid


# -- W16, W17: a real daemon ----------------------------------------------------------


async def fake_api(nursery: trio.Nursery) -> FakeAnthropic:
    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    (api.url,) = await nursery.start(serve, api.app(), config)
    return api


async def start_daemon(data: Path, api: FakeAnthropic, *extra: str) -> DaemonProcess:
    env = {"ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": API_KEY}
    return await trio.to_thread.run_sync(lambda: DaemonProcess(data, "--no-demo", *extra, env=env))


async def turn_done(client: httpx.AsyncClient, channel: str, content: str) -> dict[str, Any]:
    ack = await client.post(f"/api/channels/{channel}/messages", json={"content": content})
    return await settled(client, str(ack.json()["id"]))


async def settled(client: httpx.AsyncClient, message_id: str) -> dict[str, Any]:
    with trio.fail_after(60):
        while True:
            message: dict[str, Any] = (await client.get(f"/api/messages/{message_id}")).json()
            if message["state"] in ("done", "failed", "cancelled"):
                return message
            await trio.sleep(0.05)


async def test_w16_shutdown_exits_0_only_after_every_warm_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    hold = trio.Event()
    async with trio.open_nursery() as nursery:
        api = await fake_api(nursery)
        daemon = await start_daemon(data, api, "--grace", "1")
        try:
            async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as client:
                for name in ("idle", "busy"):
                    body = {"name": name, "channel": name, "backend": "claude"}
                    assert (await client.post("/api/agents", json=body)).status_code == 201
                    assert (await turn_done(client, name, "hello there"))["state"] == "done"
                api.script(Step(hold=hold))
                await client.post("/api/channels/busy/messages", json={"content": "a slow one"})
                with trio.fail_after(30):
                    while len(api.requests) < 3:
                        await trio.sleep(0.05)
                health = (await client.get("/health")).json()["claude_warm"]
                rows = {row["agent"]: row for row in health["processes"]}
                assert (rows["idle"]["state"], rows["busy"]["state"]) == ("idle", "busy")
                assert rows["idle"]["turns"] == 1 and rows["idle"]["rss_bytes"] > 50 * MIB
                metrics = (await client.get("/metrics")).text
                assert "skydeck_claude_warm_processes 2.0" in metrics
                assert 'skydeck_claude_warm_spawns_total{reason="new"} 2.0' in metrics
            code = await trio.to_thread.run_sync(daemon.stop)
            left = [p for a in ("idle", "busy") for p in cli_processes(data / "workspaces" / a)]
            assert (code, left) == (0, [])
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()
            hold.set()
            nursery.cancel_scope.cancel()


async def test_w17_restart_kills_warm_orphans_before_the_replay(tmp_path: Path) -> None:
    """Unsandboxed: inside a sandbox the daemon's death also cuts the CLI's only way to
    the API, so nothing is left running to prove the sweep (S21; T5 covers that case)."""
    data = tmp_path / "data"
    frozen: list[psutil.Process] = []
    async with trio.open_nursery() as nursery:
        api = await fake_api(nursery)
        daemon = await start_daemon(data, api, "--sandbox", "off")
        try:
            async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as client:
                body = {"name": "orphan", "channel": "orphan", "backend": "claude"}
                assert (await client.post("/api/agents", json=body)).status_code == 201
                await turn_done(client, "orphan", "remember the word kumquat")
                api.script(Step(stall=True))
                ack = await client.post(
                    "/api/channels/orphan/messages", json={"content": "interrupted by a crash"}
                )
                with trio.fail_after(30):
                    while len(api.requests) < 2:
                        await trio.sleep(0.05)
            (cli,) = cli_processes(data / "workspaces" / "orphan")
            shim = cli.parent()
            with sqlite3.connect(data / "skydeck.db") as db:
                assert db.execute("SELECT pid FROM processes").fetchall() == [(shim.pid,)]
            # A shim that cannot act (stopped here; on a host: killed with the daemon, or
            # stuck) leaves the warm CLI running after the daemon dies, mid-turn.
            frozen += [shim, cli]
            os.kill(shim.pid, signal.SIGSTOP)
            await trio.to_thread.run_sync(daemon.kill)
            await trio.sleep(0.5)
            assert not gone(cli), "the warm CLI outlived the daemon"
            alive_at_replay: list[bool] = []
            api.on_request = lambda body: alive_at_replay.append(not gone(cli))
            daemon = await start_daemon(data, api, "--sandbox", "off")
            async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as client:
                message = await settled(client, str(ack.json()["id"]))
            assert message["state"] == "done" and message["attempts"] == 2
            assert alive_at_replay == [False], "the orphan was killed before the replay ran"
            assert any("kumquat" in t for t in FakeAnthropic.texts(api.requests[-1]))
            assert await trio.to_thread.run_sync(daemon.stop) == 0
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()
            for proc in frozen:
                with suppress(psutil.Error):
                    proc.kill()
            nursery.cancel_scope.cancel()


def test_w11_fingerprint_names_what_changed() -> None:
    stat = os.stat(sys.executable)
    base = Fingerprint.of("/bin/claude", stat, ["claude", "-p"], {"HOME": "/w"}, "/w")
    same = Fingerprint.of("/bin/claude", stat, ["claude", "-p"], {"HOME": "/w"}, "/w")
    moved = Fingerprint.of("/bin/claude", None, ["claude", "-p", "--model", "m"], {}, "/w")
    assert base == same and base.changes(same) == []
    assert base.changes(moved) == ["inode", "mtime_ns", "argv", "env"]
