"""PT2 (P13): balance across real daemons. Channels spread to each host's share
within seconds; a joiner takes only echo channels unless workspaces are shared
(`--workspaces-shared`), because a command or claude channel's workspace is a
local directory that would not follow it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from daemon_process import DaemonProcess
from skydeck.pg.cluster import share
from test_pg_hosts import host, owners

pytestmark = pytest.mark.slow

#: Rebalancing rounds every second instead of 30 (pg/hosting.py's test hook).
FAST_REBALANCE = {"SKYDECK_TEST_REBALANCE_S": "1"}


def member(root: Path, url: str, host_id: str, *extra: str) -> DaemonProcess:
    return host(root, url, host_id, *extra, env=FAST_REBALANCE)


async def create(base: str, echo: list[str], command: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for name in echo + command:
            spec: dict[str, object] = {"name": name, "channel": name, "backend": "echo"}
            if name in command:
                spec |= {"backend": "command", "command": ["cat"]}
            assert (await client.post("/api/agents", json=spec)).status_code == 201


def counts(found: dict[str, str], hosts: list[str]) -> dict[str, int]:
    return {h: list(found.values()).count(h) for h in hosts}


async def settle(url: str, hosts: list[str], total: int, timeout: float) -> dict[str, str]:
    """The owners, once every channel has one and each host holds share +- slack."""
    fair, slack = share(total, len(hosts))
    found: dict[str, str] = {}
    with trio.move_on_after(timeout):
        while True:
            found = owners(url)
            if len(found) == total and all(
                abs(n - fair) <= slack for n in counts(found, hosts).values()
            ):
                return found
            await trio.sleep(0.2)
    raise AssertionError(f"not balanced in {timeout} s: {counts(found, hosts)} of {total}")


async def test_pt2_a_joiner_takes_only_echo_channels_without_shared_workspaces(
    tmp_path: Path,
    pg_url: str,
    stop_all: list[DaemonProcess],
) -> None:
    echo = [f"e{i}" for i in range(30)]
    command = [f"c{i}" for i in range(6)]
    first = [member(tmp_path, pg_url, h) for h in ("h1", "h2", "h3")]
    stop_all += first
    await create(first[0].url, echo, command)
    before = await settle(pg_url, ["h1", "h2", "h3"], 36, timeout=5)
    stop_all.append(member(tmp_path, pg_url, "h4"))
    found = await settle(pg_url, ["h1", "h2", "h3", "h4"], 36, timeout=20)
    assert all(found[c] == before[c] for c in command)  # no command channel moved
    joined = {c for c, owner in found.items() if owner == "h4"}
    assert joined and joined <= set(echo)  # the joiner's share is echo channels only
    await trio.sleep(3)  # rounds go on: still nothing with a local workspace moves
    assert all(owners(pg_url)[c] == before[c] for c in command)


async def test_pt2_with_shared_workspaces_command_channels_move_too(
    tmp_path: Path,
    pg_url: str,
    stop_all: list[DaemonProcess],
) -> None:
    command = [f"c{i}" for i in range(12)]
    first = [member(tmp_path, pg_url, h, "--workspaces-shared") for h in ("h1", "h2")]
    stop_all += first
    await create(first[0].url, [], command)
    await settle(pg_url, ["h1", "h2"], 12, timeout=5)
    stop_all.append(member(tmp_path, pg_url, "h3", "--workspaces-shared"))
    found = await settle(pg_url, ["h1", "h2", "h3"], 12, timeout=20)
    assert counts(found, ["h3"])["h3"] >= 3  # share 4, slack 1: taken from the others
