"""The embedded engine of the `Store` seam: one SQLite file holds it all.

Why the statements run on the Trio thread (inside ``async`` operations that
never checkpoint): each touches a few indexed rows in microseconds, cheaper
than a hop to a worker thread. The seam lets other engines checkpoint, so no
caller relies on this; it only makes this engine cheap.

Fences: this engine is the only holder of every channel (token 0), so a turn's
`Fence` is accepted as it comes and no write is ever refused.

Group commit: a COMMIT costs ~30 us (the WAL write), ten times a statement.
So writes join one open transaction (each in its own SAVEPOINT, so a failed
write never undoes a neighbour's) and `run_flusher` commits once per scheduler
tick, for everything written in that tick. Whoever needs durability before
acting (the HTTP 200 that acknowledges a message, a turn about to run its
backend) awaits `flushed()`: under load, hundreds of writers share one commit.

Durability: a commit in WAL mode with ``synchronous=NORMAL`` survives a killed
process (the OS holds the pages); ``durability="full"`` also fsyncs each
commit, for power-loss safety at a throughput cost.

Failure: the writes of one tick are one transaction, so they are committed
together or lost together. When SQLite cannot commit (disk full, I/O error,
read-only file, a lock held past the busy timeout) or rolls the whole
transaction back after a failed statement, every writer of that group gets
`StoreFailure` from `flushed()` (the HTTP 507), and nobody is told "committed"
for a write that is gone. `failures` counts these events: whatever a caller
keeps in memory from before one (a channel's queue, an agent, a job) may be
ahead of the store, and is read again from the store once `recovered()`
returns. The store is back when a commit succeeds; while it is failing, the
flusher tries a probe commit every `PROBE_INTERVAL_S`, so it recovers by
itself once there is room again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import trio
import trio.lowlevel

from .. import ledger
from ..errors import CursorError, StoreFailure
from ..ledger import OPEN_STATES, MessageState, ThreadStatus, sql_states
from ..model import (
    Accepted,
    AgentSpec,
    Inbound,
    Job,
    Message,
    ProcessRecord,
    ThreadRecord,
    new_id,
    utc_now,
)
from . import Fence, Page

log = logging.getLogger(__name__)

#: 4: a single-threaded conversation's thread record (`sessions.thread_id`, a
#: migration) and `processes` (created IF NOT EXISTS, like every table).
SCHEMA_VERSION = 4

#: While the store is failing, the flusher tries a commit this often (seconds).
PROBE_INTERVAL_S = 1.0
#: The probe writes this much, so it needs room like a real write.
PROBE_BYTES = 64 * 1024
#: SQLite primary result codes that mean the store failed, not the statement:
#: the write is a 507 (the sender may retry) rather than a bug's 500.
STORE_ERRORS = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    channel TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    direction TEXT NOT NULL,
    content TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{{}}',
    external_id TEXT,
    in_reply_to TEXT,
    thread_id TEXT,
    reply_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS messages_channel_seq ON messages (channel, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_external_id
    ON messages (channel, external_id) WHERE external_id IS NOT NULL AND direction = 'in';
CREATE INDEX IF NOT EXISTS messages_open
    ON messages (channel, state, seq) WHERE state IN {sql_states(OPEN_STATES)};
CREATE TABLE IF NOT EXISTS threads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    agent TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL DEFAULT '',
    session TEXT,
    turn_count INTEGER NOT NULL DEFAULT 0,
    usage TEXT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    message_id TEXT
);
CREATE INDEX IF NOT EXISTS threads_channel ON threads (channel, seq);
CREATE TABLE IF NOT EXISTS sessions (
    agent TEXT PRIMARY KEY,
    session_id TEXT,
    thread_id TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS processes (
    boot_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    agent TEXT NOT NULL,
    channel TEXT NOT NULL,
    started_at TEXT NOT NULL,
    PRIMARY KEY (boot_id, pid, start_time)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

#: Upgrades of a store made by an older skydeck: version -> statements reaching it.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 4: a single-threaded agent's conversation is one thread record (sessions.thread_id);
    # its turn count lives on that record. Old per-turn records stay as they are.
    4: (
        "ALTER TABLE sessions ADD COLUMN thread_id TEXT",
        "ALTER TABLE sessions DROP COLUMN turn_count",
    ),
}

_MESSAGE_COLUMNS = (
    "seq, id, channel, direction, content, state, created_at, metadata, external_id, "
    "in_reply_to, thread_id, reply_id, attempts, error"
)


@dataclass(eq=False, slots=True)
class _Group:
    """The writes of one open transaction: committed together, or lost together."""

    done: trio.Event = field(default_factory=trio.Event)
    lost: str | None = None


def _is_store_error(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in STORE_ERRORS


_BUFFERED = sql_states({MessageState.BUFFERED})
_QUEUED = sql_states({MessageState.QUEUED})
_RUNNABLE = sql_states({MessageState.QUEUED, MessageState.WORKING})


def _row_to_message(row: sqlite3.Row) -> Message:
    values = dict(row)  # the columns are named as Message's fields
    values["metadata"] = json.loads(values["metadata"])
    values["state"] = MessageState(values["state"])
    return Message(**values)


def _row_to_thread(row: sqlite3.Row) -> ThreadRecord:
    values = dict(row)
    del values["seq"]
    values["usage"] = json.loads(values["usage"]) if values["usage"] else None
    values["status"] = ThreadStatus(values["status"])
    return ThreadRecord(**values)


def _decode_cursor(cursor: str) -> int:
    if not cursor.isdigit() or len(cursor) > 18:
        raise CursorError(cursor)
    return int(cursor)


class SQLiteStore:
    """One SQLite connection, owned by the daemon's Trio thread.

    ``path=":memory:"`` gives the same store without a file (benchmarks, unit tests).
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        durability: Literal["normal", "full"] = "normal",
        on_dropped: Callable[[int], None] | None = None,
    ):
        self.path = str(path)
        #: Called with the number of buffered messages marked `dropped` (R7), for metrics.
        self.on_dropped = on_dropped
        #: Store failures so far (see the module docstring); never goes down.
        self.failures = 0
        #: Why the store is failing, until a commit succeeds again; None when healthy.
        self.error: str | None = None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB: hot indexes stay in memory
        self._dirty = trio.Event()
        self._group = _Group()
        self._health_changed = trio.Event()
        self._flusher_running = False
        self._migrate()
        self.commit()

    def close(self) -> None:
        """Commit what is left and close. Never raises: this runs on the way out,
        and a write lost here was never acknowledged (its writer got a 507)."""
        try:
            with contextlib.suppress(StoreFailure):  # logged by _lose
                self.commit()
        finally:
            self._db.close()

    # -- plumbing -----------------------------------------------------------------

    @contextmanager
    def _tx(self, *, atomic: bool = True) -> Iterator[sqlite3.Connection]:
        """One write, joined to the open batch (committed by the flusher).

        ``atomic`` wraps it in a SAVEPOINT so a failure undoes all of it and
        nothing else; a write of one statement is atomic by itself and skips it.
        A failure of the store itself leaves as `StoreFailure`; if SQLite rolled
        back the whole transaction for it, the neighbours' writes are lost too,
        and their waiters hear it (`_lose`).
        """
        db = self._db
        group = self._group
        try:
            if not db.in_transaction:
                db.execute("BEGIN IMMEDIATE")
            if not atomic:
                yield db
            else:
                db.execute("SAVEPOINT write")
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:  # else SQLite already rolled back everything
                        try:
                            db.execute("ROLLBACK TO write")
                            db.execute("RELEASE write")
                        except sqlite3.Error:
                            self._abort()  # half a write must never be committed
                    raise
                db.execute("RELEASE write")
        except BaseException as exc:
            lost = not db.in_transaction and group is self._group
            if lost:  # the whole transaction is gone, the neighbours' writes with it
                self._lose(str(exc), group)
            if isinstance(exc, sqlite3.Error) and (lost or _is_store_error(exc)):
                if not lost:
                    self._lose(str(exc), None)  # only this write is undone; the group goes on
                raise StoreFailure(str(exc)) from exc
            raise
        self._dirty.set()

    def _abort(self) -> None:
        """Roll the open transaction back, whatever state a failure left it in."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed", extra={"path": self.path})

    def _lose(self, reason: str, group: _Group | None) -> None:
        """Record a store failure. ``group``, if given, is lost: its waiters wake
        to the failure, and the next write starts a new group."""
        if self.error is None:
            log.error("store failure: writes not committed", extra={"reason": reason})
        self.error = reason
        self.failures += 1
        if group is not None:
            group.lost = reason
            group.done.set()
            if group is self._group:
                self._group = _Group()
        self._notify()
        self._dirty.set()  # the flusher notices and starts probing

    def _notify(self) -> None:
        self._health_changed.set()
        self._health_changed = trio.Event()

    def commit(self) -> None:
        """Make every write so far durable, and wake whoever waits for it.

        A failed COMMIT loses the group: it is rolled back (after SQLITE_BUSY
        SQLite keeps it open, and its writes must not slip into the next
        group), its waiters get the failure, and the caller gets `StoreFailure`.
        """
        group, self._group = self._group, _Group()
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._abort()
                self._lose(str(exc), group)
                raise StoreFailure(str(exc)) from exc
            if self.error is not None:
                log.warning("store recovered", extra={"failures": self.failures})
                self.error = None
                self._notify()
        group.done.set()

    async def flushed(self) -> None:
        """Return once every write made before this call is committed.

        Raises `StoreFailure` if they were lost instead: the caller must not
        act as if they happened (no 200, no backend run, no `done` event).
        """
        if not self._db.in_transaction:
            await trio.lowlevel.checkpoint()
            return
        group = self._group
        if self._flusher_running:
            await group.done.wait()
        else:
            self.commit()
            await trio.lowlevel.checkpoint()
        if group.lost is not None:
            raise StoreFailure(group.lost)

    async def recovered(self, seen: int) -> int:
        """Wait until the store has failed since ``seen`` (a `failures` value)
        and committed again after that; return `failures`, to wait from next."""
        while self.failures == seen or self.error is not None:
            await self._health_changed.wait()
        return self.failures

    def ensure_unchanged(self, seen: int) -> None:
        """Raise `StoreFailure` if the store failed since ``seen``: what the
        caller read from it before may be ahead of what it holds."""
        if self.failures != seen:
            raise StoreFailure(self.error or "writes were lost since this was read")

    async def run_flusher(self) -> None:
        """Commit whatever was written, once per scheduler tick, forever.

        A failed commit is its writers' failure, not the flusher's end. While
        the store is failing, it probes every `PROBE_INTERVAL_S`.
        """
        self._flusher_running = True
        try:
            while True:
                with trio.move_on_after(PROBE_INTERVAL_S if self.error else math.inf):
                    await self._dirty.wait()
                # One more tick: every task that is runnable now adds its writes first.
                await trio.lowlevel.checkpoint()
                try:
                    if self.error is not None and not self._db.in_transaction:
                        self._probe()
                    self.commit()
                except StoreFailure:
                    pass  # its writers have it; the next write or probe tries again
                # Reset only now: a failure during this commit must not wake us at once.
                self._dirty = trio.Event()
        finally:
            self._flusher_running = False
            with contextlib.suppress(StoreFailure):  # logged by _lose; nobody waits any more
                self.commit()

    def _probe(self) -> None:
        """A write that needs room like a real one: `PROBE_BYTES` of fresh pages
        (the row is replaced, never deleted, so its pages are written each time).
        When it commits, writes of that size commit again."""
        with self._tx(atomic=False) as db:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('store_probe', zeroblob(?))",
                (PROBE_BYTES,),
            )

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this skydeck "
                f"({SCHEMA_VERSION}); upgrade skydeck"
            )
        with self._tx() as db:
            if version > 0:
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS.get(target, ()):
                        db.execute(statement)
            # Statement by statement: executescript() would COMMIT behind our back.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- agents -------------------------------------------------------------------

    async def save_agent(self, agent: AgentSpec) -> None:
        """Insert or replace. Uniqueness of name/channel is the caller's 409 to give."""
        with self._tx(atomic=False) as db:
            self._save_agent(db, agent)

    async def create_agent(self, agent: AgentSpec, fence: Fence) -> list[Message]:
        """A new agent's row and the claim of its channel's open messages (R7),
        in one write: a failed claim never leaves the row behind."""
        with self._tx() as db:
            self._save_agent(db, agent)
            return self._claim_open(db, agent.channel)

    @staticmethod
    def _save_agent(db: sqlite3.Connection, agent: AgentSpec) -> None:
        db.execute(
            "INSERT OR REPLACE INTO agents (name, channel, spec) VALUES (?, ?, ?)",
            (agent.name, agent.channel, json.dumps(agent.to_json())),
        )

    async def delete_agent(self, name: str) -> bool:
        with self._tx() as db:
            deleted = db.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount
            db.execute("DELETE FROM sessions WHERE agent = ?", (name,))
        return deleted > 0

    async def list_agents(self) -> list[AgentSpec]:
        rows = self._db.execute("SELECT spec FROM agents ORDER BY name").fetchall()
        return [AgentSpec(**json.loads(row[0])) for row in rows]

    # -- jobs ---------------------------------------------------------------------

    async def save_job(self, job: Job) -> None:
        with self._tx(atomic=False) as db:
            self._save_job(db, job)

    @staticmethod
    def _save_job(db: sqlite3.Connection, job: Job) -> None:
        db.execute(
            "INSERT OR REPLACE INTO jobs (name, spec) VALUES (?, ?)",
            (job.name, json.dumps(job.to_json())),
        )

    async def delete_job(self, name: str) -> bool:
        with self._tx(atomic=False) as db:
            return db.execute("DELETE FROM jobs WHERE name = ?", (name,)).rowcount > 0

    async def list_jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT spec FROM jobs ORDER BY name").fetchall()
        return [Job(**json.loads(row[0])) for row in rows]

    # -- outbox: mirror writes that must not be lost -------------------------------

    async def outbox_add(self, kind: str, payload: dict[str, Any], fence: Fence | None) -> int:
        with self._tx(atomic=False) as db:
            cursor = db.execute(
                "INSERT INTO outbox (kind, payload) VALUES (?, ?)", (kind, json.dumps(payload))
            )
        return cast(int, cursor.lastrowid)

    async def outbox_items(self) -> list[tuple[int, str, dict[str, Any], int]]:
        rows = self._db.execute(
            "SELECT seq, kind, payload, attempts FROM outbox ORDER BY seq"
        ).fetchall()
        return [(row[0], row[1], json.loads(row[2]), row[3]) for row in rows]

    async def outbox_failed(self, seq: int, error: str, fence: Fence) -> None:
        with self._tx(atomic=False) as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error, seq),
            )

    async def outbox_done(self, seq: int, fence: Fence) -> None:
        with self._tx(atomic=False) as db:
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    async def outbox_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # -- processes that may outlive a crash (procs.ProcessRegistry) -------------------

    async def add_process(self, record: ProcessRecord) -> None:
        with self._tx(atomic=False) as db:
            db.execute(
                "INSERT OR REPLACE INTO processes "
                "(boot_id, pid, start_time, agent, channel, started_at) VALUES (?,?,?,?,?,?)",
                (
                    record.boot_id,
                    record.pid,
                    record.start_time,
                    record.agent,
                    record.channel,
                    record.started_at,
                ),
            )

    async def remove_process(self, record: ProcessRecord) -> None:
        with self._tx(atomic=False) as db:
            db.execute(
                "DELETE FROM processes WHERE boot_id = ? AND pid = ? AND start_time = ?",
                (record.boot_id, record.pid, record.start_time),
            )

    async def list_processes(self) -> list[ProcessRecord]:
        rows = self._db.execute(
            "SELECT pid, start_time, boot_id, agent, channel, started_at FROM processes "
            "ORDER BY started_at"
        ).fetchall()
        return [ProcessRecord(**dict(row)) for row in rows]

    async def clear_processes(self) -> None:
        with self._tx(atomic=False) as db:
            db.execute("DELETE FROM processes")

    # -- sessions (R11, R17, R18, R27) --------------------------------------------

    async def get_session(self, agent: str) -> str | None:
        row = self._db.execute(
            "SELECT session_id FROM sessions WHERE agent = ?", (agent,)
        ).fetchone()
        return None if row is None else cast("str | None", row[0])

    async def clear_session(self, agent: str) -> None:
        """R27: forget the session; the conversation's thread record keeps counting."""
        with self._tx() as db:
            db.execute(
                "UPDATE threads SET session = NULL WHERE id = "
                "(SELECT thread_id FROM sessions WHERE agent = ?)",
                (agent,),
            )
            db.execute("UPDATE sessions SET session_id = NULL WHERE agent = ?", (agent,))

    async def conversation(self, agent: str) -> ThreadRecord | None:
        """A single-threaded agent's one thread record (R4), if it has had a turn."""
        row = self._db.execute(
            "SELECT threads.* FROM sessions JOIN threads ON threads.id = sessions.thread_id "
            "WHERE sessions.agent = ?",
            (agent,),
        ).fetchone()
        return None if row is None else _row_to_thread(row)

    # -- inbound ------------------------------------------------------------------

    async def accept_inbound(
        self, inbound: Inbound, *, registered: bool, buffer_cap: int
    ) -> Accepted:
        """Store a new inbound message, or recognise a duplicate (R8).

        ``registered`` decides `queued` versus `buffered` (R7); over ``buffer_cap``
        buffered messages on the channel, the oldest are marked `dropped`.
        """
        # Queued: one INSERT (the duplicate check only reads). Buffered may evict too.
        with self._tx(atomic=not registered) as db:
            return self._accept(db, inbound, registered=registered, buffer_cap=buffer_cap)

    async def accept_batch(
        self, items: Sequence[tuple[Inbound, bool]], *, buffer_cap: int
    ) -> list[Accepted]:
        """`accept_inbound` for each (inbound, registered) pair, all in one write:
        every row lands, or (a store failure) none does."""
        with self._tx() as db:
            return [
                self._accept(db, inbound, registered=registered, buffer_cap=buffer_cap)
                for inbound, registered in items
            ]

    async def fire_slot(
        self,
        inbound: Inbound,
        *,
        registered: bool,
        buffer_cap: int,
        fired: Callable[[Accepted], Job],
        fence: Fence | None = None,
    ) -> tuple[Accepted, Job] | None:
        """A job's slot: its message and the job as ``fired`` makes it from the
        accepted message, in one write (the slot is fired with its message, or
        not at all). One scheduler writes this file, so the slot is never taken
        by another and ``fence`` (a cluster role's) needs no check."""
        with self._tx() as db:
            accepted = self._accept(db, inbound, registered=registered, buffer_cap=buffer_cap)
            job = fired(accepted)
            self._save_job(db, job)
        return accepted, job

    async def skip_slot(self, job: Job, fence: Fence | None = None) -> bool:
        """A skipped slot is the job as the scheduler left it (``last_slot``,
        ``skipped``, ``last_outcome``), saved; see `fire_slot` for ``fence``."""
        await self.save_job(job)
        return True

    def _accept(
        self, db: sqlite3.Connection, inbound: Inbound, *, registered: bool, buffer_cap: int
    ) -> Accepted:
        if inbound.external_id is not None:
            row = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages "
                "WHERE channel = ? AND external_id = ? AND direction = 'in'",
                (inbound.channel, inbound.external_id),
            ).fetchone()
            if row is not None:
                original = _row_to_message(row)
                return Accepted(id=original.id, state="duplicate", message=original)
        state = MessageState.QUEUED if registered else MessageState.BUFFERED
        message = self._insert(
            db,
            channel=inbound.channel,
            direction="in",
            content=inbound.content,
            state=state,
            metadata=inbound.metadata,
            external_id=inbound.external_id,
        )
        if not registered:
            self._evict_over_cap(db, inbound.channel, buffer_cap)
        return Accepted(id=message.id, state=state, message=message)

    def _insert(
        self,
        db: sqlite3.Connection,
        *,
        channel: str,
        direction: Literal["in", "out"],
        content: str,
        state: MessageState,
        metadata: dict[str, Any],
        external_id: str | None = None,
        in_reply_to: str | None = None,
        thread_id: str | None = None,
    ) -> Message:
        message_id = new_id()
        created_at = utc_now()
        cursor = db.execute(
            "INSERT INTO messages (id, channel, direction, content, state, created_at, "
            "metadata, external_id, in_reply_to, thread_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                channel,
                direction,
                content,
                state,
                created_at,
                json.dumps(metadata),
                external_id,
                in_reply_to,
                thread_id,
            ),
        )
        return Message(
            id=message_id,
            seq=cast(int, cursor.lastrowid),
            channel=channel,
            direction=direction,
            content=content,
            state=state,
            created_at=created_at,
            metadata=metadata,
            external_id=external_id,
            in_reply_to=in_reply_to,
            thread_id=thread_id,
        )

    def _evict_over_cap(self, db: sqlite3.Connection, channel: str, cap: int) -> None:
        (count,) = db.execute(
            f"SELECT COUNT(*) FROM messages WHERE channel = ? AND state IN {_BUFFERED}",
            (channel,),
        ).fetchone()
        excess = count - cap
        if excess <= 0:
            return
        ledger.check_message_move(MessageState.BUFFERED, MessageState.DROPPED)
        db.execute(
            "UPDATE messages SET state = ?, error = ? WHERE seq IN ("
            f"SELECT seq FROM messages WHERE channel = ? AND state IN {_BUFFERED} "
            "ORDER BY seq LIMIT ?)",
            (MessageState.DROPPED, f"buffer cap of {cap} messages exceeded", channel, excess),
        )
        log.warning(
            "buffer cap reached: oldest messages dropped",
            extra={"channel": channel, "dropped": excess, "cap": cap},
        )
        if self.on_dropped is not None:
            self.on_dropped(excess)

    async def claim_open(self, channel: str, fence: Fence) -> list[Message]:
        """Every open message of a channel, oldest first; `buffered` ones become `queued`.

        Called when an agent registers (R7 replay) and at start (R28 replay).
        """
        with self._tx() as db:
            return self._claim_open(db, channel)

    @staticmethod
    def _claim_open(db: sqlite3.Connection, channel: str) -> list[Message]:
        ledger.check_message_move(MessageState.BUFFERED, MessageState.QUEUED)
        db.execute(
            f"UPDATE messages SET state = ? WHERE channel = ? AND state IN {_BUFFERED}",
            (MessageState.QUEUED, channel),
        )
        rows = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel = ? "
            f"AND state IN {_RUNNABLE} ORDER BY seq",
            (channel,),
        ).fetchall()
        return [_row_to_message(row) for row in rows]

    async def release_open(self, channel: str, *, buffer_cap: int) -> int:
        """Deregister (R26): the channel's queued messages go back to `buffered`,
        and the cap of R7 holds for them as for new ones (the oldest are `dropped`)."""
        ledger.check_message_move(MessageState.QUEUED, MessageState.BUFFERED)
        with self._tx() as db:
            released = db.execute(
                f"UPDATE messages SET state = ? WHERE channel = ? AND state IN {_QUEUED}",
                (MessageState.BUFFERED, channel),
            ).rowcount
            self._evict_over_cap(db, channel, buffer_cap)
        return released

    # -- the turn (R12, R16, R17, R21, R26, R28) ----------------------------------

    async def start_turn(
        self, messages: Sequence[Message], thread: ThreadRecord, fence: Fence
    ) -> list[Message]:
        """Mark the turn's messages `working` (one more attempt) and write the start record.

        A single-threaded agent's record is its conversation's: the first turn
        links it to the agent, later turns upsert it. Returns the started messages.
        """
        started = ledger.started(messages, thread.id)
        with self._tx() as db:
            if thread.mode == "single-threaded" and thread.turn_count == 0:  # not linked yet
                db.execute(
                    "INSERT INTO sessions (agent, thread_id) VALUES (?, ?) "
                    "ON CONFLICT (agent) DO UPDATE SET thread_id = excluded.thread_id",
                    (thread.agent, thread.id),
                )
            db.executemany(
                "UPDATE messages SET state = ?, attempts = ?, thread_id = ? WHERE id = ?",
                [(m.state, m.attempts, m.thread_id, m.id) for m in started],
            )
            self._write_thread(db, thread)
        return started

    def _write_thread(self, db: sqlite3.Connection, thread: ThreadRecord) -> None:
        db.execute(
            "INSERT INTO threads (id, channel, agent, mode, status, input, output, session, "
            "turn_count, usage, started_at, ended_at, message_id) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
            "channel = excluded.channel, status = excluded.status, input = excluded.input, "
            "output = excluded.output, "
            "session = excluded.session, turn_count = excluded.turn_count, "
            "usage = excluded.usage, ended_at = excluded.ended_at, "
            "message_id = excluded.message_id",
            (
                thread.id,
                thread.channel,
                thread.agent,
                thread.mode,
                thread.status,
                thread.input,
                thread.output,
                thread.session,
                thread.turn_count,
                json.dumps(thread.usage) if thread.usage is not None else None,
                thread.started_at,
                thread.ended_at,
                thread.message_id,
            ),
        )

    async def end_turn(
        self,
        messages: Sequence[Message],
        thread: ThreadRecord,
        fence: Fence,
        *,
        state: MessageState,
        reply: str,
        error: str | None,
        persist_session: bool,
    ) -> tuple[list[Message], Message | None, ThreadRecord]:
        """The end of a turn in one transaction (R16/R17/R19).

        Counts the turn (once, here), ends the thread record, stores the reply
        (if non-empty) as an outbound message answering the first message, moves
        the inbound messages to ``state``, and persists the session the backend
        echoed (single-threaded agents only). Returns the new records.
        """
        ended = replace(thread, turn_count=thread.turn_count + 1, ended_at=utc_now())
        for message in messages:
            ledger.check_message_move(message.state, state)
        with self._tx() as db:
            if ended.mode == "single-threaded" and persist_session and ended.session:
                db.execute(
                    "UPDATE sessions SET session_id = ? WHERE agent = ?",
                    (ended.session, ended.agent),
                )
            self._write_thread(db, ended)
            outbound = None
            if reply:
                outbound = self._insert(
                    db,
                    channel=ended.channel,
                    direction="out",
                    content=reply,
                    state=MessageState.DONE,
                    metadata={},
                    in_reply_to=messages[0].id,
                    thread_id=ended.id,
                )
            reply_id = outbound.id if outbound else None
            settled = [replace(m, state=state, error=error, reply_id=reply_id) for m in messages]
            db.executemany(
                "UPDATE messages SET state = ?, error = ?, reply_id = ? WHERE id = ?",
                [(m.state, m.error, m.reply_id, m.id) for m in settled],
            )
        return settled, outbound, ended

    async def add_outbound(
        self,
        channel: str,
        content: str,
        fence: Fence,
        *,
        metadata: dict[str, Any],
        in_reply_to: str | None = None,
        thread_id: str | None = None,
    ) -> Message:
        """An outbound message outside a turn's end (mcp.md M17, `notify`): `done`
        at once; it answers nothing, so no inbound's ``reply_id`` moves (R19)."""
        with self._tx() as db:
            return self._insert(
                db,
                channel=channel,
                direction="out",
                content=content,
                state=MessageState.DONE,
                metadata=metadata,
                in_reply_to=in_reply_to,
                thread_id=thread_id,
            )

    async def set_remote_id(self, message: Message, remote_id: str, fence: Fence) -> Message:
        """Where a mirror keeps this message (e.g. the vault note id), in its metadata."""
        updated = replace(message, metadata={**message.metadata, "remote_id": remote_id})
        with self._tx(atomic=False) as db:
            db.execute(
                "UPDATE messages SET metadata = ? WHERE id = ?",
                (json.dumps(updated.metadata), updated.id),
            )
        return updated

    async def rewrite_thread(self, thread: ThreadRecord, fence: Fence) -> None:
        """R21: rewrite the same turn's record; the turn count does not move."""
        with self._tx() as db:
            self._write_thread(db, thread)

    async def set_state(
        self,
        messages: Sequence[Message],
        state: MessageState,
        fence: Fence,
        error: str | None = None,
    ) -> list[Message]:
        """Move messages to ``state`` (each move checked by the ledger); the new records."""
        moved = ledger.moved(messages, state, error)
        with self._tx() as db:
            db.executemany(
                "UPDATE messages SET state = ?, error = ? WHERE id = ?",
                [(m.state, m.error, m.id) for m in moved],
            )
        return moved

    async def end_thread(
        self, thread: ThreadRecord, status: ThreadStatus, output: str, fence: Fence
    ) -> ThreadRecord:
        """End a record without counting a turn (a cancelled turn never completed)."""
        ended = ledger.thread_moved(thread, status, output=output, ended_at=utc_now())
        with self._tx() as db:
            self._write_thread(db, ended)
        return ended

    # -- reading ------------------------------------------------------------------

    async def get_message(self, message_id: str) -> Message | None:
        row = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return None if row is None else _row_to_message(row)

    async def list_messages(
        self,
        channel: str,
        *,
        limit: int,
        after: str | None = None,
        before: str | None = None,
        tail: bool = False,
    ) -> Page:
        """Cursor paging over a channel's transcript; every page is oldest first.

        A cursor is a message's ``seq`` as text. ``next`` is set when newer
        messages exist after the page, ``prev`` when older ones exist before it.
        """
        base = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE channel = ?"
        if after is not None:
            rows = self._db.execute(
                f"{base} AND seq > ? ORDER BY seq LIMIT ?",
                (channel, _decode_cursor(after), limit),
            ).fetchall()
        elif before is not None or tail:
            bound = _decode_cursor(before) if before is not None else 2**62
            rows = self._db.execute(
                f"{base} AND seq < ? ORDER BY seq DESC LIMIT ?", (channel, bound, limit)
            ).fetchall()
            rows.reverse()
        else:
            rows = self._db.execute(f"{base} ORDER BY seq LIMIT ?", (channel, limit)).fetchall()
        messages = [_row_to_message(row) for row in rows]
        if not messages:
            return Page(messages=[], next=None, prev=None)
        first, last = messages[0].seq, messages[-1].seq
        newer = self._db.execute(
            "SELECT 1 FROM messages WHERE channel = ? AND seq > ? LIMIT 1", (channel, last)
        ).fetchone()
        older = self._db.execute(
            "SELECT 1 FROM messages WHERE channel = ? AND seq < ? LIMIT 1", (channel, first)
        ).fetchone()
        return Page(
            messages=messages,
            next=str(last) if newer else None,
            prev=str(first) if older else None,
        )

    async def open_counts(self) -> dict[str, tuple[int, int]]:
        """Channel -> (working, queued) messages: R5 as the store sees it (the
        registry asks only on several hosts, P24; here for the one Protocol)."""
        rows = self._db.execute(
            "SELECT channel, SUM(state = ?), SUM(state = ?) FROM messages "
            f"WHERE state IN {_RUNNABLE} GROUP BY channel",
            (MessageState.WORKING.value, MessageState.QUEUED.value),
        ).fetchall()
        return {channel: (int(working), int(queued)) for channel, working, queued in rows}

    async def count_buffered(self) -> int:
        (count,) = self._db.execute(
            f"SELECT COUNT(*) FROM messages WHERE state IN {_BUFFERED}"
        ).fetchone()
        return int(count)

    async def list_threads(
        self, channel: str | None = None, limit: int = 500
    ) -> list[ThreadRecord]:
        """The newest ``limit`` thread records, oldest first."""
        where, args = ("", ()) if channel is None else ("WHERE channel = ?", (channel,))
        rows = self._db.execute(
            f"SELECT * FROM threads {where} ORDER BY seq DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_row_to_thread(row) for row in reversed(rows)]

    async def answered_by(self, reply_id: str) -> list[Message]:
        """The inbound messages a reply answers (all of a `collect` turn's)."""
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE reply_id = ? AND direction = 'in'",
            (reply_id,),
        ).fetchall()
        return [_row_to_message(row) for row in rows]

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        row = self._db.execute("SELECT * FROM threads WHERE id = ?", (thread_id,)).fetchone()
        return None if row is None else _row_to_thread(row)
