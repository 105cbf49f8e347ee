"""Webhook ingest: posts/s and latency of skydeck's `POST /api/inbound` next to a
bare Quart-Trio route on the same Hypercorn settings, measured in one run.

    python bench/http_ingest.py [--seconds 5] [--clients 32]

Each server runs in its own process (as in production); this process drives it
with concurrent httpx clients over loopback. The skydeck side is the real
daemon (`skydeck serve`, SQLite store) with an echo agent on the target
channel, so every post is validated, committed before its 200, and runs a turn.
The bare side parses the JSON body and answers the same shape, nothing else.
Prints posts/s, p50/p99 latency, and the ratio skydeck / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio


def serve_bare() -> None:
    """The baseline server: a bare Quart-Trio POST route on Hypercorn (child process)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio("bare")

    @app.post("/api/inbound")
    async def inbound() -> dict[str, object]:
        body = json.loads(await request.get_data())
        return {"ok": True, "id": str(body.get("id", "x")), "state": "queued"}

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, app, config)
            print(f"  API:    {binds[0]}/api", flush=True)

    trio.run(main)


def start(argv: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    for raw in proc.stdout:
        if match := re.search(r"API:\s+(http://\S+)/api", raw.decode()):
            return proc, match.group(1)
    raise RuntimeError(f"server did not start: {argv}")


async def load(url: str, seconds: float, clients: int, batch: int = 0) -> tuple[float, list[float]]:
    """Messages acknowledged per second, and each request's latency. With
    ``batch``, each request is one `POST /api/inbound/batch` of that many."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker(n: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if batch:
                    messages = [
                        {"channel": "hook", "content": f"event {n}-{i}-{k}"} for k in range(batch)
                    ]
                    response = await client.post("/api/inbound/batch", json={"messages": messages})
                else:
                    body = {"channel": "hook", "content": f"event {n}-{i}"}
                    response = await client.post("/api/inbound", json=body)
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                i += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(worker, n)
        elapsed = time.perf_counter() - started
    return len(latencies) * max(batch, 1) / elapsed, latencies


def drive(
    url: str, seconds: float, clients: int, procs: int, batch: int = 0
) -> tuple[float, list[float]]:
    """Load from several processes at once: one httpx process saturates before Hypercorn."""
    per_proc = max(1, clients // procs)
    argv = [
        sys.executable,
        __file__,
        "--load",
        url,
        "--seconds",
        str(seconds),
        "--clients",
        str(per_proc),
        "--batch",
        str(batch),
    ]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(procs)]
    rate, latencies = 0.0, []
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        data = json.loads(out)
        rate += data["rate"]
        latencies += data["latencies"]
    return rate, latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--procs", type=int, default=3, help="client processes")
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=500, help="messages per batch post")
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare()
        return
    if args.load:
        rate, latencies = trio.run(load, args.load, args.seconds, args.clients, args.batch)
        print(json.dumps({"rate": rate, "latencies": latencies}))
        return
    skydeck = str(Path(sys.executable).parent / "skydeck")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYDECK_", "ANTHROPIC_"))}
        env["SKYDECK_LOG_LEVEL"] = "WARNING"

        def daemon(name: str) -> list[str]:
            return [skydeck, "serve", "--port", "0", "--no-demo", "--data-dir", f"{tmp}/{name}"]

        batched = f"skydeck POST /api/inbound/batch ({args.batch_size} per post)"
        # (argv, clients, client processes, batch size)
        servers = {
            "bare Quart-Trio route": (
                [sys.executable, __file__, "--serve-bare"],
                args.clients,
                args.procs,
                0,
            ),
            "skydeck POST /api/inbound": (daemon("single"), args.clients, args.procs, 0),
            batched: (daemon("batch"), 4, 2, args.batch_size),
        }
        for label, (argv, clients, procs, batch) in servers.items():
            proc, url = start(argv)
            try:
                if "skydeck" in label:
                    spec = {"name": "hook", "channel": "hook", "backend": "echo"}
                    httpx.post(f"{url}/api/agents", json=spec).raise_for_status()
                trio.run(load, url, 1.0, clients, batch)  # warm-up
                results[label] = drive(url, args.seconds, clients, procs, batch)
            finally:
                proc.terminate()
                proc.wait(30)
    print(
        f"{args.clients} concurrent httpx clients in {args.procs} processes, "
        f"{args.seconds:g} s per server\n"
    )
    print("| server | messages/s | p50 ms per post | p99 ms per post |")
    print("|---|---:|---:|---:|")
    for label, (rate, latencies) in results.items():
        print(f"| {label} | {rate:,.0f} | {pct(latencies, 50):.1f} | {pct(latencies, 99):.1f} |")
    (bare, _), (ours, _), (batch_rate, _) = results.values()
    print(f"\nskydeck / bare: {ours / bare:.2f}x; batched: {batch_rate:,.0f} messages/s")


if __name__ == "__main__":
    main()
