"""Issue 11, D2: a store that cannot commit (full disk, I/O error) must never
acknowledge a write it lost, and must not take the daemon down.

Three ways to make it fail, each real:
- the daemon's file size limit (RLIMIT_FSIZE, set from outside with prlimit):
  the WAL cannot grow, so COMMIT fails with SQLITE_IOERR / SQLITE_FULL;
- a small tmpfs that fills up (root only: it needs mount);
- `PRAGMA max_page_count` on the daemon's own connection (in-process), which
  makes an INSERT fail with SQLITE_FULL mid-transaction, so SQLite rolls back
  the neighbours' writes of the same group too.

Every time: the writes of the failed group get 507, the daemon stays up and
says so on /health (503), recovers by itself once there is room, and after a
restart every acknowledged message is there and ended exactly once.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from conftest import Daemon
from daemon_process import DaemonProcess
from skydeck.errors import StoreFailure
from skydeck.model import Inbound
from skydeck.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

FAILED = "the store could not commit: "


def post_until_507(client: httpx.Client, channel: str, size: int, limit: int = 400) -> list[str]:
    """Post messages of ``size`` bytes until one gets 507; the ids acknowledged before.
    Contents start with a 4-character tag: ``0000``, ``0001``, ..."""
    acked: list[str] = []
    for i in range(limit):
        response = client.post(
            f"/api/channels/{channel}/messages", json={"content": f"{i:04d} " + "x" * size}
        )
        if response.status_code == 507:
            assert set(response.json()) == {"ok", "error"} and response.json()["ok"] is False
            assert response.json()["error"].startswith(FAILED), response.text
            return acked
        assert response.status_code == 200, response.text
        acked.append(response.json()["id"])
    raise AssertionError(f"no 507 after {limit} posts")


def wait_health(client: httpx.Client, status: int, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/health")
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            body: dict[str, Any] = response.json()
            return body
        time.sleep(0.05)


def wait_done(client: httpx.Client, ids: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} messages never ended"
        state = client.get(f"/api/messages/{pending[0]}").json()["state"]
        if state == "done":
            pending.pop(0)
        else:
            time.sleep(0.02)


def assert_each_ended_once(db_path: Path, acked: list[str], refused: set[str]) -> None:
    """After a restart: every acknowledged message is there, `done`, with exactly
    one reply, in order; nothing that got a 507 was kept."""
    with closing(sqlite3.connect(db_path)) as db:
        inbound = db.execute(
            "SELECT id, content, state FROM messages WHERE direction = 'in' ORDER BY seq"
        ).fetchall()
        replies = Counter(
            row[0] for row in db.execute("SELECT in_reply_to FROM messages WHERE direction = 'out'")
        )
    stored = [row[0] for row in inbound]
    assert [i for i in stored if i in set(acked)] == acked, "an acknowledged message was lost"
    assert {row[2] for row in inbound if row[0] in set(acked)} == {"done"}
    assert all(replies[i] == 1 for i in acked), "every acknowledged message ran exactly once"
    assert not {row[1][:4] for row in inbound} & refused, "a refused (507) message was kept"


SLOW_ECHO = "import sys, time; text = sys.stdin.read(); time.sleep(1); print(text)"


def test_trust_d2_failed_commit_is_507_daemon_stays_up_and_recovers(tmp_path: Path) -> None:
    """The daemon's file size capped at the WAL's size (prlimit RLIMIT_FSIZE, from
    outside): every COMMIT fails, a turn's end among them."""
    data = tmp_path / "data"
    daemon = DaemonProcess(data, "--no-demo")
    pid = daemon.proc.pid
    try:
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            command = [sys.executable, "-c", SLOW_ECHO]
            spec = {"name": "a", "channel": "a", "backend": "command", "command": command}
            assert client.post("/api/agents", json=spec).status_code == 201
            posts = [client.post("/api/channels/a/messages", json={"content": c}) for c in "mn"]
            acked = [response.json()["id"] for response in posts]
            deadline = time.monotonic() + 10
            while client.get(f"/api/messages/{acked[0]}").json()["state"] != "working":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # m's turn is running; its end (and everything after) cannot commit.
            wal = (data / "skydeck.db-wal").stat().st_size
            assert (tmp_path / "data-daemon.log").stat().st_size < wal
            before = resource.prlimit(pid, resource.RLIMIT_FSIZE, (wal, resource.RLIM_INFINITY))

            refused = client.post("/api/channels/a/messages", json={"content": "r000"})
            assert refused.status_code == 507
            assert refused.json()["error"] == f"{FAILED}disk I/O error"
            health = wait_health(client, 503)
            assert health["status"] == "error"
            assert health["store"] == {"kind": "sqlite", "state": "error"}  # P26
            assert health["error"].startswith(FAILED)
            time.sleep(1.5)  # m's backend ends meanwhile; its end record is lost
            assert client.get(f"/api/messages/{acked[0]}").json()["state"] == "working"
            # Memory does not keep what was lost: no agent, no job.
            ghost = {"name": "ghost", "channel": "ghost", "backend": "echo"}
            assert client.post("/api/agents", json=ghost).status_code == 507
            job = {"name": "nightly", "channel": "a", "schedule": "0 3 * * *", "content": "x"}
            assert client.post("/api/jobs", json=job).status_code == 507
            assert daemon.proc.poll() is None, "the daemon must stay up"

            resource.prlimit(pid, resource.RLIMIT_FSIZE, before)  # room again
            assert wait_health(client, 200)["store"] == {"kind": "sqlite"}  # by itself, no restart
            assert client.get("/api/agents/ghost").status_code == 404
            assert client.get("/api/jobs/nightly").status_code == 404
            after = client.post("/api/channels/a/messages", json={"content": "o"})
            assert after.status_code == 200
            acked.append(after.json()["id"])
            wait_done(client, acked)
            replayed = client.get(f"/api/messages/{acked[0]}").json()
            assert replayed["attempts"] == 2, "m's lost turn ran again once the store was back"
    finally:
        assert daemon.stop() == 0
    assert DaemonProcess(data, "--no-demo").stop() == 0  # a restart finds nothing open
    assert_each_ended_once(data / "skydeck.db", acked, {"r000"})


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_trust_d2_real_full_tmpfs_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """The attack as reported: the data dir on a 4 MiB tmpfs that fills up."""
    data = tmp_path / "mnt"  # the daemon's log goes next to it, off the tmpfs
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data)], check=True)
    acked: list[str] = []
    try:
        daemon = DaemonProcess(data, "--no-demo")
        try:
            with httpx.Client(base_url=daemon.url, timeout=30) as client:
                spec = {"name": "a", "channel": "a", "backend": "echo"}
                assert client.post("/api/agents", json=spec).status_code == 201
                stat = os.statvfs(data)
                filler = data / "filler"
                filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 512 * 1024))

                acked += post_until_507(client, "a", size=8 * 1024)
                refused = f"{len(acked):04d}"
                assert wait_health(client, 503)["error"].startswith(FAILED)
                assert daemon.proc.poll() is None, "the daemon must stay up"

                filler.unlink()
                wait_health(client, 200)
                for i in range(3):
                    body = {"content": f"after {i}"}
                    response = client.post("/api/channels/a/messages", json=body)
                    assert response.status_code == 200
                    acked.append(response.json()["id"])
                wait_done(client, acked)
        finally:
            assert daemon.stop() == 0
        assert DaemonProcess(data, "--no-demo").stop() == 0
        assert_each_ended_once(data / "skydeck.db", acked, {refused})
    finally:
        subprocess.run(["umount", str(data)], check=True)


async def test_trust_d2_failed_insert_fails_its_whole_group_and_is_not_run(
    daemon: Daemon,
) -> None:
    """SQLITE_FULL on an INSERT: 507 (not 500); the neighbour whose write SQLite
    rolled back with it is not acknowledged and never runs; recovery by itself."""
    store, registry = daemon.service.store, daemon.service.registry
    assert isinstance(store, SQLiteStore)
    db = store._db  # max_page_count is per connection: only the daemon's own will do
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")
    outcome: dict[str, bool] = {}

    async def neighbour(task_status: TaskStatus[str]) -> None:
        accepted = await registry.submit(Inbound(channel="demo", content="neighbour"))
        task_status.started(accepted.id)  # it runs on into flushed(): waiting for the commit
        try:
            await store.flushed()
            outcome["acked"] = True
        except StoreFailure:
            outcome["acked"] = False

    async with trio.open_nursery() as nursery:
        neighbour_id = await nursery.start(neighbour)
        with pytest.raises(StoreFailure, match="database or disk is full"):
            await registry.submit(Inbound(channel="demo", content="y" * 200_000))
    stored = await store.get_message(neighbour_id) is not None
    assert outcome["acked"] == stored, "acknowledged if and only if stored"
    assert not stored, "SQLite rolled the whole group back"

    big = await daemon.client.post("/api/channels/demo/messages", json={"content": "z" * 200_000})
    assert big.status_code == 507
    assert big.json() == {"ok": False, "error": f"{FAILED}database or disk is full"}
    health = await daemon.client.get("/health")
    assert health.status_code == 503
    assert health.json()["store"] == {"kind": "sqlite", "state": "error"}

    db.execute("PRAGMA max_page_count = 1073741823")
    with trio.fail_after(10):
        while (await daemon.client.get("/health")).status_code != 200:
            await trio.sleep(0.05)
    ok = await daemon.client.post("/api/channels/demo/messages", json={"content": "after"})
    assert ok.status_code == 200
    with trio.fail_after(10):
        while len(transcript := (await store.list_messages("demo", limit=100)).messages) < 2:
            await trio.sleep(0.02)
    assert [m.content for m in transcript] == ["after", "echo: after"], "no lost write ran"


async def test_trust_d2_a_batch_is_all_or_nothing_under_a_store_failure(daemon: Daemon) -> None:
    """POST /api/inbound/batch: a 507 keeps no item and runs none (issue 13 with D2)."""
    store = daemon.service.store
    assert isinstance(store, SQLiteStore)
    db = store._db
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages + 2}")
    items = [{"channel": "demo", "content": f"small {i}"} for i in range(3)]
    items.append({"channel": "demo", "content": "y" * 200_000})
    response = await daemon.client.post("/api/inbound/batch", json={"messages": items})
    assert response.status_code == 507, response.text
    db.execute("PRAGMA max_page_count = 1073741823")
    with trio.fail_after(10):
        while (await daemon.client.get("/health")).status_code != 200:
            await trio.sleep(0.05)
    await trio.sleep(0.5)  # a dispatched item would have run by now
    assert (await store.list_messages("demo", limit=100)).messages == [], (
        "nothing kept, nothing ran"
    )
