from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from daemon_process import DaemonProcess
from helpers import THREAD_HOPS, OpenStore
from pg import PgCluster, start_cluster
from skydeck.service import Service, Settings
from skydeck.store import Store
from skydeck.store.sqlite import SQLiteStore


@dataclass
class Daemon:
    service: Service
    url: str
    client: httpx.AsyncClient

    def count_rows(self, table: str = "messages") -> int:
        url = self.service.settings.store_url
        if url is not None and url.startswith("postgres"):
            import psycopg

            with psycopg.connect(url) as conn:
                row = conn.execute(f"SELECT count(*) FROM skydeck.{table}").fetchone()
                assert row is not None
                return int(row[0])
        with sqlite3.connect(self.service.db_path) as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


CREDENTIAL_AND_DAEMON_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "SKYDECK_TOKEN",
    "SKYDECK_JWT_SECRET",
    "SKYDECK_JWKS_URL",
    "SKYDECK_JWT_ISSUER",
    "SKYDECK_URL",
)


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no credentials or daemon settings from the machine they run on."""
    for name in CREDENTIAL_AND_DAEMON_VARS:
        monkeypatch.delenv(name, raising=False)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Daemon]:
    """A real skydeck service on a loopback port, in this test's Trio run."""
    service = Service(settings)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(service.run)
        async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
            yield Daemon(service, binds[0], client)
        service.stop()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A real skydeck service on a loopback port, on the embedded store."""
    async with serving(Settings(port=0, data_dir=tmp_path / "data")) as daemon:
        yield daemon


@pytest.fixture(params=["sqlite", "postgres"])
async def daemon_on_both(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Daemon]:
    """`daemon` on each store (multi-host.md §8): on PostgreSQL the only host,
    ``h1``, of the test's own database."""
    settings = Settings(port=0, data_dir=tmp_path / "data")
    if request.param == "postgres":
        settings.store_url = request.getfixturevalue("pg_url")
        settings.host_id = "h1"
    async with serving(settings) as daemon:
        yield daemon


@pytest.fixture
def stop_all() -> Iterator[list[DaemonProcess]]:
    """Real daemons a test started: any still running at its end is killed."""
    daemons: list[DaemonProcess] = []
    yield daemons
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.kill()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throw-away PostgreSQL cluster for the whole test session (tests/pg.py)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A database of this test's own, migrated (from the template)."""
    return pg_cluster.new_database()


#: The in-process PostgreSQL host (`helpers.one_host`) is the only one: its loops
#: (a heartbeat every TTL/4, the definitions poll) find nothing to do, and under
#: the autojump clock a simulated day of them costs real seconds. So they are rare.
ONE_HOST_TTL_S = 3600
ONE_HOST_DEFS_POLL_S = 3600.0
#: How often (real seconds) an idle run loop looks again while a worker thread runs.
AUTOJUMP_POLL_S = 0.001


def hold_autojump_while_threads_run(clock: trio.testing.MockClock, mp: pytest.MonkeyPatch) -> None:
    """PostgreSQL answers on worker threads, and an autojump clock jumps as soon as
    every task waits: with a query in flight, virtual time would race to the next
    timeout (a turn's, the scan's) while the database works. So the clock jumps
    only while no worker thread runs (the count wraps `trio.to_thread.run_sync`,
    which every PostgreSQL session goes through; `helpers.settle` reads the count
    of finished ones)."""
    in_flight = 0
    run_sync = trio.to_thread.run_sync
    jump = clock._autojump  # type: ignore[attr-defined]  # what the run loop calls when idle
    threshold = clock.autojump_threshold

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight
        in_flight += 1
        # While a thread runs the run loop polls every AUTOJUMP_POLL_S, rather than
        # spinning; with none, an idle loop jumps at once, as the plain clock does.
        clock.autojump_threshold = AUTOJUMP_POLL_S
        try:
            return await run_sync(*args, **kwargs)
        finally:
            in_flight -= 1
            THREAD_HOPS.finished += 1
            if in_flight == 0:
                clock.autojump_threshold = threshold

    def autojump() -> None:
        if in_flight == 0:
            jump()

    mp.setattr(trio.to_thread, "run_sync", counted)
    mp.setattr(clock, "_autojump", autojump)


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """multi-host.md §8: the store-facing tests run on both stores. Each call
    opens the test's store again (SQLite: the same file; PostgreSQL: the same
    per-test database, as host ``h1``); every store opened is closed at the end."""
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None

    async def open_one() -> Store:
        store: Store
        if url is None:
            store = SQLiteStore(tmp_path / "skydeck.db")
        else:
            from skydeck.store.postgres import open_postgres

            mp: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
            mp.setattr("skydeck.pg.cluster.DEFS_POLL_S", ONE_HOST_DEFS_POLL_S)
            clock = trio.lowlevel.current_clock()
            if isinstance(clock, trio.testing.MockClock):
                hold_autojump_while_threads_run(clock, mp)
            store = await open_postgres(url, host_id="h1", ttl_s=ONE_HOST_TTL_S, readers=2)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        with contextlib.suppress(sqlite3.ProgrammingError):  # the test closed it (a restart)
            store.close()
