"""Issue 11, D3: two daemons on one data dir both replayed and ran the open
messages (8 of 10 twice). Now the first holds `<data dir>/skydeck.lock`
(flock) for its lifetime and a second one exits 2 at once, saying who holds it;
a lock left by a killed daemon (or held open by nothing but its orphans) never
blocks a start."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx

from daemon_process import DaemonProcess, serve_once

SLOW_ECHO = "import sys, time; text = sys.stdin.read(); time.sleep(0.1); print(text)"


def test_trust_d3_second_daemon_on_one_data_dir_exits_2_and_runs_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DaemonProcess(data, "--no-demo")
    try:
        with httpx.Client(base_url=first.url, timeout=30) as client:
            command = [sys.executable, "-c", SLOW_ECHO]
            spec = {"name": "x", "channel": "x", "backend": "command", "command": command}
            assert client.post("/api/agents", json=spec).status_code == 201
            ids = [
                client.post("/api/channels/x/messages", json={"content": f"m{i}"}).json()["id"]
                for i in range(10)
            ]
            started = time.monotonic()
            second = serve_once(data, timeout=20)
            assert time.monotonic() - started < 5
            assert second.returncode == 2
            assert second.stderr == (
                f"skydeck: another skydeck (pid {first.proc.pid}) is already serving {data}\n"
            )
            assert second.stdout == ""
            deadline = time.monotonic() + 30
            while client.get(f"/api/messages/{ids[-1]}").json()["state"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.get("/health").status_code == 200, "the first one keeps serving"
    finally:
        assert first.stop() == 0
    with closing(sqlite3.connect(data / "skydeck.db")) as db:
        replies = db.execute(
            "SELECT in_reply_to, COUNT(*) FROM messages WHERE direction = 'out' "
            "GROUP BY in_reply_to"
        ).fetchall()
    assert sorted(replies) == sorted((i, 1) for i in ids), "each message ran exactly once"


HANG = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"


def test_trust_d3_lock_of_a_killed_daemon_never_blocks_a_start(tmp_path: Path) -> None:
    """SIGKILL mid-turn: the kernel released the lock with the daemon (the turn's
    processes never held it; D5's reaper takes them down with the daemon)."""
    data, pid_file = tmp_path / "data", tmp_path / "agent.pid"
    # Unsandboxed: the agent writes its host pid outside its workspace.
    first = DaemonProcess(data, "--no-demo", "--sandbox", "off")
    with httpx.Client(base_url=first.url, timeout=30) as client:
        command = [sys.executable, "-c", HANG, str(pid_file)]
        spec = {"name": "x", "channel": "x", "backend": "command", "command": command}
        assert client.post("/api/agents", json=spec).status_code == 201
        assert client.post("/api/channels/x/messages", json={"content": "hang"}).status_code == 200
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    orphan = int(pid_file.read_text())
    pid_file.unlink()
    first.kill()
    try:
        assert (data / "skydeck.lock").read_text() == f"{first.proc.pid}\n"  # stale, left behind
        second = DaemonProcess(data, "--no-demo", "--grace", "1")
        try:
            assert (data / "skydeck.lock").read_text() == f"{second.proc.pid}\n"
            with httpx.Client(base_url=second.url) as client:
                assert client.get("/health").status_code == 200
        finally:
            assert second.stop() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
