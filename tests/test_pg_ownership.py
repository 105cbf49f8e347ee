"""Hosts, leases and fencing tokens on a real PostgreSQL (multi-host.md §3, P3, P4, P8-P10,
P15, P16), and the driver under them (§6)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
import trio

from pg import PgCluster
from skydeck.errors import StoreUnreachable
from skydeck.pg import schema
from skydeck.pg.driver import Listener, Session, Timeouts, conninfo, redact
from skydeck.pg.ownership import HostInUse, PgOwnership, application_name

TTL = 3.0


def session(url: str, name: str = "skydeck/test") -> Session:
    return Session(
        conninfo(
            url,
            application_name=name,
            schema="skydeck",
            timeouts=Timeouts.for_ttl(TTL, control=True),
        )
    )


def sql(url: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    """One statement on a session of its own, as an operator's psql would."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = skydeck")
        cursor = conn.execute(statement.encode(), args or None)
        return cursor.fetchall() if cursor.description else []


def add_channels(url: str, *names: str) -> None:
    """Channels with an agent, as a registration leaves them: claimable (P12)."""
    for name in names:
        sql(url, "INSERT INTO channels (name, agent) VALUES (%s, %s)", name, name)
        sql(url, "INSERT INTO leases (name) VALUES (%s)", name)


@pytest.fixture
async def hosts(pg_url: str) -> AsyncIterator[Callable[[str], PgOwnership]]:
    """Make joined-later ownerships ``h1``, ``h2``... on the test's database."""
    made: list[Session] = []

    def make(host_id: str) -> PgOwnership:
        control = session(pg_url)
        made.append(control)
        return PgOwnership(control, host_id=host_id, ttl_s=TTL, url=f"http://{host_id}")

    yield make
    for control in made:
        await control.close()


# -- P4: the migrator ------------------------------------------------------------------


def test_migrate_empty_then_nothing_to_do(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database(template=None)
    with psycopg.connect(url) as conn:
        assert schema.migrate(conn, "skydeck") == schema.Migrated(0, schema.SCHEMA_VERSION)
        again = schema.migrate(conn, "skydeck")
    assert again == schema.Migrated(schema.SCHEMA_VERSION, schema.SCHEMA_VERSION)
    names = {row[0] for row in sql(url, "SELECT name FROM leases")}
    assert names == {"role:scheduler", "role:vault-sync", "role:vault-outbox"}


def test_three_migrators_at_once_one_migrates(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database(template=None)
    results: list[schema.Migrated] = []
    start = threading.Barrier(3)

    def run() -> None:
        with psycopg.connect(url) as conn:
            start.wait()
            results.append(schema.migrate(conn, "skydeck"))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.before for r in results) == [0, 1, 1]
    assert all(r.after == schema.SCHEMA_VERSION for r in results)


def test_no_migrate_and_too_new_refuse(pg_cluster: PgCluster, pg_url: str) -> None:
    empty = pg_cluster.new_database(template=None)
    with psycopg.connect(empty) as conn, pytest.raises(schema.SchemaError, match="skydeck migrate"):
        schema.migrate(conn, "skydeck", allowed=False)
    sql(pg_url, "UPDATE meta SET value = '7' WHERE key = 'version'")
    with psycopg.connect(pg_url) as conn:  # newer, but still compatible: served as it is
        assert schema.migrate(conn, "skydeck") == schema.Migrated(7, 7)
    sql(pg_url, "UPDATE meta SET value = '7' WHERE key = 'min_compatible'")
    with psycopg.connect(pg_url) as conn, pytest.raises(schema.SchemaError, match="upgrade"):
        schema.migrate(conn, "skydeck")


def test_a_held_migration_lock_times_out_with_one_sentence(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATE_WAIT_S", 0.2)
    with psycopg.connect(pg_url) as holder, psycopg.connect(pg_url) as other:
        holder.execute("SELECT pg_advisory_xact_lock(hashtext('skydeck:migrate:skydeck'))")
        with pytest.raises(schema.SchemaError, match="another skydeck is migrating the store"):
            schema.migrate(other, "skydeck")


# -- P3, P8, P10: identity, heartbeat, the local deadline ----------------------------------


async def test_join_sets_the_application_name_and_a_live_id_is_refused(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    first = hosts("h1")
    incarnation = await first.join()
    rows = sql(
        pg_url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
        application_name("h1", incarnation),
    )
    assert rows == [(1,)]
    with pytest.raises(HostInUse, match="host id h1 is in use by a live daemon"):
        await hosts("h1").join()
    # A dead predecessor (its sessions gone, its row unexpired) is taken over at once.
    await first.session.close()
    again = hosts("h1")
    assert await again.join() > incarnation


async def test_heartbeat_of_an_expired_row_fails_and_a_rejoin_is_newer(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    host = hosts("h1")
    incarnation = await host.join()
    assert await host.heartbeat()
    sql(pg_url, "UPDATE hosts SET expires_at = now()")
    assert not await host.heartbeat()
    assert not host.alive()
    assert await host.join() > incarnation
    assert await host.heartbeat()


async def test_deadline_is_send_time_plus_ttl_minus_margin(
    hosts: Callable[[str], PgOwnership],
) -> None:
    host = hosts("h1")
    now = [100.0]
    host.clock = lambda: now[0]
    await host.join()
    assert host.deadline() == pytest.approx(100.0 + TTL - 1.0)  # margin max(1 s, TTL/10)
    now[0] = 101.5
    assert host.alive()
    await host.heartbeat()
    assert host.deadline() == pytest.approx(101.5 + TTL - 1.0)
    now[0] = 103.6
    assert not host.alive()


# -- P9: claims ---------------------------------------------------------------------------


async def test_three_hosts_claim_one_channel_one_winner_rising_tokens(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    add_channels(pg_url, "c1")
    rivals = [hosts(f"h{i}") for i in range(3)]
    for rival in rivals:
        await rival.join()
    tokens: list[int] = []
    for _ in range(100):
        won: list[tuple[PgOwnership, int]] = []

        async def claim(rival: PgOwnership) -> None:
            for claimed in await rival.claim(1, ["c1"]):
                won.append((rival, claimed.lease.token))  # noqa: B023 (awaited in the loop)

        async with trio.open_nursery() as nursery:
            for rival in rivals:
                nursery.start_soon(claim, rival)
        assert len(won) == 1
        winner, token = won[0]
        tokens.append(token)
        for rival in rivals:  # a live owner's channel is never claimed
            assert await rival.claim(1, ["c1"]) == []
        assert await winner.release(["c1"]) == 1
    assert tokens == sorted(set(tokens))


async def test_claim_order_reasons_room_and_roles(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    add_channels(pg_url, "a", "b", "c")
    sql(
        pg_url,
        "INSERT INTO messages (id, channel, direction, content, state) "
        "VALUES ('m1', 'c', 'in', 'x', 'queued')",
    )
    h1, h2 = hosts("h1"), hosts("h2")
    await h1.join()
    await h2.join()
    first = await h1.claim(2)
    # A channel with the oldest open message first (c), then by name (a, not b);
    # roles never come with channels.
    assert sorted(c.lease.name for c in first) == ["a", "c"]
    assert {c.reason for c in first} == {"unowned"}
    assert [c.lease.name for c in await h2.claim(5)] == ["b"]
    roles = await h2.claim(5, roles=True)
    assert sorted(c.lease.name for c in roles) == [
        "role:scheduler",
        "role:vault-outbox",
        "role:vault-sync",
    ]
    await h1.release(["a"])
    (again,) = await h2.claim(5)
    assert (again.lease.name, again.reason, again.previous_owner) == ("a", "released", None)


async def test_a_claimer_that_is_itself_expired_claims_nothing(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    add_channels(pg_url, "a")
    sql(pg_url, "INSERT INTO leases (name) VALUES ('no-agent')")  # never claimable
    host = hosts("h1")
    await host.join()
    (claimed,) = await host.claim(5)
    assert claimed.lease.name == "a"
    await host.release(["a"])
    sql(pg_url, "UPDATE hosts SET expires_at = now()")
    assert await host.claim(5) == []


# -- P15, P16: crash, fast failover, orphaned records --------------------------------------


async def test_sessionless_host_expires_after_two_scans_and_its_records_close(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    add_channels(pg_url, "a")
    dead, survivor = hosts("h1"), hosts("h2")
    dead_inc = await dead.join()
    await survivor.join()
    ((claimed),) = await dead.claim(1)
    sql(
        pg_url,
        "INSERT INTO threads (id, channel, agent, mode, status, input, started_at, host, fence) "
        "VALUES ('t1', 'a', 'a', 'multi-threaded', 'working', 'x', clock_timestamp(), 'h1', %s)",
        claimed.lease.token,
    )
    await dead.session.close()  # the kernel closes a SIGKILLed host's sockets
    assert await survivor.claim(1) == []  # still alive on the database clock
    assert await survivor.expire_dead() == []  # seen once
    assert await survivor.expire_dead() == [("h1", dead_inc)]
    (taken,) = await survivor.claim(1)
    assert (taken.reason, taken.previous_owner) == ("orphan", "h1")
    assert taken.lease.token > claimed.lease.token
    ((status, output, closed_at_claim),) = sql(
        pg_url,
        "SELECT t.status, t.output, t.ended_at = l.acquired_at FROM threads t "
        "JOIN leases l ON l.name = t.channel WHERE t.id = 't1'",
    )
    assert status == "error"
    assert output == f"interrupted: host h1 (incarnation {dead_inc}) stopped"
    assert closed_at_claim


async def test_a_host_with_sessions_is_never_expired_by_a_scan(
    hosts: Callable[[str], PgOwnership],
) -> None:
    h1, h2 = hosts("h1"), hosts("h2")
    await h1.join()
    await h2.join()
    for _ in range(3):
        assert await h2.expire_dead() == []
    assert await h1.heartbeat()


async def test_leave_releases_everything_at_once(
    pg_url: str, hosts: Callable[[str], PgOwnership]
) -> None:
    add_channels(pg_url, "a", "b")
    h1, h2 = hosts("h1"), hosts("h2")
    await h1.join()
    await h2.join()
    assert len(await h1.claim(5)) == 2
    await h1.leave()
    assert sorted((c.lease.name, c.reason) for c in await h2.claim(5)) == [
        ("a", "released"),
        ("b", "released"),
    ]
    (h1_row,) = [h for h in await h2.hosts() if h.id == "h1"]
    assert not h1_row.alive
    assert [(h.id, h.owned) for h in await h2.hosts() if h.alive] == [("h2", 2)]


# -- §6: the driver --------------------------------------------------------------------------


async def test_listener_wakes_on_notify_without_a_thread(pg_url: str) -> None:
    listener = Listener(
        conninfo(pg_url, application_name="t", schema="skydeck", timeouts=Timeouts()),
        ["skydeck_wake"],
    )
    await listener.connect()
    try:
        got: list[tuple[str, str]] = []
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.extend(await listener.receive())

            nursery.start_soon(receive)
            await trio.sleep(0.05)
            started = time.monotonic()
            sql(pg_url, "SELECT pg_notify('skydeck_wake', 'c1')")
        assert got == [("skydeck_wake", "c1")]
        assert time.monotonic() - started < 0.5
        with trio.move_on_after(0.1) as idle:  # nothing more: it waits, and cancels cleanly
            await listener.receive()
        assert idle.cancelled_caught
    finally:
        await listener.close()


async def test_session_transaction_rolls_back_and_reports_unreachable(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    s = session(pg_url)

    def fail(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', '1')")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await s.run(fail)
    assert sql(pg_url, "SELECT count(*) FROM meta WHERE key = 'x'") == [(0,)]
    bad = Session(
        conninfo(
            pg_url.replace(str(pg_cluster.root), "/nonexistent"),
            application_name="t",
            schema="skydeck",
            timeouts=Timeouts(),
        )
    )
    with pytest.raises(StoreUnreachable):
        await bad.connect()
    await s.close()


def test_redact_never_shows_a_password() -> None:
    assert redact("postgres://u:secret@db:5432/sky?sslmode=require&password=x") == (
        "postgres://u@db:5432/sky"
    )
    assert (
        redact("postgresql://skydeck@/t_1?host=/tmp/s") == "postgresql://skydeck@/t_1?host=/tmp/s"
    )


async def test_p10_rejoin_after_lease_lost_while_the_row_is_still_unexpired(
    hosts: Callable[[str], PgOwnership],
) -> None:
    host = hosts("h1")
    first = await host.join()
    host.forget()  # the local deadline passed first (P10): the row has not expired yet
    assert await host.join() > first  # its own old sessions do not make it "in use"
    with pytest.raises(HostInUse):  # another process with the same id still cannot
        await hosts("h1").join()
