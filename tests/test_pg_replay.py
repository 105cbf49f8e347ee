"""PT5, replay records (multi-host.md P15), on real `skydeck serve --store postgres://...`
daemons: a host SIGKILLed during a command turn leaves a `working` message and an open
thread record; the host that claims the channel ends that record at the claim, tells
viewers the message runs again (`error`, ``retrying: true``), and reruns it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from daemon_process import SKYDECK, DaemonProcess, clean_env
from pg import query
from test_pg_hosts import host

if TYPE_CHECKING:
    from trio_typing import TaskStatus

pytestmark = pytest.mark.slow


async def owner_of(url: str, channel: str) -> str:
    with trio.fail_after(10):
        while True:
            rows = query(
                url,
                "SELECT l.owner FROM leases l JOIN hosts h "
                "ON (h.host_id, h.incarnation) = (l.owner, l.incarnation) "
                "WHERE l.name = %s AND h.expires_at > now()",
                channel,
            )
            if rows:
                return str(rows[0][0])
            await trio.sleep(0.05)


async def test_pt5_a_killed_owner_s_turn_is_closed_at_the_claim_announced_and_rerun(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    daemons = {h: host(tmp_path, pg_url, h) for h in ("h1", "h2")}
    stop_all += daemons.values()
    spec = {
        "name": "slow",
        "channel": "slow",
        "backend": "command",
        "mode": "multi-threaded",
        "command": ["sh", "-c", "sleep 2; cat"],
    }
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{daemons['h1'].url}/api/agents", json=spec)).status_code == 201
    owner = await owner_of(pg_url, "slow")
    survivor = "h2" if owner == "h1" else "h1"
    events: list[dict[str, Any]] = []
    subscribed = trio.Event()

    async def viewer() -> None:
        # On the host that will claim the channel: the dead owner's events are
        # relayed (P25), the rerun's are its own.
        url = f"{daemons[survivor].url}/api/channels/slow/turn-events"
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
            client.stream("GET", url) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith(": subscribed"):
                    subscribed.set()
                elif line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))
                    if events[-1]["kind"] == "done":
                        return

    sent: dict[str, subprocess.CompletedProcess[str]] = {}

    def send_and_wait() -> None:
        # `send --wait` on the survivor, the non-owner: it posts there (stored, the
        # owner woken), then follows that host's events through the failover.
        sent["result"] = subprocess.run(
            [SKYDECK, "--url", daemons[survivor].url, "send", "slow", "hello", "--wait"],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(viewer)
        await subscribed.wait()
        nursery.start_soon(trio.to_thread.run_sync, send_and_wait)
        with trio.fail_after(10):
            while query(pg_url, "SELECT count(*) FROM threads") != [(1,)]:
                await trio.sleep(0.02)  # the command runs: its start record committed
        await trio.sleep(0.3)
        daemons[owner].kill()
    result = sent["result"]
    assert result.returncode == 0, result.stderr  # the retrying error did not end the wait

    ((message_id, attempts, state, reply_id),) = query(
        pg_url, "SELECT id, attempts, state, reply_id FROM messages WHERE direction = 'in'"
    )
    assert (attempts, state) == (2, "done")
    ((reply,),) = query(pg_url, "SELECT content FROM messages WHERE id = %s", reply_id)
    assert result.stdout == f"{reply}\n" and reply.strip() == "hello"
    dead, rerun = query(
        pg_url,
        "SELECT t.host, t.status, t.output, t.ended_at = l.acquired_at, t.fence < l.token "
        "FROM threads t JOIN leases l ON l.name = t.channel ORDER BY t.started_at",
    )
    # The orphaned record, ended by the claim's own statement (P15).
    assert dead[:2] == (owner, "error")
    assert str(dead[2]).startswith(f"interrupted: host {owner} (incarnation ")
    assert dead[3:] == (True, True), "ended at the claim time, under the older token"
    assert rerun[:3] == (survivor, "ok", reply) and rerun[3:] == (False, False)
    # The survivor's viewer (P25 relays the owner's events): the dead run's events,
    # then the retrying error, then the rerun's, ending with its one final event.
    retrying = {
        "kind": "error",
        "message_id": message_id,
        "error": f"interrupted: host {owner} stopped; running it again",
        "retrying": True,
    }
    assert [e for e in events if e["kind"] in ("error", "done")] == [
        retrying,
        {"kind": "done", "message_id": message_id, "reply": reply},
    ]
    assert events[-1]["kind"] == "done"


# Kills the `skydeck serve` that runs it: its nearest ancestor with --host-id (the
# pattern does not match itself, as a wrapper's command line may carry this script).
KILL_MY_DAEMON = (
    'p=$PPID; while [ "$p" -gt 1 ]; do '
    "if tr '\\0' ' ' < /proc/$p/cmdline | grep -q -- '--host-i[d]'; "
    'then kill -9 "$p"; exit 0; fi; '
    "p=$(awk '{print $4}' /proc/$p/stat); done"
)


async def test_pt5_a_daemon_killing_message_runs_three_times_then_fails_unrun(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    ids = ("h1", "h2", "h3", "h4")

    async def start(host_id: str) -> None:
        stop_all.append(await trio.to_thread.run_sync(host, tmp_path, pg_url, host_id))

    async with trio.open_nursery() as nursery:
        for host_id in ids:
            nursery.start_soon(start, host_id)
    spec = {
        "name": "bomb",
        "channel": "bomb",
        "backend": "command",
        "mode": "multi-threaded",
        "sandbox": "off",  # the command must see its daemon's process
        "command": ["sh", "-c", KILL_MY_DAEMON],
    }
    seen: dict[str, list[dict[str, Any]]] = {d.data_dir.name: [] for d in stop_all}

    async def viewer(daemon: DaemonProcess, task_status: TaskStatus[None]) -> None:
        url = f"{daemon.url}/api/channels/bomb/turn-events"
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
                client.stream("GET", url) as response,
            ):
                async for line in response.aiter_lines():
                    if line.startswith(": subscribed"):
                        task_status.started()
                    elif line.startswith("data: "):
                        seen[daemon.data_dir.name].append(json.loads(line[len("data: ") :]))
        except httpx.TransportError:
            return  # its daemon was killed

    async with trio.open_nursery() as viewers:
        async with httpx.AsyncClient(timeout=10) as client:
            base = stop_all[0].url
            created = await client.post(f"{base}/api/agents", json=spec)
            assert created.status_code == 201, created.text
            await owner_of(pg_url, "bomb")
            for daemon in stop_all:
                await viewers.start(viewer, daemon)
            posted = await client.post(f"{base}/api/channels/bomb/messages", json={"content": "x"})
            assert posted.status_code == 200
        with trio.fail_after(30):
            while query(pg_url, "SELECT state FROM messages WHERE direction = 'in'") != [
                ("failed",)
            ]:
                await trio.sleep(0.1)
            survivor = next(d.data_dir.name for d in stop_all if d.proc.poll() is None)
            while not any(e["kind"] == "error" for e in seen[survivor]):
                await trio.sleep(0.05)
        viewers.cancel_scope.cancel()
    ((attempts, error),) = query(
        pg_url, "SELECT attempts, error FROM messages WHERE direction = 'in'"
    )
    assert (attempts, error) == (3, "interrupted 3 times by daemon restarts")
    alive = [d.data_dir.name for d in stop_all if d.proc.poll() is None]
    assert len(alive) == 1, "three runs downed three hosts; the fourth never ran it"
    threads = query(pg_url, "SELECT host, status, output FROM threads ORDER BY started_at")
    runs, last = threads[:3], threads[3:]
    assert {h for h, _, _ in runs} == set(ids) - set(alive), "each run downed its host"
    for _, status, output in runs:  # each ended by the next claim (P15)
        assert status == "error" and str(output).startswith("interrupted: host ")
    assert last == [(alive[0], "error", "interrupted 3 times by daemon restarts")]
    # The fourth claimer announced no rerun: it failed the message (its own event), and
    # any retrying event it relayed came from the hosts that did run it again.
    third = runs[2][0]
    errors = [e for e in seen[survivor] if e["kind"] == "error"]
    assert errors[-1] == {
        "kind": "error",
        "message_id": posted.json()["id"],
        "error": "interrupted 3 times by daemon restarts",
    }
    assert not any(f"host {third} stopped" in e["error"] for e in errors), errors
