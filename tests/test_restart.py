"""R28 with a real daemon process: SIGKILL mid-load, restart on the same data
dir, and every acknowledged message still ends exactly once, in order."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import httpx

from daemon_process import DaemonProcess

SLOW_ECHO = "import sys, time; d = sys.stdin.read(); time.sleep(0.03); print(d)"
CHANNELS = ("alpha", "beta", "gamma")
PER_CHANNEL = 30


def rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql).fetchall()


def test_r28_kill_9_mid_load_then_restart_replays_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DaemonProcess(data, "--no-demo")
    acked: dict[str, list[str]] = {ch: [] for ch in CHANNELS}
    with httpx.Client(base_url=first.url, timeout=10) as client:
        for ch in CHANNELS:
            body = {
                "name": ch,
                "channel": ch,
                "backend": "command",
                "command": [sys.executable, "-c", SLOW_ECHO],
            }
            assert client.post("/api/agents", json=body).status_code == 201
        for i in range(PER_CHANNEL):
            for ch in CHANNELS:
                ack = client.post(f"/api/channels/{ch}/messages", json={"content": f"{ch}-{i}"})
                assert ack.status_code == 200
                acked[ch].append(ack.json()["id"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = client.get("/api/channels/alpha/messages", params={"limit": 500}).json()
            if sum(m["state"] == "done" for m in page["messages"]) >= 5:
                break
            time.sleep(0.02)
    first.kill()

    db = data / "skydeck.db"
    interrupted = {r[0] for r in rows(db, "SELECT id FROM messages WHERE state = 'working'")}
    ((open_before,),) = rows(
        db, "SELECT COUNT(*) FROM messages WHERE state IN ('queued','working')"
    )
    assert isinstance(open_before, int) and open_before > 0, (
        "the kill must land while work is still open"
    )

    second = DaemonProcess(data, "--no-demo")
    try:
        with httpx.Client(base_url=second.url, timeout=10) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = rows(db, "SELECT state FROM messages WHERE direction = 'in'")
                if all(s[0] in ("done", "failed", "cancelled", "dropped") for s in states):
                    break
                time.sleep(0.1)
            for ch in CHANNELS:
                messages = client.get(f"/api/channels/{ch}/messages", params={"limit": 500}).json()
                inbound = [m for m in messages["messages"] if m["direction"] == "in"]
                replies = [m for m in messages["messages"] if m["direction"] == "out"]
                assert [m["id"] for m in inbound] == acked[ch], "every acknowledged message kept"
                assert {m["state"] for m in inbound} == {"done"}
                assert [r["in_reply_to"] for r in replies] == acked[ch], (
                    "exactly one reply per message, in per-channel order"
                )
                assert [r["content"] for r in replies] == [f"{ch}-{i}" for i in range(PER_CHANNEL)]
                for m in inbound:
                    if m["id"] in interrupted:
                        assert m["attempts"] == 2, "an interrupted turn is re-run"
    finally:
        assert second.stop() == 0
