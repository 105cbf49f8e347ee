"""R28 with a real daemon process: SIGKILL mid-load, restart on the same data
dir (or, on PostgreSQL, the same database and host id), and every acknowledged
message still ends exactly once, in order."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from daemon_process import DaemonProcess

SLOW_ECHO = "import sys, time; d = sys.stdin.read(); time.sleep(0.03); print(d)"
CHANNELS = ("alpha", "beta", "gamma")
PER_CHANNEL = 30


Rows = Callable[[str], list[tuple[object, ...]]]


@pytest.fixture(params=["sqlite", "postgres"])
def store_of(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], Rows]:
    """multi-host.md §8: the daemon's flags for each store, and a query on it."""
    if request.param == "sqlite":

        def sqlite_rows(sql: str) -> list[tuple[object, ...]]:
            with sqlite3.connect(tmp_path / "data" / "skydeck.db") as db:
                return db.execute(sql).fetchall()

        return [], sqlite_rows
    import psycopg

    url: str = request.getfixturevalue("pg_url")

    def pg_rows(sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET search_path = skydeck")
            return conn.execute(sql.encode()).fetchall()

    return ["--store", url, "--host-id", "h1"], pg_rows


def test_r28_kill_9_mid_load_then_restart_replays_in_order(
    tmp_path: Path, store_of: tuple[list[str], Rows]
) -> None:
    flags, rows = store_of
    data = tmp_path / "data"
    first = DaemonProcess(data, "--no-demo", *flags)
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

    interrupted = {r[0] for r in rows("SELECT id FROM messages WHERE state = 'working'")}
    ((open_before,),) = rows("SELECT COUNT(*) FROM messages WHERE state IN ('queued','working')")
    assert isinstance(open_before, int) and open_before > 0, (
        "the kill must land while work is still open"
    )

    second = DaemonProcess(data, "--no-demo", *flags)
    try:
        with httpx.Client(base_url=second.url, timeout=10) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = rows("SELECT state FROM messages WHERE direction = 'in'")
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
