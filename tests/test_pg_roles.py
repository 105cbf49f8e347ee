"""Real `skydeck serve --store postgres://...` daemons: PT11 in real time (P17,
P22, P23) and P24 (a channel run elsewhere shows the same status on every host)."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from daemon_process import DaemonProcess
from fake_vault import TOKEN, FakeVault
from pg import query
from skydeck.model import Job
from skydeck.scheduler import iso
from skydeck.service import Service, Settings
from test_pg_hosts import create_echo_agents, host, owners

pytestmark = pytest.mark.slow


def role_holder(url: str) -> str | None:
    """The live owner of ``role:scheduler``, if any."""
    rows = query(
        url,
        "SELECT l.owner FROM leases l JOIN hosts h "
        "ON (h.host_id, h.incarnation) = (l.owner, l.incarnation) "
        "WHERE l.name = 'role:scheduler' AND h.expires_at > now()",
    )
    return str(rows[0][0]) if rows else None


def slots(url: str) -> list[tuple[str, str, str | None]]:
    rows = query(url, "SELECT job, slot, message_id FROM job_slots ORDER BY job, slot")
    return [(str(j), str(s), None if m is None else str(m)) for j, s, m in rows]


async def fired_here(url: str) -> float:
    """This daemon's `skydeck_job_slots_total{outcome="fired"}`."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if line.startswith('skydeck_job_slots_total{outcome="fired"}'):
            return float(line.split()[-1])
    return 0.0


async def wait_until(condition: object, timeout: float, step: float = 0.05) -> float:
    """Poll ``condition()`` until truthy; the seconds it took."""
    started = time.monotonic()
    with trio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await trio.sleep(step)
    return time.monotonic() - started


async def test_pt11_real_time_two_daemons_every_minute_two_slots_and_a_kill(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    """Two daemons, a `* * * * *` job: its slots fire once each, one message
    each, across a SIGKILL of the role holder (P17: another host holds the
    role within 3 s). The job was due a minute ago when the daemons started,
    so its first slot is the catch-up (the latest due slot, P23), and the
    second comes at the next minute: at most ~65 s, whatever the start time.
    A second job, created through the host without the role, fires there
    too (P22: the holder learns of it)."""
    ((db_now,),) = query(pg_url, "SELECT now()")
    assert isinstance(db_now, datetime)
    if db_now.second > 45:  # start just after a minute: no slot falls in the set-up
        await trio.sleep(61 - db_now.second - db_now.microsecond / 1e6)
        ((db_now,),) = query(pg_url, "SELECT now()")
        assert isinstance(db_now, datetime)
    minute = db_now.astimezone(UTC).replace(second=0, microsecond=0)
    due = Job(
        name="tick",
        channel="tick",
        schedule="* * * * *",
        content="tick",
        next_run_at=iso(minute - timedelta(minutes=1)),
    )
    query(
        pg_url,
        "INSERT INTO jobs (name, spec) VALUES (%s, %s) RETURNING name",
        due.name,
        json.dumps(due.to_json()),
    )
    first, second = host(tmp_path, pg_url, "h1"), host(tmp_path, pg_url, "h2")
    stop_all += [first, second]
    await create_echo_agents(first.url, ["tick", "tock"])
    await wait_until(lambda: role_holder(pg_url) is not None, 10)
    holder = role_holder(pg_url)
    daemons = {"h1": first, "h2": second}
    other = "h2" if holder == "h1" else "h1"
    async with httpx.AsyncClient(base_url=daemons[other].url, timeout=10) as client:
        created = await client.post(
            "/api/jobs",
            json={"name": "tock", "channel": "tock", "schedule": "* * * * *", "content": "tock"},
        )
        assert created.status_code == 201, created.text

    # The catch-up: this minute's slot, at once, on the holder.
    await wait_until(lambda: [s for s in slots(pg_url) if s[0] == "tick"], 10)
    assert [s[1] for s in slots(pg_url)] == [iso(minute)]

    assert holder is not None
    # Only the holder fires (P23): the other host's scheduler did not even try.
    assert (await fired_here(daemons[holder].url), await fired_here(daemons[other].url)) == (1, 0)
    daemons[holder].kill()
    took = await wait_until(lambda: role_holder(pg_url) == other, 10)
    print(f"P17: role:scheduler held by {other} {took:.2f} s after the SIGKILL")
    assert took <= 3.0, f"role:scheduler moved in {took:.2f} s"

    # The next minute's slot of both jobs, on the new holder; nothing twice.
    following = iso(minute + timedelta(minutes=1))
    expected = [("tick", iso(minute)), ("tick", following), ("tock", following)]
    await wait_until(lambda: [(j, s) for j, s, _ in slots(pg_url)] == expected, 75, step=0.2)
    externals = query(
        pg_url,
        "SELECT external_id, count(*), min(state) FROM messages "
        "WHERE direction = 'in' AND external_id LIKE 'job:%%' GROUP BY external_id "
        "ORDER BY external_id",
    )
    assert [(str(e), int(str(c))) for e, c, _ in externals] == [
        (f"job:{job}:{slot}", 1) for job, slot in expected
    ]
    assert {str(m) for _, _, m in slots(pg_url)} == {
        str(row[0])
        for row in query(
            pg_url, "SELECT id FROM messages WHERE direction = 'in' AND external_id LIKE 'job:%%'"
        )
    }
    await trio.sleep(1.0)  # a paused or late scheduler would add a row now
    assert len(slots(pg_url)) == 3
    assert await fired_here(daemons[other].url) == 2
    assert daemons[other].stop() == 0


async def test_p24_a_busy_channel_shows_the_same_status_on_both_hosts(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    first = host(tmp_path, pg_url, "h1", "--grace", "0")
    second = host(tmp_path, pg_url, "h2", "--grace", "0")
    stop_all += [first, second]
    spec = {
        "name": "busy",
        "channel": "busy",
        "backend": "command",
        "command": ["sh", "-c", "sleep 20; cat"],
    }
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{first.url}/api/agents", json=spec)).status_code == 201
        urls = (first.url, second.url)

        async def statuses() -> list[tuple[str, int]]:
            """(status, queued) in `GET /api/agents` and `/health` of each host
            (none yet where the new agent has not arrived, P22)."""
            out = []
            for url in urls:
                listed = (await client.get(f"{url}/api/agents")).json()["agents"]
                health = (await client.get(f"{url}/health")).json()["agents"]
                out += [(a["status"], a["queued"]) for a in (*listed, *health)]
            return out

        async def both(expected: tuple[str, int]) -> None:
            with trio.fail_after(15):
                while (seen := await statuses()) != [expected] * 4:
                    await trio.sleep(0.1)
            assert seen == [expected] * 4

        await both(("idle", 0))
        post = f"{second.url}/api/channels/busy/messages"
        assert (await client.post(post, json={"content": "one"})).status_code == 200
        await both(("working", 0))
        for text in ("two", "three"):
            assert (await client.post(post, json={"content": text})).status_code == 200
        await both(("queued", 2))
    assert first.stop() == 0 and second.stop() == 0


async def test_p14_a_stopping_host_releases_its_roles_before_its_grace_period(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    """SIGTERM on the role holder while its turn runs: the roles move to the
    other host at once, not when the grace period ends and the host leaves."""
    first = host(tmp_path, pg_url, "h1", "--grace", "15")
    stop_all.append(first)
    await wait_until(lambda: role_holder(pg_url) == "h1", 10)
    spec = {
        "name": "busy",
        "channel": "busy",
        "backend": "command",
        "command": ["sh", "-c", "sleep 20; cat"],
    }
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as client:
        assert (await client.post("/api/agents", json=spec)).status_code == 201
        await wait_until(lambda: owners(pg_url) == {"busy": "h1"}, 10)
        second = host(tmp_path, pg_url, "h2")
        stop_all.append(second)
        posted = await client.post("/api/channels/busy/messages", json={"content": "x"})
        assert posted.status_code == 200
        await wait_until(lambda: query(pg_url, "SELECT 1 FROM threads"), 10)
    first.proc.send_signal(signal.SIGTERM)
    took = await wait_until(lambda: role_holder(pg_url) == "h2", 5)
    assert first.proc.poll() is None, "the roles moved while h1 still ran its turn"
    print(f"P14: role:scheduler held by h2 {took:.2f} s after SIGTERM to h1")
    assert took < 2.0


async def test_p17_only_the_role_holders_poll_the_vault_and_a_stop_hands_it_on(
    tmp_path: Path, pg_url: str
) -> None:
    """Two hosts with one vault: only the `role:vault-sync` holder polls its
    definitions; when that host stops (P14), the other one takes the poll over."""
    vault = FakeVault()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        (vault_url,) = await nursery.start(serve, vault.app(), config)
        services = {}
        for name in ("h1", "h2"):
            settings = Settings(
                port=0,
                data_dir=tmp_path / name,
                demo=False,
                vault_url=vault_url,
                vault_token=TOKEN,
                vault_poll_s=0.1,
                store_url=pg_url,
                host_id=name,
                lease_ttl_s=3,
                scan_interval_s=0.5,
                grace_s=0,
            )
            services[name] = Service(settings)
            await nursery.start(services[name].run)
        holders = {str(owner) for (owner,) in query(pg_url, "SELECT owner FROM leases")}
        (holder,) = holders - {"None"}  # one host took all three roles
        other = "h2" if holder == "h1" else "h1"
        syncs = {}
        for name, service in services.items():
            assert service.sync is not None
            syncs[name] = service.sync
        await wait_until(lambda: syncs[holder].syncs >= 5, 10)
        assert syncs[other].syncs == 0
        services[holder].stop()
        await wait_until(lambda: syncs[other].syncs >= 3, 10)
        services[other].stop()
        nursery.cancel_scope.cancel()
