"""Jobs over HTTP and the CLI, and a real daemon killed across a slot boundary."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from conftest import Daemon
from daemon_process import DaemonProcess, cli

JOB = {"name": "nightly", "channel": "demo", "schedule": "0 3 * * *", "content": "report"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schedule": "* * * * * *"}, "schedule"),  # croniter takes 6 fields; the API does not
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"schedule": "every day"}, "schedule"),
        ({"schedule": "0 0 31 2 *"}, "schedule"),  # valid to croniter, but never fires
        ({"schedule": 5}, "schedule"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"channel": "__proto__"}, "channel"),
        ({"name": "a/b"}, "name"),
        ({"content": ""}, "content"),
        ({"enabled": "yes"}, "enabled"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_job_is_400_naming_the_field(
    daemon: Daemon, change: dict[str, object], field: str
) -> None:
    response = await daemon.client.post("/api/jobs", json={**JOB, **change})
    assert (response.status_code, response.json()["field"]) == (400, field), response.text
    assert daemon.count_rows("jobs") == 0


async def test_job_crud_run_now_and_conflict(daemon: Daemon) -> None:
    client = daemon.client
    created = await client.post("/api/jobs", json={**JOB, "timezone": "Europe/Berlin"})
    assert created.status_code == 201
    job = created.json()
    assert job["last_run_at"] is None and job["enabled"] is True
    assert job["next_run_at"].endswith("T02:00:00Z"), "03:00 in Berlin (winter) is 02:00 UTC"
    assert (await client.post("/api/jobs", json=JOB)).status_code == 409
    patched = (await client.patch("/api/jobs/nightly", json={"schedule": "0 4 * * *"})).json()
    assert patched["next_run_at"].endswith("T03:00:00Z")
    ack = (await client.post("/api/jobs/nightly/run")).json()
    assert ack["ok"] is True and ack["state"] == "queued"
    message = (await client.get(f"/api/messages/{ack['id']}")).json()
    assert message["metadata"]["job"] == "nightly" and message["content"] == "report"
    listed = (await client.get("/api/jobs")).json()["jobs"]
    assert [j["name"] for j in listed] == ["nightly"] and listed[0]["last_run_at"] is not None
    assert (await client.delete("/api/jobs/nightly")).json() == {"ok": True}
    assert (await client.get("/api/jobs/nightly")).status_code == 404
    assert (await client.post("/api/jobs/nightly/run")).status_code == 404


def test_cli_job_commands(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data")
    try:
        added = cli(
            daemon.url,
            "job",
            "add",
            "hourly",
            "--channel",
            "demo",
            "--schedule",
            "0 * * * *",
            "--content",
            "tick",
        )
        assert added.returncode == 0 and "next run" in added.stdout, added.stderr
        assert "hourly" in cli(daemon.url, "job", "ls").stdout
        ran = cli(daemon.url, "job", "run", "hourly")
        assert ran.returncode == 0 and ran.stdout.startswith("queued ")
        bad = cli(
            daemon.url,
            "job",
            "add",
            "x",
            "--channel",
            "demo",
            "--schedule",
            "* * *",
            "--content",
            "c",
        )
        assert bad.returncode == 1 and "schedule" in bad.stderr
        assert cli(daemon.url, "job", "rm", "hourly").returncode == 0
    finally:
        assert daemon.stop() == 0


def test_kill_9_across_a_slot_boundary_fires_that_slot_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DaemonProcess(data)
    httpx.post(
        f"{first.url}/api/jobs",
        json={
            "name": "minutely",
            "channel": "demo",
            "schedule": "* * * * *",
            "content": "tick",
        },
    ).raise_for_status()
    now = time.time()
    boundary = (int(now) // 60 + 1) * 60
    if boundary - now < 4:
        boundary += 60
    time.sleep(boundary - time.time() - 1.5)
    first.kill()  # down across the boundary
    time.sleep(max(0.0, boundary + 1.5 - time.time()))
    second = DaemonProcess(data)
    slot = datetime.fromtimestamp(boundary, UTC).isoformat().replace("+00:00", "Z")
    try:
        deadline = time.monotonic() + 20
        while True:
            with sqlite3.connect(data / "skydeck.db") as db:
                rows = db.execute(
                    "SELECT json_extract(metadata, '$.slot') FROM messages "
                    "WHERE json_extract(metadata, '$.job') = 'minutely'"
                ).fetchall()
            slots = [r[0] for r in rows]
            if slot in slots or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(1)  # anything that would double it has had its chance
        with sqlite3.connect(data / "skydeck.db") as db:
            slots = [
                r[0]
                for r in db.execute(
                    "SELECT json_extract(metadata, '$.slot') FROM messages "
                    "WHERE json_extract(metadata, '$.job') = 'minutely'"
                )
            ]
    finally:
        assert second.stop() == 0
    assert slots.count(slot) == 1, slots
    assert len(slots) == len(set(slots)), "no slot fired twice"
