"""T3-T6 and T9 (sandbox.md §5): the real pinned CLI inside real /usr/bin/bwrap, against
the fake API through the relay and the gateway, warm and cold."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import trio

from claude_rig import API_KEY, DAEMON_SECRET, Rig, claude_processes, claude_rig, cli_processes
from fake_anthropic import FakeAnthropic, Step
from helpers import alive_in, namespace_of, post, settle
from skydeck.backends.claude_warm import WarmConfig
from skydeck.backends.process import KILL_GRACE_S
from skydeck.sandbox.plan import PLACEHOLDER

VICTIM_SECRET = "victim-secret-" + os.urandom(6).hex()


@pytest.fixture(params=["on", "off"], ids=["warm", "cold"])
async def rig(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    monkeypatch.setenv("SKYDECK_CLAUDE_WARM", request.param)
    warm = WarmConfig.from_env(os.environ)
    async with claude_rig(tmp_path, monkeypatch, warm, sandbox="auto") as rig:
        assert rig.sandbox is not None and rig.sandbox.probe.available, rig.sandbox
        yield rig


def bash(command: str) -> Step:
    return Step(tool=("Bash", {"command": command, "description": "probe"}))


def tool_output(api: FakeAnthropic, request: int) -> str:
    """Everything the tool results of the ``request``-th real request hold, as one text."""
    return "\n".join(FakeAnthropic.texts(api.requests[request]))


async def test_t3_sandboxed_turns_resume_keep_the_workspace_and_drop_tmp(rig: Rig) -> None:
    """S10, S16, S22: a workspace claude agent's session survives PATCHes to off and back."""
    await rig.add("box")
    workspace = rig.workspaces / "box"
    rig.api.script(
        bash("echo kept > ws.txt; echo gone > /tmp/t3.txt; pwd; hostname"),
        Step(text="written"),
        bash("cat ws.txt; cat /tmp/t3.txt"),
        Step(text="read"),
    )
    first = await rig.turn("box", "remember the word kumquat")
    assert first.state == "done", first.error
    written = tool_output(rig.api, 1)
    assert str(workspace) in written and "skydeck" in written, written  # its cwd, its hostname
    session = await rig.store.get_session("box")
    assert session is not None
    assert list(workspace.glob(f".claude/projects/*/{session}.jsonl")), "persisted in the workspace"
    assert (workspace / "ws.txt").read_text() == "kept\n"
    second = await rig.turn("box", "what was the word?")
    assert second.state == "done", second.error
    assert any("kumquat" in t for t in FakeAnthropic.texts(rig.api.requests[2])), "resumed"
    read = tool_output(rig.api, 3)
    assert "kept" in read, read
    if rig.backend.pool is None:  # a new sandbox, a new /tmp
        assert "/tmp/t3.txt: No such file or directory" in read, read
    else:  # S20: a warm process keeps its one sandbox, /tmp included, for its whole life
        assert "gone" in read, read
    for turn, sandbox in ((3, "off"), (4, None)):
        await rig.registry.update("box", {"sandbox": sandbox})
        message = await rig.turn("box", f"turn {turn}")
        assert message.state == "done", message.error
        assert any("kumquat" in t for t in FakeAnthropic.texts(rig.api.requests[-1]))
        assert await rig.store.get_session("box") == session
    assert {h["x-claude-code-session-id"] for h in rig.api.headers} == {session}
    if rig.backend.pool is not None:  # W11: the mode is in the fingerprint
        assert rig.spawns == ["new", "definition", "definition"]


async def test_t4_bash_tool_sees_no_store_no_victim_no_loopback(rig: Rig, tmp_path: Path) -> None:
    """S9, S15: a Bash tool finds neither the SQLite file nor another agent's workspace,
    cannot reach host loopback, and its env holds no daemon secret."""
    victim = rig.workspaces / "victim"
    victim.mkdir(parents=True)
    (victim / "secret.txt").write_text(VICTIM_SECRET)
    port = rig.api.url.rsplit(":", 1)[1]
    await rig.add("tools")
    db = tmp_path / "skydeck.db"
    assert db.exists()
    rig.api.script(
        bash(
            f"cat {db}; cat {victim}/secret.txt; exec 3<>/dev/tcp/127.0.0.1/{port}; "
            "echo still here; env"
        ),
        Step(text="done"),
    )
    message = await rig.turn("tools", "look around")
    assert message.state == "done", message.error
    output = tool_output(rig.api, 1)
    assert output.count("No such file or directory") >= 2, output
    assert "Connection refused" in output, output
    assert "IS_SANDBOX=1" in output and "HTTPS_PROXY=http://127.0.0.1:3128" in output, output
    everything = json.dumps(rig.api.requests)
    assert DAEMON_SECRET not in everything and VICTIM_SECRET not in everything


async def sleeper_namespace(workspace: Path) -> str:
    """The pid namespace of the Bash tool's ``sleep 300`` once it runs."""
    with trio.fail_after(30):
        while True:
            for proc in claude_processes(workspace):
                try:
                    if proc.cmdline() == ["sleep", "300"]:
                        return namespace_of(proc.pid)
                except (OSError, psutil.Error):
                    continue
            await trio.sleep(0.05)


async def gone_within(namespace: str, seconds: float) -> None:
    with trio.fail_after(seconds):
        while alive_in(namespace):
            await trio.sleep(0.05)


STUBBORN = "(setsid sleep 300 &); trap '' TERM; sleep 300"


async def test_t5_a_timeout_empties_the_pid_namespace(rig: Rig) -> None:
    """S13, S21: R14's reason, and nothing of the sandbox outlives the grace."""
    await rig.add("slow", timeout_s=3)
    rig.api.script(bash(STUBBORN), Step(text="never"))
    message_id = await post(rig.registry, "slow", "sleep")
    namespace = await sleeper_namespace(rig.workspaces / "slow")
    assert namespace != namespace_of(os.getpid()), "the tool runs in the sandbox's namespace"
    (message,) = await settle(rig.store, [message_id], 30)
    assert (message.state, message.error) == ("failed", "turn timed out after 3 s")
    await gone_within(namespace, KILL_GRACE_S + 1)


async def test_t5_a_delete_empties_the_pid_namespace(rig: Rig) -> None:
    """S13, R26: removing the agent mid-turn ends its whole sandbox."""
    await rig.add("doomed")
    rig.api.script(bash(STUBBORN), Step(text="never"))
    message_id = await post(rig.registry, "doomed", "sleep")
    namespace = await sleeper_namespace(rig.workspaces / "doomed")
    await rig.registry.remove("doomed")
    await gone_within(namespace, KILL_GRACE_S + 1)
    message = await rig.store.get_message(message_id)
    assert message is not None and message.state == "cancelled"


async def test_t9_bwrap_argv_holds_no_secret_and_its_env_is_the_childs(rig: Rig) -> None:
    """S11: bwrap's cmdline has no secret; its environment is exactly the CLI's (what the
    sandbox can read in /proc/1/environ holds nothing the child does not have)."""
    await rig.add("stalled")
    rig.api.script(Step(stall=True))
    await post(rig.registry, "stalled", "wait")
    with trio.fail_after(30):
        while not rig.api.requests:
            await trio.sleep(0.05)
    (cli,) = cli_processes(rig.workspaces / "stalled")
    # Up from the CLI: the relay, bwrap's init, bwrap; the reaper is the first non-bwrap.
    bwraps = [proc for proc in cli.parents() if proc.name() == "bwrap"]
    assert len(bwraps) == 2, cli.parents()
    outer = bwraps[-1]
    cmdline = "\0".join(outer.cmdline())
    for secret in (API_KEY, DAEMON_SECRET):
        assert secret not in cmdline
    child = cli.environ()
    assert child.pop("PWD") == str(rig.workspaces / "stalled")  # bwrap's --chdir sets PWD
    assert outer.environ() == child
    assert "SKYDECK_TOKEN" not in outer.environ() and outer.environ()["IS_SANDBOX"] == "1"
    await rig.registry.remove("stalled")


# -- T6: strict ----------------------------------------------------------------------


async def test_t6_strict_keeps_the_key_outside(rig: Rig) -> None:
    """S11, S17 (b): the fake gets the real key; the sandbox only ever holds the
    placeholder, and the gateway tunnels nothing."""
    await rig.add("locked", sandbox="strict")
    rig.api.script(
        bash(
            "env; exec 3<>/dev/tcp/127.0.0.1/3128; "
            "printf 'CONNECT example.com:443 HTTP/1.1\\r\\nHost: example.com\\r\\n\\r\\n' >&3; "
            "head -c 300 <&3"
        ),
        Step(text="strict done"),
    )
    message = await rig.turn("locked", "show env")
    assert message.state == "done", message.error
    assert rig.api.headers and all(h.get("x-api-key") == API_KEY for h in rig.api.headers)
    output = tool_output(rig.api, 1)
    assert f"ANTHROPIC_API_KEY={PLACEHOLDER}" in output, output
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:3128" in output
    assert API_KEY not in output
    assert "HTTP/1.1 403" in output and "example.com:443 is not allowed" in output, output


async def test_t6_strict_with_only_an_oauth_token_fails_readably(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "oauth-token")
    await rig.add("oauth", sandbox="strict")
    message = await rig.turn("oauth", "hello")
    assert message.state == "failed"
    assert message.error == (
        "strict sandbox needs ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN "
        "(an OAuth token cannot be injected)"
    )
    assert not rig.api.requests
