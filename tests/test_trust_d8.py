"""Issue 11, D8 (low).

- A start that cannot go on (a corrupt or truncated store, a read-only data
  dir, a full disk, the data dir locked by another daemon) is one line naming
  the path and exit code 2, never a Python traceback.
- R7's cap also holds when a deregister puts queued messages back to
  `buffered` (50,281 once stayed buffered until the next post).
- `/metrics` counts dropped messages, by either path.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from daemon_process import DaemonProcess, serve_once
from skydeck.service import Service, Settings

ROOT = os.geteuid() == 0


def stored_daemon_data(data: Path, messages: int = 200) -> None:
    """A data dir that a real daemon served (one agent, some messages), then left."""
    daemon = DaemonProcess(data, "--no-demo")
    with httpx.Client(base_url=daemon.url) as client:
        client.post("/api/agents", json={"name": "a", "channel": "a", "backend": "echo"})
        for i in range(messages):
            client.post("/api/channels/b/messages", json={"content": f"{i} " + "x" * 500})
    assert daemon.stop() == 0


@contextmanager
def mounted(target: Path, *options: str) -> Iterator[None]:
    subprocess.run(["mount", *options, str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def corrupt(data: Path) -> Iterator[str]:
    data.mkdir()
    (data / "skydeck.db").write_bytes(os.urandom(8192))
    yield f"skydeck: cannot open the store {data}/skydeck.db: file is not a database"


def truncated(data: Path) -> Iterator[str]:
    stored_daemon_data(data)
    db = data / "skydeck.db"
    with db.open("r+b") as file:
        file.truncate(db.stat().st_size // 2)
    yield f"skydeck: cannot open the store {db}: database disk image is malformed"


def read_only(data: Path) -> Iterator[str]:
    stored_daemon_data(data)
    (data / "skydeck.lock").unlink()
    if ROOT:  # root ignores permission bits: a read-only bind mount
        with mounted(data, "--bind", str(data)):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(data)], check=True)
            yield f"skydeck: cannot use {data}/skydeck.lock: Read-only file system"
    else:
        data.chmod(0o555)
        try:
            yield f"skydeck: cannot use {data}/skydeck.lock: Permission denied"
        finally:
            data.chmod(0o755)


def full_disk(data: Path) -> Iterator[str]:
    if not ROOT:
        pytest.skip("a full disk needs a tmpfs, and mounting one needs root")
    data.mkdir()
    with mounted(data, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        stored_daemon_data(data, messages=5)
        with open(data / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 4096)
        yield f"skydeck: cannot open the store {data}/skydeck.db: disk I/O error"


def locked(data: Path) -> Iterator[str]:
    data.mkdir()
    with open(data / "skydeck.lock", "a+b", buffering=0) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a live daemon holds
        lock.write(b"4242\n")
        yield f"skydeck: another skydeck (pid 4242) is already serving {data}"


@pytest.mark.parametrize("case", [corrupt, truncated, read_only, full_disk, locked])
def test_trust_d8_start_up_failure_is_one_line_naming_the_path_and_exit_2(
    tmp_path: Path, case: Callable[[Path], Iterator[str]]
) -> None:
    data = tmp_path / "data"
    setup = case(data)
    expected = next(setup)
    try:
        result = serve_once(data)
    finally:
        next(setup, None)
    assert "Traceback" not in result.stderr
    assert result.stderr == f"{expected}\n"
    assert result.returncode == 2


def test_trust_d8_corruption_found_after_the_store_opened_is_one_line(tmp_path: Path) -> None:
    """A broken page that only shows when the stored agents are read (inside the
    Trio run, after the store opened and migrated): still one line, exit 2."""
    data = tmp_path / "data"
    stored_daemon_data(data)
    db_path = data / "skydeck.db"
    with closing(sqlite3.connect(db_path)) as db:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'agents'").fetchone()
    with db_path.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)
    result = serve_once(data)
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f"skydeck: cannot open the store {db_path}: database disk image is malformed\n"
    )
    assert result.returncode == 2


HANG = "import time; time.sleep(60)"


async def test_trust_d8_deregister_drops_over_the_cap_and_metrics_count_drops(
    tmp_path: Path,
) -> None:
    service = Service(Settings(port=0, data_dir=tmp_path / "data", buffer_cap=3, demo=False))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=binds[0]) as client:
            command = [sys.executable, "-c", HANG]
            spec = {"name": "a", "channel": "a", "backend": "command", "command": command}
            assert (await client.post("/api/agents", json=spec)).status_code == 201
            ids = []
            for i in range(6):  # m0 runs (and hangs), m1..m5 are queued
                response = await client.post("/api/channels/a/messages", json={"content": f"{i}"})
                ids.append(response.json()["id"])

            assert (await client.delete("/api/agents/a")).status_code == 200
            states = [(await client.get(f"/api/messages/{i}")).json()["state"] for i in ids]
            assert states == ["cancelled", "dropped", "dropped", "buffered", "buffered", "buffered"]
            assert (await client.get("/health")).json()["buffered"] == 3
            metrics = (await client.get("/metrics")).text
            assert "skydeck_messages_dropped_total 2.0" in metrics

            await client.post("/api/channels/a/messages", json={"content": "new"})
            assert (await client.get(f"/api/messages/{ids[3]}")).json()["state"] == "dropped"
            metrics = (await client.get("/metrics")).text
            assert "skydeck_messages_dropped_total 3.0" in metrics
        service.stop()
