"""Several hosts on one PostgreSQL (multi-host.md §10): PB1 durable turns/s, PB2 failover.

PB1: a cluster of its own at PostgreSQL's default durability (fsync, synchronous
commit). ``--channels`` echo agents and ``--messages`` queued messages each are
stored through the Store API before any daemon starts; then N = 1, 2, 3 `skydeck
serve --store postgres://...` processes drain them through the start-up replay
(R28/P15), and in the same run one daemon drains a SQLite file with the same
pre-load. Turns/s = turns / (last ``ended_at`` - first ``started_at``); CPU ms per
turn counts the daemons and, for Postgres, the server's processes.

PB2: 3 hosts, ``--pb2-channels`` echo channels, a poster at ``--rate`` messages/s
round-robin with ids; per round the host owning most channels gets SIGKILL,
SIGKILL with ``--no-fast-failover``, SIGSTOP for 2 x TTL, or SIGTERM. A sample per
orphaned channel = its first ``started_at`` elsewhere - the database time read just
before the signal (the spec's sample); the host is then restored. Beside it, the
*message delay* of that first turn: its ``started_at`` - max(signal time, its
message's ``created_at``). The spec's sample also counts the wait for the poster's
next message to that channel (at 200 messages/s over 300 channels, up to 1.5 s),
which no handover can shorten; the delay counts only what the fault cost a message.

    python bench/multi_host.py                      # the short run of docs/benchmarks.md
    python bench/multi_host.py --channels 1000 --messages 100 --rounds 20   # the spec's
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import psycopg
import trio

from skydeck.model import AgentSpec, Inbound
from skydeck.pg.scratch import PgCluster
from skydeck.store import Fence
from skydeck.store.postgres import open_postgres
from skydeck.store.sqlite import SQLiteStore

SKYDECK = str(Path(sys.executable).parent / "skydeck")


class Daemon:
    """One `skydeck serve`, started and read like tests/daemon_process.py does."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYDECK_")}
        env["SKYDECK_LOG_LEVEL"] = "WARNING"
        self.log = open(f"{data_dir}.log", "ab")  # noqa: SIM115 (for the daemon's life)
        self.proc = subprocess.Popen(
            [SKYDECK, "serve", "--port", "0", "--no-demo", "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        assert self.proc.stdout is not None
        self.url = ""
        for raw in self.proc.stdout:
            if match := re.search(r"API:\s+(http://\S+)/api", raw.decode()):
                self.url = match.group(1)
                break
        if not self.url:
            raise RuntimeError(f"daemon did not start; see {self.log.name}")

    def cpu_s(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def postgres_cpu_s() -> float:
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if (proc.info["name"] or "").startswith("postgres"):
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
    return total


def sql(url: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = skydeck")
        return conn.execute(statement.encode(), args or None).fetchall()


# -- PB1 ---------------------------------------------------------------------------


def agents(channels: int) -> list[AgentSpec]:
    return [
        AgentSpec(name=f"b{i:04d}", channel=f"b{i:04d}", backend="echo", mode="multi-threaded")
        for i in range(channels)
    ]


def inbounds(channels: int, messages: int) -> list[Inbound]:
    return [
        Inbound(channel=f"b{i:04d}", content=f"{n}")
        for n in range(messages)
        for i in range(channels)
    ]


async def preload_postgres(url: str, channels: int, messages: int) -> None:
    store = await open_postgres(url, host_id="preload", ttl_s=2, readers=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run_flusher)
        for agent in agents(channels):
            await store.create_agent(agent, Fence.local(agent.channel))
        todo = inbounds(channels, messages)
        for start in range(0, len(todo), 1000):
            batch = [(one, True) for one in todo[start : start + 1000]]
            await store.accept_batch(batch, buffer_cap=messages + 1)
        nursery.cancel_scope.cancel()
    await store.ownership.leave()
    store.close()


async def preload_sqlite(path: Path, channels: int, messages: int) -> None:
    store = SQLiteStore(path)
    for agent in agents(channels):
        await store.create_agent(agent, Fence.local(agent.channel))
    todo = inbounds(channels, messages)
    for start in range(0, len(todo), 1000):
        await store.accept_batch(
            [(one, True) for one in todo[start : start + 1000]], buffer_cap=messages + 1
        )
        await store.flushed()
    await store.set_meta("initialized", "1")
    store.close()


def wait_drained(count_open: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_open() == 0:  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise RuntimeError("not drained in time")


def pb1_postgres(cluster: PgCluster, hosts: int, channels: int, messages: int) -> dict[str, object]:
    url = cluster.new_database(template=None)
    trio.run(preload_postgres, url, channels, messages)
    root = Path(tempfile.mkdtemp(prefix="pb1-"))
    cpu_before = postgres_cpu_s()
    cap = str(math.ceil(channels / hosts))
    daemons = [
        Daemon(
            root / f"h{n}",
            "--store",
            url,
            "--host-id",
            f"h{n}",
            "--max-turns",
            "1000",
            "--max-channels",
            cap,
        )
        for n in range(hosts)
    ]
    try:
        wait_drained(
            lambda: sql(url, "SELECT count(*) FROM messages WHERE state <> 'done'")[0][0], 900
        )
        ((turns, seconds),) = sql(
            url,
            "SELECT count(*), extract(epoch FROM max(ended_at) - min(started_at))::float8 "
            "FROM threads",
        )
        fenced = 0.0
        for daemon in daemons:
            text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
            fenced += sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("skydeck_fenced_writes_total")
            )
        daemon_cpu = sum(d.cpu_s() for d in daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
    pg_cpu = postgres_cpu_s() - cpu_before
    n = int(str(turns))
    return {
        "store": "postgres",
        "hosts": hosts,
        "turns": n,
        "turns_s": n / float(str(seconds)),
        "cpu_ms": (daemon_cpu + pg_cpu) * 1000 / n,
        "fenced": int(fenced),
    }


def pb1_sqlite(channels: int, messages: int) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="pb1-sqlite-"))
    (root / "h").mkdir()
    db = root / "h" / "skydeck.db"
    trio.run(preload_sqlite, db, channels, messages)
    daemon = Daemon(root / "h", "--max-turns", "1000")

    def count_open() -> int:
        with sqlite3.connect(db) as conn:
            return int(
                conn.execute("SELECT count(*) FROM messages WHERE state <> 'done'").fetchone()[0]
            )

    try:
        wait_drained(count_open, 900)
        cpu = daemon.cpu_s()
    finally:
        daemon.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT min(started_at), max(ended_at), count(*) FROM threads"
        ).fetchone()
    first, last = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in rows[:2])
    n = int(rows[2])
    return {
        "store": "sqlite",
        "hosts": 1,
        "turns": n,
        "turns_s": n / (last - first).total_seconds(),
        "cpu_ms": cpu * 1000 / n,
        "fenced": 0,
    }


# -- PB2 ---------------------------------------------------------------------------


def db_now(url: str) -> float:
    return float(str(sql(url, "SELECT extract(epoch FROM clock_timestamp())::float8")[0][0]))


async def poster(
    urls: Callable[[], list[str]], channels: list[str], rate: float, stop: trio.Event
) -> None:
    """Posts with ids at ``rate`` a second, round-robin over channels and hosts;
    a refused or failed one goes to the next host. Open loop: each post is its own
    task, so a stopped host that times posts out does not slow the offered rate
    (a sequential poster fell to ~1.5 posts/s while a host was SIGSTOPped)."""

    async def post(client: httpx.AsyncClient, n: int) -> None:
        channel = channels[n % len(channels)]
        text = f"{channel}:{n}"
        now = urls()
        for attempt in range(len(now) * 3):
            try:
                response = await client.post(
                    f"{now[(n + attempt) % len(now)]}/api/channels/{channel}/messages",
                    json={"content": text, "id": text},
                )
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                return

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=30)
    async with httpx.AsyncClient(timeout=2, limits=limits) as client, trio.open_nursery() as posts:
        n = 0
        while not stop.is_set():
            posts.start_soon(post, client, n)
            n += 1
            await trio.sleep(1 / rate)


def pb2_kind(
    cluster: PgCluster, kind: str, channels: int, rate: float, rounds: int, ttl: float
) -> list[tuple[float, float]]:
    """``rounds`` rounds of one fault on a fresh set of 3 hosts."""
    url = cluster.new_database(template=None)
    root = Path(tempfile.mkdtemp(prefix="pb2-"))
    common = ["--store", url, "--lease-ttl", str(ttl)]
    if kind == "SIGKILL no-fast":
        common.append("--no-fast-failover")  # the survivors are the ones that would expire it
    restarts = iter(range(1_000_000))

    def start(host_id: str) -> Daemon:
        return Daemon(root / f"{host_id}-{next(restarts)}", *common, "--host-id", host_id)

    hosts = {h: start(h) for h in ("h0", "h1", "h2")}
    names = [f"p{i:04d}" for i in range(channels)]
    with httpx.Client(timeout=10) as client:
        for name in names:
            spec = {"name": name, "channel": name, "backend": "echo", "mode": "multi-threaded"}
            client.post(f"{hosts['h0'].url}/api/agents", json=spec)
    samples: list[tuple[float, float]] = []  # (spec's sample, message delay)

    def owned_by(host_id: str) -> list[str]:
        rows = sql(
            url,
            "SELECT l.name FROM leases l JOIN hosts h ON (h.host_id, h.incarnation) = "
            "(l.owner, l.incarnation) WHERE h.expires_at > now() AND l.owner = %s "
            "AND l.name NOT LIKE 'role:%%'",
            host_id,
        )
        return [str(name) for (name,) in rows]

    async def run_rounds() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poster, lambda: [d.url for d in hosts.values()], names, rate, stop)
            for _ in range(rounds):
                await trio.sleep(ttl)  # settle
                victim = max(hosts, key=lambda h: len(owned_by(h)))
                owned = owned_by(victim)
                daemon = hosts[victim]
                at = db_now(url)
                if kind.startswith("SIGKILL"):
                    daemon.proc.kill()
                elif kind == "SIGSTOP":
                    daemon.proc.send_signal(signal.SIGSTOP)
                else:
                    daemon.proc.send_signal(signal.SIGTERM)
                # A stopped host is sampled while still stopped, after 2 x TTL (a
                # shorter window would drop the channels that moved last).
                await trio.sleep(2 * ttl if kind == "SIGSTOP" else ttl + 3)
                for channel in owned:
                    rows = sql(
                        url,
                        "SELECT extract(epoch FROM t.started_at)::float8, "
                        "extract(epoch FROM m.created_at)::float8 FROM threads t "
                        "JOIN messages m ON m.id = t.message_id "
                        "WHERE t.channel = %s AND t.host <> %s AND t.started_at > to_timestamp(%s) "
                        "ORDER BY t.started_at LIMIT 1",
                        channel,
                        victim,
                        at,
                    )
                    for started, created in rows:
                        first = float(str(started))
                        samples.append((first - at, first - max(at, float(str(created)))))
                daemon.stop()  # SIGCONT first for a stopped one
                # The restored host gets channels back through fresh ones (as the spec's
                # 30 newly registered channels do), so it owns its share again.
                hosts[victim] = await trio.to_thread.run_sync(start, victim)
                async with httpx.AsyncClient(timeout=10) as client:
                    for _ in range(channels // 10):
                        name = f"q{next(restarts):05d}"
                        names.append(name)
                        spec = {
                            "name": name,
                            "channel": name,
                            "backend": "echo",
                            "mode": "multi-threaded",
                        }
                        await client.post(f"{hosts[victim].url}/api/agents", json=spec)
            stop.set()

    try:
        trio.run(run_rounds)
    finally:
        for daemon in hosts.values():
            daemon.stop()
    return samples


def pb1(cluster: PgCluster, channels: int, messages: int) -> None:
    print(f"PB1: {channels} channels x {messages} messages, durable")
    sqlite = pb1_sqlite(channels, messages)
    rows = [sqlite] + [pb1_postgres(cluster, n, channels, messages) for n in (1, 2, 3)]
    print("| store | hosts | turns/s | vs SQLite | CPU ms/turn | fenced writes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = float(str(row["turns_s"])) / float(str(sqlite["turns_s"]))
        print(
            f"| {row['store']} | {row['hosts']} | {float(str(row['turns_s'])):,.0f} | "
            f"{ratio:.2f}x | {float(str(row['cpu_ms'])):.2f} | {row['fenced']} |"
        )


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--pb2-channels", type=int, default=60)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--skip-pb1", action="store_true")
    parser.add_argument("--skip-pb2", action="store_true")
    parser.add_argument(
        "--kinds", default="SIGKILL,SIGKILL no-fast,SIGSTOP,SIGTERM", help="PB2's faults"
    )
    args = parser.parse_args()
    cluster = PgCluster(durable=True)
    cluster.init()
    cluster.start()
    try:
        if not args.skip_pb1:
            pb1(cluster, args.channels, args.messages)
        if not args.skip_pb2:
            print(
                f"PB2: 3 hosts, {args.pb2_channels} channels, {args.rate:g} msg/s, "
                f"TTL {args.ttl:g} s, {args.rounds} rounds each"
            )
            print("| kind | samples | p50 s | p99 s | message delay p50 s | p99 s |")
            print("|---|---|---|---|---|---|")
            for kind in args.kinds.split(","):
                values = pb2_kind(
                    cluster, kind, args.pb2_channels, args.rate, args.rounds, args.ttl
                )
                if values:
                    spec = [sample for sample, _ in values]
                    delay = [wait for _, wait in values]
                    print(
                        f"| {kind} | {len(values)} | {statistics.median(spec):.2f} | "
                        f"{percentile(spec, 0.99):.2f} | {statistics.median(delay):.2f} | "
                        f"{percentile(delay, 0.99):.2f} |"
                    )
                else:
                    print(f"| {kind} | 0 | - | - | - | - |")
    finally:
        cluster.remove()


if __name__ == "__main__":
    main()
