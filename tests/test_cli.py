"""The real `skydeck` command against a real daemon process."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon_process import SKYDECK, DaemonProcess, clean_env, cli
from skydeck.cli import build_parser


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path_factory.mktemp("cli") / "data")
    yield process
    assert process.stop() == 0, "SIGTERM exits 0"


def test_agent_add_send_wait_and_remove(daemon: DaemonProcess) -> None:
    url = daemon.url
    added = cli(
        url,
        "agent",
        "add",
        "up",
        "--channel",
        "up",
        "--backend",
        "command",
        "--command",
        "tr a-z A-Z",
        "--timeout",
        "30",
    )
    assert added.returncode == 0, added.stderr
    assert "added agent up on channel up (command)" in added.stdout
    listed = cli(url, "agent", "ls")
    assert listed.returncode == 0 and "up" in listed.stdout and "demo" in listed.stdout
    shown = json.loads(cli(url, "agent", "show", "up", "--json").stdout)
    assert (shown["command"], shown["timeout_s"]) == (["tr", "a-z", "A-Z"], 30)
    sent = cli(url, "send", "up", "hello cli", "--wait")
    assert (sent.returncode, sent.stdout) == (0, "HELLO CLI\n")
    flag = cli(url, "send", "up", "-v --help", "--wait")
    assert (flag.returncode, flag.stdout) == (0, "-V --HELP\n"), "a prompt that looks like flags"
    posted = cli(url, "send", "demo", "no wait")
    assert posted.returncode == 0 and posted.stdout.startswith("queued ")
    assert cli(url, "agent", "reset", "up").returncode == 0
    assert cli(url, "agent", "rm", "up").returncode == 0
    gone = cli(url, "agent", "show", "up")
    assert gone.returncode == 1
    assert gone.stderr == "skydeck: no agent named 'up' (field: name)\n", "one readable line"


def test_send_wait_exits_1_on_a_failed_turn(daemon: DaemonProcess) -> None:
    cli(
        daemon.url,
        "agent",
        "add",
        "bad",
        "--channel",
        "bad",
        "--backend",
        "command",
        "--command",
        "sh -c 'echo it broke >&2; exit 4'",
    )
    result = cli(daemon.url, "send", "bad", "x", "--wait")
    assert result.returncode == 1
    assert result.stderr == "skydeck: turn failed: it broke\n"


def test_bad_input_is_one_line_exit_1(daemon: DaemonProcess) -> None:
    result = cli(daemon.url, "agent", "add", "__proto__", "--channel", "x")
    assert result.returncode == 1
    assert result.stderr.startswith("skydeck: name must be") and result.stderr.count("\n") == 1


def test_unreachable_daemon_exits_2_with_a_hint() -> None:
    result = cli("http://127.0.0.1:9", "agent", "ls")
    assert result.returncode == 2
    assert "skydeck serve" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_public_bind_without_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [SKYDECK, "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the `skydeck` command, with its path (`()`, `("agent", "add")`...)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_command_option_and_argument_has_a_help_line() -> None:
    missing = []
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                missing += [f"{' '.join(path)} {name}" for name, text in helps.items() if not text]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert missing == []


def test_help_is_plain_text_and_each_command_shows_an_example() -> None:
    paths = [path for path, _ in _commands(build_parser())]
    assert ("agent", "add") in paths and ("send",) in paths and len(paths) > 10
    for path in paths:
        result = subprocess.run(
            [SKYDECK, *path, "--help"], capture_output=True, text=True, timeout=30, env=clean_env()
        )
        shown = " ".join(("skydeck", *path))
        assert result.returncode == 0, (shown, result.stderr)
        assert "`" not in result.stdout, f"{shown} --help: no reST markup"
        heading = "examples:\n" if not path else "example:\n"
        assert heading in result.stdout, f"{shown} --help shows an example"
        examples = result.stdout.split(heading, 1)[1]
        assert re.search(rf"^  (\S+=\S+ )?{re.escape(shown)}\b", examples, re.M), shown


def test_send_to_a_channel_without_an_agent_says_so_on_stderr(daemon: DaemonProcess) -> None:
    buffered = cli(daemon.url, "send", "nobody-yet", "hello later")
    assert buffered.returncode == 0
    assert re.fullmatch(r"buffered \S+\n", buffered.stdout), "stdout stays `<state> <id>`"
    assert buffered.stderr == "no agent serves channel nobody-yet yet; it runs when one registers\n"
    queued = cli(daemon.url, "send", "demo", "hello now")
    assert queued.stdout.startswith("queued ") and queued.stderr == "", "a hint only when buffered"
    added = cli(daemon.url, "agent", "add", "late", "--channel", "nobody-yet", "--backend", "echo")
    assert added.returncode == 0, added.stderr
    message_id = buffered.stdout.split()[1]
    deadline = time.monotonic() + 20
    while (state := _message(daemon.url, message_id)["state"]) != "done":
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def _message(url: str, message_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/api/messages/{message_id}").json()
    return data


def test_agent_add_warns_when_the_daemon_cannot_run_claude(tmp_path: Path) -> None:
    stub = tmp_path / "claude-stub"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    for claude_bin, runs_claude in ((tmp_path / "no-such-claude", False), (stub, True)):
        daemon = DaemonProcess(
            tmp_path / f"data-{runs_claude}", env={"SKYDECK_CLAUDE_BIN": str(claude_bin)}
        )
        try:
            backends = httpx.get(f"{daemon.url}/api").json()["backends"]
            assert backends == {"claude": runs_claude, "command": True, "echo": True}
            default = cli(daemon.url, "agent", "add", "helper", "--channel", "helper")
            assert default.returncode == 0, "the API still takes a claude agent"
            assert default.stdout == "added agent helper on channel helper (claude)\n"
            explicit = cli(
                daemon.url, "agent", "add", "c2", "--channel", "c2", "--backend", "claude"
            )
            echo = cli(daemon.url, "agent", "add", "e2", "--channel", "e2", "--backend", "echo")
            assert echo.stderr == ""
            if runs_claude:
                assert default.stderr == explicit.stderr == ""
            else:
                for added, name in ((default, "helper"), (explicit, "c2")):
                    assert added.stderr == (
                        "skydeck: warning: the daemon cannot run the claude backend, so the turns "
                        f"of agent {name} fail until it can; it runs command, echo "
                        "(choose with --backend)\n"
                    )
        finally:
            assert daemon.stop() == 0
