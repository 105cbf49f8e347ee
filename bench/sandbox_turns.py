"""Sandboxed versus unsandboxed claude turns through the daemon (issue 16, sandbox.md §5).

    python bench/sandbox_turns.py [-n 20]

One daemon (`Service`) on loopback against the fake Anthropic API, with two
single-threaded claude agents that differ only in ``sandbox`` (``"off"`` and
``"workspace"``; ``"strict"`` too, since the bench sets an API key). Turns
alternate between the agents so drift hits all alike; each is timed from the
HTTP post to the turn's ``done`` SSE event, and each agent's first turn is not
counted. Run once cold (``SKYDECK_CLAUDE_WARM=off``: a ``claude -p`` process,
and so a sandbox, per turn) and once warm (one long-lived process, and
sandbox, per agent). The same run times ``claude --version`` bare and inside
bwrap (median of 10). Prints p50 and p95 per mode and the difference to off.
Pass: cold sandboxed p50 - off p50 <= 150 ms.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_anthropic import FakeAnthropic
from skydeck.backends.claude import find_claude
from skydeck.backends.claude_warm import WarmConfig
from skydeck.model import AgentSpec, SandboxMode
from skydeck.sandbox.plan import HostLayout, Plan, bwrap_argv
from skydeck.sandbox.probe import DEFAULT_BWRAP, probe
from skydeck.service import Service, Settings
from turn_overhead import percentile, skydeck_turn

PASS_MS = 150.0
MODES: tuple[SandboxMode, ...] = ("off", "workspace", "strict")


def version_times(claude: str, workspace: Path) -> tuple[float, float]:
    """Medians of 10 ``claude --version``, bare and inside the turns' bwrap (no relay)."""
    claude = os.path.abspath(claude)
    plan = Plan(DEFAULT_BWRAP, HostLayout.read(), workspace, workspace, claude, None, 0)
    # fd 0 stands in for the status fd: its record is not read here.
    boxed = bwrap_argv(plan, [claude, "--version"])
    times: dict[str, list[float]] = {"bare": [], "bwrap": []}
    for _ in range(10):
        for name, argv in (("bare", [claude, "--version"]), ("bwrap", boxed)):
            started = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["bare"]), statistics.median(times["bwrap"])


def cpu_seconds() -> float:
    """CPU of this process and of its reaped children (a cold turn's processes are
    reaped before its ``done``): what a turn costs whatever else loads the machine."""
    mine, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


async def run(
    runs: int, warm: bool, tmp: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall time per turn and mode, and (cold) the CPU each turn cost."""
    api = FakeAnthropic()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with trio.open_nursery() as nursery:
        (api_url,) = await nursery.start(serve, api.app(), config)
        os.environ.update({"ANTHROPIC_BASE_URL": api_url, "ANTHROPIC_API_KEY": "sk-bench"})
        settings = Settings(
            port=0,
            data_dir=tmp / ("warm" if warm else "cold"),
            demo=False,
            claude_warm=WarmConfig(enabled=warm),
        )
        service = Service(settings)
        (url,) = await nursery.start(service.run)
        assert service.sandbox.probe.available, service.sandbox.probe.reason
        clients: dict[str, httpx.AsyncClient] = {}
        for mode in MODES:
            spec = AgentSpec(name=mode, channel=mode, backend="claude", sandbox=mode)
            await service.registry.create(spec)
            clients[mode] = httpx.AsyncClient(base_url=url, timeout=60)
        for name, client in clients.items():
            await skydeck_turn(client, name)  # not counted: the session's first turn
        for i in range(runs):
            for name, client in clients.items():
                before = cpu_seconds()
                times[name].append(await skydeck_turn(client, name))
                cpu[name].append(cpu_seconds() - before)
            shown = ", ".join(f"{m} {times[m][-1] * 1000:.0f} ms" for m in MODES)
            print(f"  {'warm' if warm else 'cold'} run {i + 1}/{runs}: {shown}", flush=True)
        for client in clients.values():
            await client.aclose()
        service.stop()
        nursery.cancel_scope.cancel()
    return times, cpu


def report(label: str, times: dict[str, list[float]], cpu: dict[str, list[float]] | None) -> float:
    """Print one table; returns workspace p50 - off p50 in ms."""
    off = statistics.median(times["off"]) * 1000
    extra = " CPU p50 ms |" if cpu else ""
    print(f"\n{label}\n\n| sandbox | p50 ms | p95 ms | p50 - off |{extra}")
    print("|---|---:|---:|---:|" + ("---:|" if cpu else ""))
    for mode in MODES:
        median, p95 = statistics.median(times[mode]) * 1000, percentile(times[mode], 95) * 1000
        used = f" {statistics.median(cpu[mode]) * 1000:.0f} |" if cpu else ""
        print(f"| {mode} | {median:.0f} | {p95:.0f} | {median - off:+.0f} |{used}")
    return statistics.median(times["workspace"]) * 1000 - off


async def main(runs: int) -> None:
    claude = find_claude()
    if claude is None:
        raise SystemExit("no claude CLI: run `make claude` first")
    found = probe(DEFAULT_BWRAP)
    if not found.available:
        raise SystemExit(f"no sandbox here: {found.reason}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bare, boxed = version_times(claude, Path(tmp))
        cold, cold_cpu = await run(runs, False, Path(tmp))
        warm, _ = await run(runs, True, Path(tmp))
    load_after = os.getloadavg()
    print(f"\nclaude --version: {bare * 1000:.1f} ms bare, {boxed * 1000:.1f} ms in bwrap")
    cold_delta = report(f"cold turns ({runs} each)", cold, cold_cpu)
    report(f"warm turns ({runs} each)", warm, None)  # a warm process is reaped only at the end
    verdict = "pass" if cold_delta <= PASS_MS else "FAIL"
    target = f"target <= {PASS_MS:.0f}: {verdict}"
    print(f"\ncold: workspace p50 - off p50 = {cold_delta:+.0f} ms ({target})")
    print(f"load average (1 min): {load_before[0]:.2f} before, {load_after[0]:.2f} after")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    trio.run(main, parser.parse_args().runs)
