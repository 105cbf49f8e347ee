"""MCP tool-call latency next to a plain API post, on one daemon (mcp.md §5).

    python bench/mcp_latency.py [--calls 2000] [--block 100] [--warmup 100]

One ``skydeck serve`` process (no token) with an echo agent ``sink``; the caller
acts as the mailbox channel ``bench``. Three paths, each a sequential round trip
that stores one message on ``sink`` (and so runs one echo turn):

- (A) the official SDK: ``call_tool("send_message", {"channel": "sink", "content":
  "x", "callback": False})`` on an initialized ``ClientSession``;
- (B) httpx: ``POST /api/channels/sink/messages {"content": "x"}`` on a kept-alive client;
- (C) httpx: the same ``tools/call`` JSON-RPC body POSTed with a session id, no SDK
  (what the server costs, without the SDK's client-side cost).

After ``--warmup`` calls per path, the paths alternate in blocks of ``--block``
until each made ``--calls`` round trips, so a slow moment of the machine hits
all three alike. Prints p50, p99 and mean ms per path and the ratios A/B, C/B;
the target is C p50 <= B p50 + 1 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

Call = Callable[[], Awaitable[None]]
ARGUMENTS: dict[str, object] = {"channel": "sink", "content": "x", "callback": False}
TOOL_CALL = {"name": "send_message", "arguments": ARGUMENTS}


def start(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    skydeck = str(Path(sys.executable).parent / "skydeck")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYDECK_", "ANTHROPIC_"))}
    env["SKYDECK_LOG_LEVEL"] = "WARNING"
    argv = [skydeck, "serve", "--port", "0", "--no-demo", "--data-dir", data_dir]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    for raw in proc.stdout:
        if match := re.search(r"API:\s+(http://\S+)/api", raw.decode()):
            return proc, match.group(1)
    raise RuntimeError("skydeck did not start")


async def measure(url: str, calls: int, block: int, warmup: int) -> dict[str, list[float]]:
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        httpx.AsyncClient(timeout=30) as sdk_http,
        streamable_http_client(f"{url}/mcp/bench", http_client=sdk_http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        params = {"protocolVersion": "2025-11-25"}
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
        opened = await http.post("/mcp/bench", json=init)
        headers = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"]}
        rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": TOOL_CALL}

        async def sdk() -> None:
            result = await session.call_tool("send_message", ARGUMENTS)
            assert not result.isError, result

        async def api() -> None:
            answer = await http.post("/api/channels/sink/messages", json={"content": "x"})
            assert answer.status_code == 200, answer.text

        async def raw() -> None:
            answer = await http.post("/mcp/bench", json=rpc, headers=headers)
            assert answer.json()["result"]["isError"] is False, answer.text

        paths: dict[str, Call] = {
            "A  SDK call_tool(send_message)": sdk,
            "B  POST /api/channels/sink/messages": api,
            "C  raw JSON-RPC tools/call": raw,
        }
        for call in paths.values():
            for _ in range(warmup):
                await call()
        times: dict[str, list[float]] = {label: [] for label in paths}
        while any(len(t) < calls for t in times.values()):
            for label, call in paths.items():
                for _ in range(min(block, calls - len(times[label]))):
                    started = time.perf_counter()
                    await call()
                    times[label].append((time.perf_counter() - started) * 1000)
        return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="round trips per path")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(f"{tmp}/data")
        try:
            spec = {"name": "sink", "channel": "sink", "backend": "echo"}
            httpx.post(f"{url}/api/agents", json=spec).raise_for_status()
            times = trio.run(measure, url, args.calls, args.block, args.warmup)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{args.calls} sequential round trips per path, blocks of {args.block}\n")
    print("| path | p50 ms | p99 ms | mean ms |")
    print("|---|---:|---:|---:|")
    for label, values in times.items():
        mean = statistics.fmean(values)
        print(f"| {label} | {pct(values, 50):.2f} | {pct(values, 99):.2f} | {mean:.2f} |")
    a, b, c = (pct(values, 50) for values in times.values())
    print(f"\nA/B = {a / b:.2f}, C/B = {c / b:.2f}; C p50 - B p50 = {c - b:+.2f} ms")
    print("target C p50 <= B p50 + 1 ms:", "met" if c <= b + 1 else "NOT met")


if __name__ == "__main__":
    main()
