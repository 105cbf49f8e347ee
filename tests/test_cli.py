"""The real `skydeck` command against a real daemon process."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import SKYDECK, DaemonProcess, clean_env, cli


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
