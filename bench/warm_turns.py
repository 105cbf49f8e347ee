"""Warm versus cold claude turns through the daemon (issue 14, claude-warm.md §7).

    python bench/warm_turns.py [-n 20]

Two daemons (`Service`) in one process on loopback, against one fake Anthropic
API: one with warm mode on (the default), one with ``SKYDECK_CLAUDE_WARM=off``.
Each serves a single-threaded claude agent, so every turn after the first
continues one conversation (warm: one line to the agent's process; cold: a
``claude -p --resume`` process per turn). Turns alternate (warm, cold, warm, ...)
so drift on the machine hits both alike; each is timed from the HTTP post to
the turn's ``done`` event on the SSE stream, and each agent's first turn (the
session's creation, and the warm process's start) is not counted. Prints p50 and
p95 of both, the warm/cold p50 ratio (pass: <= 0.15) and the warm process's RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_anthropic import FakeAnthropic
from skydeck.backends.claude import find_claude
from skydeck.backends.claude_warm import WarmConfig
from skydeck.backends.output import MIB
from skydeck.model import AgentSpec
from skydeck.service import Service, Settings
from turn_overhead import percentile, skydeck_turn

PASS_RATIO = 0.15


async def main(runs: int) -> None:
    if find_claude() is None:
        raise SystemExit("no claude CLI: run `make claude` first")
    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            (api_url,) = await nursery.start(serve, api.app(), config)
            os.environ.update({"ANTHROPIC_BASE_URL": api_url, "ANTHROPIC_API_KEY": "sk-bench"})
            services: dict[str, Service] = {}
            clients: dict[str, httpx.AsyncClient] = {}
            for mode, warm in (("warm", WarmConfig()), ("cold", WarmConfig(enabled=False))):
                service = Service(
                    Settings(port=0, data_dir=Path(tmp) / mode, demo=False, claude_warm=warm)
                )
                (url,) = await nursery.start(service.run)
                await service.registry.create(
                    AgentSpec(name="bench", channel="bench", backend="claude")
                )
                services[mode] = service
                clients[mode] = httpx.AsyncClient(base_url=url, timeout=60)
            times: dict[str, list[float]] = {"warm": [], "cold": []}
            for client in clients.values():
                await skydeck_turn(client)  # not counted: the session's first turn
            for i in range(runs):
                for mode, client in clients.items():
                    times[mode].append(await skydeck_turn(client))
                print(
                    f"  run {i + 1}/{runs}: warm {times['warm'][-1] * 1000:.0f} ms, "
                    f"cold {times['cold'][-1] * 1000:.0f} ms",
                    flush=True,
                )
            pool = services["warm"].warm
            assert pool is not None and services["cold"].warm is None
            processes = pool.health()["processes"]
            for client in clients.values():
                await client.aclose()
            for service in services.values():
                service.stop()
            nursery.cancel_scope.cancel()
    load_after = os.getloadavg()
    print()
    print("| turns | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for mode in ("cold", "warm"):
        values = times[mode]
        median, p95 = statistics.median(values) * 1000, percentile(values, 95) * 1000
        print(f"| {mode} | {median:.0f} | {p95:.0f} |")
    ratio = statistics.median(times["warm"]) / statistics.median(times["cold"])
    verdict = "pass" if ratio <= PASS_RATIO else "FAIL"
    print(f"\nwarm/cold at p50: {ratio:.3f} (target <= {PASS_RATIO}: {verdict}), {runs} turns each")
    for row in processes:
        print(
            f"warm process of {row['agent']}: pid {row['pid']}, {row['turns']} turns, "
            f"RSS {row['rss_bytes'] / MIB:.0f} MiB"
        )
    print(f"load average (1 min): {load_before[0]:.2f} before, {load_after[0]:.2f} after")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    trio.run(main, parser.parse_args().runs)
