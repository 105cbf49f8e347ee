"""P27 `/metrics` on real `skydeck serve --store postgres://...` daemons: every series
the rule lists exists with its labels, and the lease counters tell the truth when a
host's row is expired under a running turn (its end is a fenced write, then its
heartbeat finds no row: lease lost), while owned channels add up across hosts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon_process import DaemonProcess
from pg import query

pytestmark = pytest.mark.slow

#: P27's series, as Prometheus shows them, with the label values each must show.
SERIES: dict[str, tuple[str, ...]] = {
    "skydeck_owned_channels": (),
    "skydeck_lease_claims_total": ("unowned", "orphan", "released", "rebalance"),
    "skydeck_lease_releases_total": ("rebalance", "shutdown", "removed"),
    "skydeck_lease_lost_total": (),
    "skydeck_heartbeats_total": ("ok", "lost", "error"),
    "skydeck_heartbeat_age_seconds": (),
    "skydeck_cluster_hosts": (),
    "skydeck_fenced_writes_total": (),
    "skydeck_store_batch_seconds_count": (),
    "skydeck_store_retries_total": ("deadlock", "serialization", "connection"),
    "skydeck_message_wait_seconds_count": (),
    "skydeck_listener_reconnects_total": (),
}
SAMPLE = re.compile(r'^(\w+)(?:\{\w+="([^"]*)"\})? (\S+)$')


def samples(text: str) -> dict[tuple[str, str], float]:
    """(name, the one label's value or "") -> value."""
    found = {}
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            found[(match[1], match[2] or "")] = float(match[3])
    return found


async def scrape(url: str) -> dict[tuple[str, str], float]:
    async with httpx.AsyncClient(timeout=10) as client:
        return samples((await client.get(f"{url}/metrics")).text)


def serve(root: Path, store: str, host_id: str, ttl: str) -> DaemonProcess:
    return DaemonProcess(
        root / host_id,
        "--no-demo",
        "--store",
        store,
        "--host-id",
        host_id,
        "--lease-ttl",
        ttl,
        "--scan-interval",
        "0.5",
    )


async def test_p27_series_exist_and_count_a_fenced_write_and_a_lost_lease(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    # h1 heartbeats every 5 s (TTL 20): its row can be expired between two of them,
    # while its turn runs, so the turn's end is the first to find the fence gone.
    h1 = serve(tmp_path, pg_url, "h1", "20")
    stop_all.append(h1)
    go = tmp_path / "go"
    names = ["e0", "e1", "e2", "e3", "slow"]
    async with httpx.AsyncClient(timeout=10) as client:
        for name in names:
            spec: dict[str, Any] = {"name": name, "channel": name, "backend": "echo"}
            if name == "slow":
                wait = f"while [ ! -e {go} ]; do sleep 0.02; done; cat"
                spec |= {"backend": "command", "sandbox": "off", "command": ["sh", "-c", wait]}
            assert (await client.post(f"{h1.url}/api/agents", json=spec)).status_code == 201
        with trio.fail_after(10):
            while query(pg_url, "SELECT count(*) FROM leases WHERE owner = 'h1'")[0][0] < 6:
                await trio.sleep(0.05)  # its 5 channels and the cluster's 3 roles, at least
        h2 = serve(tmp_path, pg_url, "h2", "3")
        stop_all.append(h2)
        for daemon in (h1, h2):  # every series, every label, from the first scrape
            found = await scrape(daemon.url)
            for name, labels in SERIES.items():
                for label in labels or ("",):
                    assert (name, label) in found, f"{daemon.data_dir.name}: {name} {label}"

        posted = await client.post(f"{h1.url}/api/channels/slow/messages", json={"content": "x"})
        assert posted.status_code == 200
        with trio.fail_after(10):
            while query(pg_url, "SELECT count(*) FROM threads") != [(1,)]:
                await trio.sleep(0.02)
            ((beat,),) = query(pg_url, "SELECT heartbeat_at FROM hosts WHERE host_id = 'h1'")
            while query(pg_url, "SELECT heartbeat_at FROM hosts WHERE host_id = 'h1'") == [(beat,)]:
                await trio.sleep(0.02)  # just renewed: the next heartbeat is 5 s away
        query(pg_url, "UPDATE hosts SET expires_at = now() WHERE host_id = 'h1' RETURNING 1")
        with trio.fail_after(3):
            while query(pg_url, "SELECT owner FROM leases WHERE name = 'slow'") != [("h2",)]:
                await trio.sleep(0.02)  # h2 claims the orphan
        go.touch()  # h1's turn ends now: a write under a token that is gone
        with trio.fail_after(10):
            while (await scrape(h1.url)).get(("skydeck_lease_lost_total", ""), 0) < 1:
                await trio.sleep(0.1)
        one = await scrape(h1.url)
        assert one[("skydeck_fenced_writes_total", "")] >= 1
        assert one[("skydeck_lease_lost_total", "")] == 1
        assert one[("skydeck_heartbeats_total", "lost")] == 1
        assert one[("skydeck_message_wait_seconds_count", "")] >= 1  # x's first start
        two = await scrape(h2.url)
        assert two[("skydeck_lease_claims_total", "orphan")] >= 1
        with trio.fail_after(3):  # h1 rejoined: h2's next scan counts it again
            while (await scrape(h2.url))[("skydeck_cluster_hosts", "")] != 2:
                await trio.sleep(0.1)
        assert two[("skydeck_store_batch_seconds_count", "")] >= 1
        with trio.fail_after(5):  # the owned gauges add up to the channels with agents
            while True:
                owned = [(await scrape(d.url))[("skydeck_owned_channels", "")] for d in (h1, h2)]
                if sum(owned) == len(names):
                    break
                await trio.sleep(0.1)
        with trio.fail_after(10):
            while query(pg_url, "SELECT state FROM messages WHERE direction = 'in'") != [("done",)]:
                await trio.sleep(0.05)
    assert "write fenced" in (tmp_path / "h1-daemon.log").read_text()
