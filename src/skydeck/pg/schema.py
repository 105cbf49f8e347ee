"""The PostgreSQL schema (multi-host.md §2) and its one migrator (P4).

store/sqlite's tables carry over, with times from the database clock
(`timestamptz`), `messages.seq` an identity column, and `host`/`fence` on what
a turn writes. New are the rows of ownership (`hosts`, `leases`, the sequence
`fence_seq` that gives incarnations and tokens and is never reset), the row
accepts and registrations lock (`channels`), cron's `job_slots`, and the rows
live events need (`watchers`, `event_spill`).

A migration is one transaction under a transaction-scoped advisory lock, so
a migrator that dies mid-way releases it and leaves the old version; the
others wait (up to `MIGRATE_WAIT_S`) and re-read the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..ledger import OPEN_STATES, ThreadStatus, sql_state, sql_states
from .driver import Connection

log = logging.getLogger(__name__)

#: The version this skydeck writes, and the oldest one that can still serve a store it wrote.
SCHEMA_VERSION = 1
MIN_COMPATIBLE = 1
#: P4: how long a daemon waits for another one's migration.
MIGRATE_WAIT_S = 60

_OPEN = sql_states(OPEN_STATES)

#: version -> the statements that reach it from the one before (1 creates everything).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE SEQUENCE fence_seq",
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
        "CREATE TABLE agents (name text PRIMARY KEY, channel text NOT NULL UNIQUE, "
        "spec text NOT NULL)",
        "CREATE TABLE channels (name text PRIMARY KEY, agent text)",
        """CREATE TABLE messages (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            channel text NOT NULL,
            direction text NOT NULL,
            content text NOT NULL,
            state text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            metadata text NOT NULL DEFAULT '{}',
            external_id text,
            in_reply_to text,
            thread_id text,
            reply_id text,
            attempts integer NOT NULL DEFAULT 0,
            error text,
            host text,
            fence bigint
        )""",
        "CREATE INDEX messages_channel_seq ON messages (channel, seq)",
        "CREATE UNIQUE INDEX messages_external_id ON messages (channel, external_id) "
        "WHERE external_id IS NOT NULL AND direction = 'in'",
        f"CREATE INDEX messages_open ON messages (channel, state, seq) WHERE state IN {_OPEN}",
        "CREATE INDEX messages_reply ON messages (reply_id) WHERE reply_id IS NOT NULL",
        """CREATE TABLE threads (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            channel text NOT NULL,
            agent text NOT NULL,
            mode text NOT NULL,
            status text NOT NULL,
            input text NOT NULL,
            output text NOT NULL DEFAULT '',
            session text,
            turn_count integer NOT NULL DEFAULT 0,
            usage text,
            started_at timestamptz NOT NULL,
            ended_at timestamptz,
            message_id text,
            host text,
            fence bigint
        )""",
        "CREATE INDEX threads_channel ON threads (channel, seq)",
        f"CREATE INDEX threads_open ON threads (channel) WHERE status = "
        f"{sql_state(ThreadStatus.WORKING)}",
        "CREATE TABLE sessions (agent text PRIMARY KEY, session_id text, thread_id text)",
        "CREATE TABLE jobs (name text PRIMARY KEY, spec text NOT NULL)",
        """CREATE TABLE outbox (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind text NOT NULL,
            payload text NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            last_error text
        )""",
        """CREATE TABLE processes (
            host text NOT NULL,
            boot_id text NOT NULL,
            pid integer NOT NULL,
            start_time bigint NOT NULL,
            agent text NOT NULL,
            channel text NOT NULL,
            started_at text NOT NULL,
            PRIMARY KEY (host, boot_id, pid, start_time)
        )""",
        """CREATE TABLE hosts (
            host_id text PRIMARY KEY,
            incarnation bigint NOT NULL,
            url text,
            version text,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL
        )""",
        """CREATE TABLE leases (
            name text PRIMARY KEY,
            owner text,
            incarnation bigint,
            token bigint NOT NULL DEFAULT 0,
            home text,
            acquired_at timestamptz
        )""",
        "CREATE INDEX leases_owner ON leases (owner, incarnation)",
        """CREATE TABLE job_slots (
            job text NOT NULL,
            slot text NOT NULL,
            outcome text NOT NULL,
            message_id text,
            at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job, slot)
        )""",
        """CREATE TABLE watchers (
            channel text NOT NULL,
            host text NOT NULL,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (channel, host)
        )""",
        """CREATE TABLE event_spill (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            body text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
        "INSERT INTO leases (name) VALUES "
        "('role:scheduler'), ('role:vault-sync'), ('role:vault-outbox')",
        "INSERT INTO meta (key, value) VALUES ('defs_version', '0')",
    ),
}


class SchemaError(Exception):
    """The store cannot be served by this skydeck as it is: one sentence (exit 2)."""


@dataclass(frozen=True, slots=True)
class Migrated:
    """What `migrate` found and left: equal versions when nothing was to do."""

    before: int
    after: int


def _version(conn: Connection, schema: str) -> tuple[int, int]:
    """(version, min_compatible) of the store; (0, 0) when it has no tables yet."""
    found = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
    if found is None or found[0] is None:
        return 0, 0
    rows: dict[str, str] = dict(
        conn.execute(
            sql.SQL(
                "SELECT key, value FROM {}.meta WHERE key IN ('version', 'min_compatible')"
            ).format(sql.Identifier(schema))
        ).fetchall()
    )
    return int(rows.get("version", 0)), int(rows.get("min_compatible", 0))


def migrate(conn: Connection, schema: str, *, allowed: bool = True) -> Migrated:
    """Bring the store in ``schema`` to `SCHEMA_VERSION`, in one transaction (P4).

    Runs on a session of its own (``conn`` not in autocommit); commits. Raises
    `SchemaError` for a store this version may not touch, or when another
    skydeck held the migration lock past `MIGRATE_WAIT_S`.
    """
    ident = sql.Identifier(schema)
    try:
        conn.execute(f"SET LOCAL lock_timeout = '{MIGRATE_WAIT_S}s'")
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('skydeck:migrate:' || %s))", (schema,))
    except psycopg.errors.LockNotAvailable:
        conn.rollback()
        raise SchemaError("another skydeck is migrating the store") from None
    version, min_compatible = _version(conn, schema)
    if version > SCHEMA_VERSION:
        conn.rollback()
        if min_compatible > SCHEMA_VERSION:
            raise SchemaError(
                f"the store's schema version {version} needs skydeck with schema "
                f"{min_compatible} or later (this is {SCHEMA_VERSION}); upgrade skydeck"
            )
        return Migrated(version, version)
    if version == SCHEMA_VERSION:
        conn.rollback()
        return Migrated(version, version)
    if not allowed:
        conn.rollback()
        raise SchemaError(
            f"the store's schema version is {version}, this skydeck needs {SCHEMA_VERSION}; "
            "run `skydeck migrate` (or start without --no-migrate)"
        )
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
    conn.execute(sql.SQL("SET LOCAL search_path = {}").format(ident))
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            conn.execute(statement.encode())
    for key, value in (("version", SCHEMA_VERSION), ("min_compatible", MIN_COMPATIBLE)):
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )
    conn.commit()
    log.info("store migrated from %d to %d", version, SCHEMA_VERSION)
    return Migrated(version, SCHEMA_VERSION)


def read_version(conn: Connection, schema: str) -> tuple[int, int]:
    """(version, min_compatible): what a running daemon re-reads every 60 s (P4)."""
    result = _version(conn, schema)
    conn.rollback()
    return result
