"""P1 store URLs and P7 sessions, on real `skydeck serve` daemons.

P1: every URL form serves (``postgres://`` and ``postgresql://``, a socket directory
in ``?host=``, the password from the URL, ``PGPASSWORD`` or ``~/.pgpass``, and
``sqlite:///ABS/PATH``), and no password reaches the log or `/health`. The password
sources are real: the role logs in with scram-sha-256, so a daemon with none is refused.

P7: a host holds 7 sessions (writer, control, listener and ``--store-pool`` readers),
each named ``skydeck/<host>/<incarnation>``, each with the rule's timeouts.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from daemon_process import SKYDECK, DaemonProcess, clean_env
from pg import PgCluster, query
from skydeck.errors import StoreUnreachable
from skydeck.model import AgentSpec
from skydeck.pg.driver import redact
from skydeck.pg.hosting import PgHost
from skydeck.service import Settings
from skydeck.store import Fence
from skydeck.store.postgres import open_postgres

pytestmark = pytest.mark.slow

ROLE = "pw_user"
PASSWORD = "s3cret-Pw-7"


@pytest.fixture
def password_role(pg_cluster: PgCluster) -> str:
    """A role that must give its password (scram-sha-256 on the socket; every other
    role of the session's cluster keeps `trust`)."""
    hba = pg_cluster.data / "pg_hba.conf"
    line = f"local all {ROLE} scram-sha-256\n"
    text = hba.read_text()
    if line not in text:
        hba.write_text(line + text)
    with pg_cluster.admin() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            conn.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        conn.execute("SELECT pg_reload_conf()")
    return ROLE


def as_role(url: str, scheme: str, password: str | None = None) -> str:
    """The test database's URL for `ROLE`, with ``scheme`` and maybe a password."""
    parts = urlsplit(url)
    user = f"{ROLE}:{password}" if password else ROLE
    return f"{scheme}://{user}@{parts.path}?{parts.query}"


async def test_p1_every_url_form_serves_and_no_password_is_shown(
    tmp_path: Path, pg_url: str, password_role: str, stop_all: list[DaemonProcess]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    pgpass = home / ".pgpass"
    pgpass.write_text(f"*:*:*:{ROLE}:{PASSWORD}\n")
    pgpass.chmod(0o600)
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    forms = {
        "in-url": (as_role(pg_url, "postgres", PASSWORD), {"HOME": str(empty_home)}),
        "pgpassword": (
            as_role(pg_url, "postgresql"),
            {"PGPASSWORD": PASSWORD, "HOME": str(empty_home)},
        ),
        "pgpass": (as_role(pg_url, "postgresql"), {"HOME": str(home)}),
    }
    # Without a password the role is refused: the sources above are what serve.
    argv = [SKYDECK, "serve", "--port", "0", "--data-dir", str(tmp_path / "none")]
    argv += ["--no-demo", "--store", as_role(pg_url, "postgresql"), "--host-id", "none"]
    done = await trio.run_process(
        argv,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**clean_env(), "HOME": str(empty_home)},
    )
    refused = subprocess.CompletedProcess(argv, done.returncode, "", done.stderr.decode())
    assert refused.returncode == 2 and "cannot reach the store" in refused.stderr
    assert "password" in refused.stderr, refused.stderr
    for source, (url, env) in forms.items():
        assert "?host=/" in url  # a socket directory in the URL
        daemon = DaemonProcess(
            tmp_path / source,
            "--no-demo",
            "--store",
            url,
            "--host-id",
            source,
            env={"SKYDECK_LOG_LEVEL": "INFO", **env},
        )
        stop_all.append(daemon)
        async with httpx.AsyncClient(timeout=10) as client:
            health = await client.get(f"{daemon.url}/health")
        assert health.status_code == 200, health.text
        assert health.json()["store"] == {"kind": "postgres", "url": redact(url)}
        assert redact(url).startswith(f"{urlsplit(url).scheme}://{ROLE}@/")
        assert PASSWORD not in health.text
        assert daemon.stop() == 0
        log = (tmp_path / f"{source}-daemon.log").read_text()
        assert "joined the store" in log  # INFO lines were written: the check has teeth
        assert PASSWORD not in log, source
    rows = query(pg_url, "SELECT host_id FROM hosts ORDER BY host_id")
    assert rows == [("in-url",), ("pgpass",), ("pgpassword",)]


async def test_p1_a_sqlite_url_serves_its_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "my.db"
    path.parent.mkdir()
    daemon = DaemonProcess(tmp_path / "data", "--store", f"sqlite://{path}")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            health = (await client.get(f"{daemon.url}/health")).json()
        assert health["store"] == {"kind": "sqlite"}
        assert [a["name"] for a in health["agents"]] == ["demo"]  # the store is this file
        assert path.stat().st_size > 0 and not (tmp_path / "data" / "skydeck.db").exists()
    finally:
        assert daemon.stop() == 0


async def test_p7_a_host_holds_seven_named_sessions(
    tmp_path: Path, pg_url: str, stop_all: list[DaemonProcess]
) -> None:
    daemon = DaemonProcess(
        tmp_path / "h1", "--no-demo", "--store", pg_url, "--host-id", "h1", "--lease-ttl", "4"
    )
    stop_all.append(daemon)
    ((incarnation,),) = query(pg_url, "SELECT incarnation FROM hosts WHERE host_id = 'h1'")
    name = f"skydeck/h1/{incarnation}"
    with trio.fail_after(5):
        while True:
            sessions = query(
                pg_url,
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE application_name LIKE 'skydeck/%%' AND datname = current_database() "
                "GROUP BY application_name",
            )
            if sessions == [(name, 7)]:  # writer, control, listener, 4 readers
                break
            await trio.sleep(0.1)
    assert daemon.stop() == 0


async def test_p7_each_session_sets_the_rule_s_timeouts(pg_url: str, tmp_path: Path) -> None:
    """The daemon's own construction (`PgHost`), each session asked what it set."""
    settings = Settings(port=0, data_dir=tmp_path, store_url=pg_url, host_id="h1", lease_ttl_s=4.0)
    host = PgHost.build(settings, CollectorRegistry(), on_dropped=None)

    class NoChannels:
        def owned(self) -> dict[str, Fence]:
            return {}

    cluster = host.attach(NoChannels(), CollectorRegistry())  # type: ignore[arg-type]
    await host.open()
    show = (
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
        "current_setting('idle_in_transaction_session_timeout'), "
        "current_setting('application_name')"
    )
    try:
        store = host.store

        def ask(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...]:
            row = conn.execute(show).fetchone()
            assert row is not None
            return row

        seen = {
            "writer": await store.writer.run(ask),
            "control": await store.ownership.session.run(ask),
        }
        for n, reader in enumerate(store.sessions()[1:-1]):
            seen[f"reader{n}"] = await reader.run(ask)
        with psycopg.connect(cluster.listener.conninfo) as conn:
            seen["listener"] = ask(conn)
    finally:
        store.close()
    name = f"skydeck/h1/{store.ownership.incarnation}"
    # P7: statement 5 s (TTL/4 on control), lock 2 s, idle in transaction min(5 s, TTL/2).
    expected = {key: ("5s", "2s", "2s", name) for key in seen}
    expected["control"] = ("1s", "2s", "2s", name)
    # The listener is named for the incarnation as the cluster loop connects it (the
    # 7-session test sees that); its timeouts are fixed here.
    assert seen.pop("listener")[:3] == expected.pop("listener")[:3]
    assert seen == expected
    assert len(seen) == 6  # and the listener: 7


async def test_p6_sessions_cut_while_idle_cost_a_read_nothing_and_a_write_its_answer(
    pg_url: str,
) -> None:
    """A server restart (or a pooler, or an admin) cuts idle sessions: the next read
    runs again on a fresh connection (counted `connection`, no outage on /health);
    a definitions write is never repeated, since its commit may have landed."""
    store = await open_postgres(pg_url, host_id="h1", ttl_s=4.0, readers=1)
    try:
        assert await store.list_agents() == []

        def cut() -> None:
            query(
                pg_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'skydeck/h1/%%'",
            )

        cut()
        assert [await store.list_agents(), await store.list_agents()] == [[], []]
        assert sum(s.retries.get("connection", 0) for s in store.sessions()) == 1
        assert store.unreachable_since is None
        cut()
        agent = AgentSpec(name="a", channel="a", backend="echo")
        with pytest.raises(StoreUnreachable):
            await store.create_agent(agent, Fence("a"))
        assert store.unreachable_since is not None  # /health: 503 until a good heartbeat
        await store.create_agent(agent, Fence("a"))  # the next one, on a fresh session
    finally:
        store.close()


async def test_p7_a_paused_client_s_row_locks_are_freed_by_the_idle_timeout(
    pg_url: str,
) -> None:
    """P7's reason for `idle_in_transaction_session_timeout`: a host paused inside a
    batch (here its worker thread sleeps with a row locked) loses the session, and
    its locks, after min(5 s, TTL/2), not when it resumes."""
    store = await open_postgres(pg_url, host_id="h1", ttl_s=4.0, readers=1)
    paused = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def locked_then_paused(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        conn.execute("SELECT 1 FROM hosts WHERE host_id = 'h1' FOR UPDATE")
        trio.from_thread.run_sync(paused.set, trio_token=token)
        time.sleep(2 + 1.5)  # the pause: past the 2 s timeout, nothing sent meanwhile

    freed_after: list[float] = []

    def lock() -> None:
        started = time.monotonic()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '4s'")
            conn.execute("SELECT 1 FROM skydeck.hosts WHERE host_id = 'h1' FOR UPDATE")
        freed_after.append(time.monotonic() - started)

    async def rival() -> None:
        await paused.wait()
        await trio.to_thread.run_sync(lock)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rival)
            with pytest.raises(StoreUnreachable):  # the server ended the session
                await store.writer.run(locked_then_paused)
    finally:
        store.close()
    assert 1.5 < freed_after[0] < 2 + 1, freed_after
    print(f"P7: row lock freed {freed_after[0]:.2f} s into the pause")


async def test_p7_a_statement_or_lock_timeout_is_an_unreachable_store(pg_url: str) -> None:
    """P7's own timeouts leave the session usable, but the call did not happen:
    the caller sees `StoreUnreachable` (a heartbeat fences itself, a post gets
    P6's 503), not a raw psycopg error that would end the daemon."""
    store = await open_postgres(pg_url, host_id="h1", ttl_s=4.0, readers=1)

    def slow(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        conn.execute("SET LOCAL statement_timeout = '50ms'")
        conn.execute("SELECT pg_sleep(1)")

    def locked(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        conn.execute("SET LOCAL lock_timeout = '50ms'")
        conn.execute("SELECT 1 FROM hosts WHERE host_id = 'h1' FOR UPDATE")

    try:
        with pytest.raises(StoreUnreachable, match="statement timeout"):
            await store.writer.run(slow)
        with psycopg.connect(pg_url) as holder:  # another session holds the row
            holder.execute("SELECT 1 FROM skydeck.hosts WHERE host_id = 'h1' FOR UPDATE")
            with pytest.raises(StoreUnreachable, match="lock timeout"):
                await store.writer.run(locked)
        # The session itself is fine: the next call goes through.
        assert await store.writer.run(lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)
    finally:
        store.close()
