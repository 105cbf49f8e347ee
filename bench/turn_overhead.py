"""What skydeck adds to a claude turn: HTTP post -> reply stored, versus the
same bare `claude -p` run, both against the same fake Anthropic API, in one run.

    python bench/turn_overhead.py [-n 20]

Runs alternate (bare, skydeck, bare, ...) so drift on the machine hits both
alike. The skydeck side is a real daemon (`Service`) on loopback, a
multi-threaded claude agent (a fresh session per turn, like each bare run), and
an httpx client that posts and waits for the turn's `done` event on the SSE
stream. Prints median and p95 of both and the milliseconds added.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_anthropic import FakeAnthropic
from skydeck.backends.claude import ClaudeBackend, find_claude
from skydeck.model import AgentSpec, TurnSession
from skydeck.service import Service, Settings


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def bare_turn(backend: ClaudeBackend, agent: AgentSpec, home: Path) -> float:
    argv = backend.argv(agent, "say hi", TurnSession(id=str(uuid.uuid4()), resume=False))
    start = time.perf_counter()
    done = await trio.run_process(
        argv,
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=backend.env(agent, home),
        cwd=home,
        start_new_session=True,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and b'"is_error":false' in done.stdout, done.stderr[-500:]
    return elapsed


async def skydeck_turn(client: httpx.AsyncClient, channel: str = "bench") -> float:
    async with client.stream("GET", f"/api/channels/{channel}/turn-events") as events:
        lines = events.aiter_lines()
        assert (await anext(lines)).startswith(": subscribed")
        start = time.perf_counter()
        ack = (
            await client.post(f"/api/channels/{channel}/messages", json={"content": "say hi"})
        ).json()
        async for line in lines:
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["message_id"] == ack["id"] and event["kind"] in ("done", "error"):
                    assert event["kind"] == "done", event
                    return time.perf_counter() - start
    raise RuntimeError("event stream ended early")


async def main(runs: int) -> None:
    executable = find_claude()
    if executable is None:
        raise SystemExit("no claude CLI: run `make claude` first")
    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            (api_url,) = await nursery.start(serve, api.app(), config)
            os.environ.update({"ANTHROPIC_BASE_URL": api_url, "ANTHROPIC_API_KEY": "sk-bench"})
            service = Service(Settings(port=0, data_dir=Path(tmp) / "data", demo=False))
            (url,) = await nursery.start(service.run)
            agent = AgentSpec(
                name="bench", channel="bench", backend="claude", mode="multi-threaded"
            )
            await service.registry.create(agent)
            bare_home = Path(tmp) / "bare"
            bare_home.mkdir()
            backend = ClaudeBackend(executable, Path(tmp) / "unused")
            bare: list[float] = []
            daemon: list[float] = []
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                await bare_turn(backend, agent, bare_home)  # warm both paths once
                await skydeck_turn(client)
                for i in range(runs):
                    bare.append(await bare_turn(backend, agent, bare_home))
                    daemon.append(await skydeck_turn(client))
                    print(
                        f"  run {i + 1}/{runs}: bare {bare[-1] * 1000:.0f} ms, "
                        f"skydeck {daemon[-1] * 1000:.0f} ms",
                        flush=True,
                    )
            service.stop()
            nursery.cancel_scope.cancel()
    print()
    print("| path | median ms | p95 ms |")
    print("|---|---:|---:|")
    for label, values in (("bare `claude -p`", bare), ("skydeck (HTTP post -> done)", daemon)):
        median, p95 = statistics.median(values) * 1000, percentile(values, 95) * 1000
        print(f"| {label} | {median:.0f} | {p95:.0f} |")
    added = (statistics.median(daemon) - statistics.median(bare)) * 1000
    print(f"\nadded by skydeck at the median: {added:+.1f} ms over {runs} turns each")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    trio.run(main, parser.parse_args().runs)
