"""The PostgreSQL store: the same operations as the SQLite one, for several hosts.

Writes: one writer session does group commit, as the SQLite store does, but
awaited: a write joins the batch of the current scheduler tick, the batch
runs on one thread hop as one transaction, and the write returns once it is
committed (P18). So on PostgreSQL a write's return already means durable,
and `flushed()` has nothing left to wait for. A batch whose statement fails
for a reason of its own (a constraint) is rolled back and its writes re-run
one transaction each, so one bad write fails only itself. A batch whose
COMMIT outcome is unknown (the session broke) fails every write in it with
`StoreUnreachable`: the caller never says "committed" (P6).

Fencing (P11): every write a turn makes is one statement guarded by the CTE
`f`, which finds the channel's lease still held by this incarnation under the
turn's token, on a live host row, and holds it `FOR SHARE` until commit. If
`f` is empty nothing changes and `FencedOut` is raised: a claim by another
host committed first. Transitions are compare-and-set as well (a start from
`queued`/`working`, an end from `working`), so a change made on another host
(a deregistration, P22) beats a stale local queue the same way.

Reads go to a small pool of autocommit sessions; definitions (agents, jobs)
are their own transactions there, never in a batch (P18, P22).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import psycopg
import trio
import trio.lowlevel

from .. import ledger
from ..errors import Conflict, CursorError, FencedOut, Stale, StoreUnreachable
from ..ledger import MessageState, ThreadStatus, sql_state, sql_states
from ..model import (
    RUN_NOW_PREFIX,
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
from ..pg import schema
from ..pg.driver import Connection, Session, Timeouts, conninfo, describe
from ..pg.ownership import PgOwnership, application_name
from . import Fence, Page

log = logging.getLogger(__name__)

T = TypeVar("T")


def _ts(column: str) -> str:
    """A timestamptz as the model's text: ISO 8601 UTC with milliseconds and ``Z``."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


MESSAGE_COLUMNS = (
    "seq, id, channel, direction, content, state, "
    + _ts("created_at")
    + ", metadata, external_id, in_reply_to, thread_id, reply_id, attempts, error"
)
THREAD_COLUMNS = (
    "id, channel, agent, mode, status, input, output, session, turn_count, usage, "
    + _ts("started_at")
    + ", "
    + _ts("ended_at")
    + ", message_id"
)
# States spelled into query text, from the ledger (the one owner of every state).
_QUEUED = sql_state(MessageState.QUEUED)
_WORKING = sql_state(MessageState.WORKING)
_BUFFERED = sql_state(MessageState.BUFFERED)
_DONE = sql_state(MessageState.DONE)
_DROPPED = sql_state(MessageState.DROPPED)
_RUNNABLE = sql_states({MessageState.QUEUED, MessageState.WORKING})

_M_FIELDS = (
    "seq",
    "id",
    "channel",
    "direction",
    "content",
    "state",
    "created_at",
    "metadata",
    "external_id",
    "in_reply_to",
    "thread_id",
    "reply_id",
    "attempts",
    "error",
)
_T_FIELDS = (
    "id",
    "channel",
    "agent",
    "mode",
    "status",
    "input",
    "output",
    "session",
    "turn_count",
    "usage",
    "started_at",
    "ended_at",
    "message_id",
)

# P11: the fence. Held FOR SHARE until commit: a claim either committed before
# (and this finds a new token), or skips the channel until this commits.
_FENCE = """f AS (
    SELECT l.token FROM leases l
    JOIN hosts h ON (h.host_id, h.incarnation) = (l.owner, l.incarnation)
    WHERE l.name = %(fch)s AND l.owner = %(host)s AND l.incarnation = %(inc)s
      AND l.token = %(token)s AND h.expires_at > now()
    FOR SHARE OF l
)"""


def _message(row: Sequence[Any]) -> Message:
    values = dict(zip(_M_FIELDS, row, strict=True))
    values["metadata"] = json.loads(values["metadata"])
    values["state"] = MessageState(values["state"])
    return Message(**values)


def _thread(row: Sequence[Any]) -> ThreadRecord:
    values = dict(zip(_T_FIELDS, row, strict=True))
    values["usage"] = json.loads(values["usage"]) if values["usage"] else None
    values["status"] = ThreadStatus(values["status"])
    return ThreadRecord(**values)


def _cursor(cursor: str) -> int:
    if not cursor.isdigit() or len(cursor) > 18:
        raise CursorError(cursor)
    return int(cursor)


@dataclass(eq=False, slots=True)
class _Pending(Generic[T]):
    """One write waiting for its batch."""

    fn: Callable[[Connection, _Tick], T]
    #: A turn's write: fenced (None from ``fn``) is decided, logged and counted
    #: by the flusher, so it is said even when the writer was cancelled meanwhile.
    fence: Fence | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Tick:
    """What a batch sends besides its writes: one `pg_notify` per distinct signal."""

    notify: set[tuple[str, str]] = field(default_factory=set)


class PostgresStore:
    """The store of one host in a PostgreSQL cluster.

    ``writer`` does group commit; ``readers`` serve reads and definitions;
    ``ownership`` (on the control session) names this host and incarnation for
    the fence. ``on_fenced`` counts fenced writes (`skydeck_fenced_writes_total`).
    """

    kind = "postgres"

    def __init__(
        self,
        writer: Session,
        readers: Sequence[Session],
        ownership: PgOwnership,
        *,
        url: str = "",
        schema_name: str = "skydeck",
        on_dropped: Callable[[int], None] | None = None,
        on_fenced: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.schema_name = schema_name
        self.writer = writer
        self.ownership = ownership
        self.on_dropped = on_dropped
        self.on_fenced = on_fenced
        #: P27: seconds each batch took (`skydeck_store_batch_seconds`), and each
        #: message's wait from its commit to its first turn start (database clock).
        self.on_batch: Callable[[float], None] | None = None
        self.on_wait: Callable[[float], None] | None = None
        #: Store failures so far: a batch lost or unconfirmed (never goes down).
        self.failures = 0
        #: Why the store is failing, until a batch commits again; None when healthy.
        self.error: str | None = None
        #: P6: when a heartbeat or a store call first failed (ISO), until the next
        #: good heartbeat (`reached`); None while the store answers. `/health` is
        #: 503 `unavailable` meanwhile, even after a batch got through: only the
        #: heartbeat says this host still holds its leases.
        self.unreachable_since: str | None = None
        self._readers = list(readers)
        self._free = trio.Semaphore(len(self._readers))
        self._pending: list[_Pending[Any]] = []
        self._dirty = trio.Event()
        self._health_changed = trio.Event()
        self._flusher_running = False

    @property
    def host(self) -> str:
        return self.ownership.host_id

    async def open(self, *, wait_s: float = 0.0, migrate: bool = True) -> schema.Migrated:
        """P4, P5, P3: migrate (or check the version), join, connect the sessions.

        An unreachable store is retried for ``wait_s`` seconds (backoff 0.2 s
        doubling to 2 s) before `StoreUnreachable` is raised; a schema this
        version may not serve is `schema.SchemaError`; a live host id `HostInUse`.
        """
        deadline = trio.current_time() + wait_s
        delay = 0.2
        while True:
            try:
                migrated = await trio.to_thread.run_sync(self._migrate, migrate)
                break
            except StoreUnreachable:
                if trio.current_time() + delay > deadline:
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)
        incarnation = await self.ownership.join()
        await self.rename_sessions(application_name(self.host, incarnation))
        # P7: every session now, not at its first use: start-up fails early, and the
        # host holds the 7 sessions `max_connections` is sized for from the start.
        for session in (self.writer, *self._readers):
            await session.connect()
        return migrated

    def _migrate(self, allowed: bool) -> schema.Migrated:
        try:
            with psycopg.connect(self.url, connect_timeout=5) as conn:
                return schema.migrate(conn, self.schema_name, allowed=allowed)
        except psycopg.OperationalError as exc:
            raise StoreUnreachable(describe(exc)) from exc

    # -- plumbing ---------------------------------------------------------------------

    async def _write(self, fn: Callable[[Connection, _Tick], T], fence: Fence | None = None) -> T:
        """Join this tick's batch; return once it committed (or raise its failure)."""
        pending: _Pending[T] = _Pending(fn, fence)
        self._pending.append(pending)
        self._dirty.set()
        if not self._flusher_running:
            await self._flush()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[no-any-return]

    async def _read(self, fn: Callable[[Connection], T], *, repeatable: bool = True) -> T:
        """``fn`` on a reader session. ``repeatable`` (a read): a session idle since
        before a server restart fails its first call, so a read gets one more try
        on a fresh connection (else the first reads after an outage would fail,
        one per reader). A write's outcome is unknown then: never repeated."""
        async with self._free:
            session = self._readers.pop()
            try:
                stale = repeatable and session.connected
                try:
                    return await session.run(fn)
                except StoreUnreachable:
                    if not stale:
                        raise
                session.retries["connection"] = session.retries.get("connection", 0) + 1
                return await session.run(fn)
            except StoreUnreachable as exc:
                self._unreachable(exc.reason)  # a read loses nothing: no `failures`
                raise
            finally:
                self._readers.append(session)

    async def _solo(self, fn: Callable[[Connection], T]) -> T:
        """A transaction of its own on a reader session (definitions, P18/P22)."""

        def run(conn: Connection) -> T:
            with conn.transaction():
                return fn(conn)

        return await self._read(run, repeatable=False)

    async def run_flusher(self) -> None:
        """Commit every tick's writes as one batch, forever (P18)."""
        self._flusher_running = True
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                await trio.lowlevel.checkpoint()  # one more tick: the runnable writers join
                await self._flush()
        finally:
            self._flusher_running = False
            with trio.CancelScope(shield=True):
                await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not self.ownership.alive():  # P10: re-checked as the batch is sent
            for item in batch:
                if item.fence is not None:
                    item.error = self._fenced(item.fence)
                    item.done.set()
            batch = [item for item in batch if item.fence is None]
        if not batch:
            return

        def run(conn: Connection) -> list[tuple[Any, BaseException | None]]:
            tick = _Tick()
            results: list[tuple[Any, BaseException | None]] = [
                (item.fn(conn, tick), None) for item in batch
            ]
            _send_notifications(conn, tick)
            return results

        began = time.monotonic()
        try:
            outcomes = await self.writer.run(run)
            if self.on_batch is not None:
                self.on_batch(time.monotonic() - began)
        except StoreUnreachable as exc:
            self._failed(exc.reason)
            for item in batch:
                item.error = exc
                item.done.set()
            return
        except Exception:
            # One write's own error (a constraint, a bug) rolled the batch back:
            # each runs again alone, so only it fails.
            outcomes = [await self._alone(item) for item in batch]
        self._healthy()
        for item, (result, error) in zip(batch, outcomes, strict=True):
            if error is None and result is None and item.fence is not None:
                error = self._fenced(item.fence)
            item.result, item.error = result, error
            item.done.set()

    async def _alone(self, item: _Pending[Any]) -> tuple[Any, BaseException | None]:
        def run(conn: Connection) -> Any:
            tick = _Tick()
            result = item.fn(conn, tick)
            _send_notifications(conn, tick)
            return result

        try:
            return await self.writer.run(run), None
        except StoreUnreachable as exc:
            self._failed(exc.reason)
            return None, exc
        except Exception as exc:
            return None, exc

    def _failed(self, reason: str) -> None:
        if self.error is None:
            log.error("store failure: writes not confirmed", extra={"reason": reason})
        self._unreachable(reason)
        self.error = reason
        self.failures += 1
        self._notify()

    def _unreachable(self, reason: str) -> None:
        if self.unreachable_since is None:
            log.warning("store unreachable", extra={"reason": reason})
            self.unreachable_since = utc_now()

    def _healthy(self) -> None:
        if self.error is not None:
            log.warning("store recovered", extra={"failures": self.failures})
            self.error = None
            self._notify()

    def reached(self) -> None:
        """A good heartbeat (or a rejoin): the store answers and the leases hold (P6)."""
        self._healthy()
        self.unreachable_since = None

    def _notify(self) -> None:
        self._health_changed.set()
        self._health_changed = trio.Event()

    async def flushed(self) -> None:
        """Every write returned after its commit already: nothing is left to wait for."""
        await trio.lowlevel.checkpoint()

    async def recovered(self, seen: int) -> int:
        """Wait until the store failed since ``seen`` and committed again; `failures`."""
        while self.failures == seen or self.error is not None:
            await self._health_changed.wait()
        return self.failures

    def ensure_unchanged(self, seen: int) -> None:
        if self.failures != seen:
            raise StoreUnreachable(self.error or "writes were lost since this was read")

    def close(self) -> None:
        """Close every session (on the way out: nothing is waiting on them)."""
        for session in (self.writer, *self._readers, self.ownership.session):
            session.close_now()

    def sessions(self) -> tuple[Session, ...]:
        """Every session this host holds but the listener's (P7)."""
        return (self.writer, *self._readers, self.ownership.session)

    async def rename_sessions(self, application_name: str) -> None:
        """P3: after a rejoin, every session carries the new incarnation's name."""
        for session in (self.writer, *self._readers, self.ownership.session):
            await session.rename(application_name)

    async def cluster_size(self) -> tuple[int, int]:
        """(channels with agents, live hosts), for the share rule (P13)."""

        def read(conn: Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM channels WHERE agent IS NOT NULL), "
                "(SELECT count(*) FROM hosts WHERE expires_at > now())"
            ).fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        return await self._read(read)

    async def min_compatible(self) -> int:
        """The oldest schema version allowed to serve this store (P4's re-read)."""

        def read(conn: Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE key = 'min_compatible'").fetchone()
            return int(row[0]) if row else 0

        return await self._read(read)

    async def channel_owners(self) -> dict[str, str | None]:
        """Channel with an agent -> the live host holding its lease, or None (P26)."""

        def read(conn: Connection) -> dict[str, str | None]:
            rows = conn.execute(
                "SELECT c.name, h.host_id FROM channels c "
                "LEFT JOIN leases l ON l.name = c.name "
                "LEFT JOIN hosts h ON (h.host_id, h.incarnation) = (l.owner, l.incarnation) "
                "AND h.expires_at > now() WHERE c.agent IS NOT NULL"
            ).fetchall()
            return {str(name): owner for name, owner in rows}

        return await self._read(read)

    async def notify(self, channel: str, payload: str) -> None:
        """``pg_notify(channel, payload)`` in the commit of this tick's batch (§0:
        one notifying commit per tick; identical ones are sent once)."""

        def write(conn: Connection, tick: _Tick) -> None:
            tick.notify.add((channel, payload))

        await self._write(write)

    def _fence_params(self, fence: Fence) -> dict[str, Any]:
        return {
            "fch": fence.channel,
            "token": fence.token,
            "host": fence.host,
            "inc": fence.incarnation,
        }

    def fence(self, channel: str, token: int) -> Fence:
        """The fence of a lease this incarnation just claimed."""
        assert self.ownership.incarnation is not None
        return Fence(channel, token, self.host, self.ownership.incarnation)

    def _check_deadline(self, fence: Fence) -> None:
        """P10: a host past its own deadline sends no fenced write at all (a
        resumed process fences itself before the database has to)."""
        if not self.ownership.alive():
            raise self._fenced(fence)

    def _fenced(self, fence: Fence) -> FencedOut:
        """Say it (P11: log and count), and give the error to raise."""
        log.warning("write fenced", extra={"channel": fence.channel, "token": fence.token})
        if self.on_fenced is not None:
            self.on_fenced()
        return FencedOut(fence.channel, fence.token)

    async def _fenced_write(self, fence: Fence, fn: Callable[[Connection, _Tick], T | None]) -> T:
        """A turn's write: ``fn`` returns None when its statement found no fence
        (the flusher then raises `FencedOut` here)."""
        self._check_deadline(fence)
        return await self._write(fn, fence)  # type: ignore[arg-type]

    async def _fenced_statement(self, statement: str, fence: Fence, **values: object) -> None:
        """One write guarded by ``fence`` (P11): ``statement`` reads the fence's
        CTE ``f`` (``... AND EXISTS (SELECT 1 FROM f)``) and changes nothing once
        the lease has another token; `FencedOut` then."""
        params = {**self._fence_params(fence), **values}

        def write(conn: Connection, tick: _Tick) -> bool | None:
            row = conn.execute(
                f"WITH {_FENCE}, w AS ({statement}) SELECT (SELECT count(*) FROM f)".encode(),
                params,
            ).fetchone()
            return True if row and row[0] else None

        await self._fenced_write(fence, write)

    # -- meta -------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        def read(conn: Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._read(read)

    async def set_meta(self, key: str, value: str) -> None:
        def write(conn: Connection, tick: _Tick) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self._write(write)

    async def init_once(self, key: str) -> bool:
        """True for exactly one caller per store and key (the demo agent, P4)."""

        def claim(conn: Connection) -> bool:
            row = conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, '1') ON CONFLICT DO NOTHING "
                "RETURNING key",
                (key,),
            ).fetchone()
            return row is not None

        return await self._solo(claim)

    async def defs_version(self) -> int:
        value = await self.get_meta("defs_version")
        return int(value or 0)

    # -- agents (P22) -----------------------------------------------------------------

    async def create_agent(self, agent: AgentSpec, fence: Fence) -> list[Message]:
        """Register a new agent for the cluster. The channel's owner (whoever
        claims it, P12) replays its open messages, so none come back here."""
        await self._save_agent(agent, create=True)
        return []

    async def save_agent(self, agent: AgentSpec) -> None:
        await self._save_agent(agent, create=False)

    async def _save_agent(self, agent: AgentSpec, *, create: bool) -> None:
        """Create (``create``; Conflict naming the field when name or channel is
        taken) or update an agent, in its own transaction: the channel row is
        written (waiting for accepts in flight, P18), a new channel's buffered
        messages become queued (R7), and the others are told (NOTIFY)."""
        spec = json.dumps(agent.to_json())

        def save(conn: Connection) -> None:
            old = conn.execute(
                "SELECT channel FROM agents WHERE name = %s FOR UPDATE", (agent.name,)
            ).fetchone()
            if create and old is not None:
                raise Conflict(f"an agent named {agent.name!r} already exists", field="name")
            if not create and old is None:
                raise Conflict(f"no agent named {agent.name!r}", field="name")
            holder = conn.execute(
                "SELECT name FROM agents WHERE channel = %s AND name <> %s",
                (agent.channel, agent.name),
            ).fetchone()
            if holder is not None:
                raise Conflict(
                    f"channel {agent.channel!r} is already served by agent {holder[0]!r}",
                    field="channel",
                )
            try:
                with conn.transaction():
                    if create:
                        conn.execute(
                            "INSERT INTO agents (name, channel, spec) VALUES (%s, %s, %s)",
                            (agent.name, agent.channel, spec),
                        )
                    else:
                        conn.execute(
                            "UPDATE agents SET channel = %s, spec = %s WHERE name = %s",
                            (agent.channel, spec, agent.name),
                        )
            except psycopg.errors.UniqueViolation as exc:  # a concurrent create won (R2)
                if "channel" in str(exc):
                    raise Conflict(
                        f"channel {agent.channel!r} is already served by another agent",
                        field="channel",
                    ) from None
                raise Conflict(
                    f"an agent named {agent.name!r} already exists", field="name"
                ) from None
            moved_from = old[0] if old is not None and old[0] != agent.channel else None
            if old is None or moved_from is not None:
                conn.execute(
                    "INSERT INTO channels (name, agent) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET agent = excluded.agent",
                    (agent.channel, agent.name),
                )
                conn.execute(
                    f"UPDATE messages SET state = {_QUEUED} "
                    f"WHERE channel = %s AND state = {_BUFFERED}",
                    (agent.channel,),
                )
                if moved_from is None:
                    conn.execute(
                        "INSERT INTO leases (name) VALUES (%s) ON CONFLICT DO NOTHING",
                        (agent.channel,),
                    )
                else:  # R3/P22: the moved agent keeps its host, under a fresh token
                    conn.execute(
                        "INSERT INTO leases (name, owner, incarnation, token, home, acquired_at) "
                        "SELECT %s, owner, incarnation, nextval('fence_seq'), home, now() "
                        "FROM leases WHERE name = %s "
                        "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                        "incarnation = excluded.incarnation, token = excluded.token, "
                        "home = excluded.home, acquired_at = excluded.acquired_at",
                        (agent.channel, moved_from),
                    )
                    _unregister_channel(conn, moved_from)
                conn.execute("SELECT pg_notify('skydeck_wake', %s)", (agent.channel,))
            _bump_defs(conn, f"agent:{agent.name}")

        await self._solo(save)

    async def delete_agent(self, name: str) -> bool:
        """R26 across the cluster: the row goes, the channel's queued messages go
        back to `buffered` (compare-and-set beats the owner's stale queue), and the
        owner, told by NOTIFY, cancels the running turn (its `release_open`
        applies R7's cap)."""

        def delete(conn: Connection) -> bool:
            row = conn.execute(
                "DELETE FROM agents WHERE name = %s RETURNING channel", (name,)
            ).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM sessions WHERE agent = %s", (name,))
            _unregister_channel(conn, row[0])
            _bump_defs(conn, f"agent:{name}")
            return True

        return await self._solo(delete)

    async def list_agents(self) -> list[AgentSpec]:
        def read(conn: Connection) -> list[AgentSpec]:
            rows = conn.execute("SELECT spec FROM agents ORDER BY name").fetchall()
            return [AgentSpec(**json.loads(row[0])) for row in rows]

        return await self._read(read)

    async def get_agent(self, name: str) -> AgentSpec | None:
        def read(conn: Connection) -> AgentSpec | None:
            row = conn.execute("SELECT spec FROM agents WHERE name = %s", (name,)).fetchone()
            return None if row is None else AgentSpec(**json.loads(row[0]))

        return await self._read(read)

    # -- jobs (P22, P23) --------------------------------------------------------------

    async def save_job(self, job: Job) -> None:
        spec = json.dumps(job.to_json())

        def save(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO jobs (name, spec) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                (job.name, spec),
            )
            _bump_defs(conn, f"job:{job.name}")

        await self._solo(save)

    async def delete_job(self, name: str) -> bool:
        def delete(conn: Connection) -> bool:
            gone = conn.execute("DELETE FROM jobs WHERE name = %s", (name,)).rowcount > 0
            if gone:
                _bump_defs(conn, f"job:{name}")
            return gone

        return await self._solo(delete)

    async def list_jobs(self) -> list[Job]:
        def read(conn: Connection) -> list[Job]:
            rows = conn.execute("SELECT spec FROM jobs ORDER BY name").fetchall()
            return [Job(**json.loads(row[0])) for row in rows]

        return await self._read(read)

    async def fire_slot(
        self,
        inbound: Inbound,
        *,
        registered: bool,
        buffer_cap: int,
        fired: Callable[[Accepted], Job],
        fence: Fence | None = None,
    ) -> tuple[Accepted, Job] | None:
        """P23: fire a cron slot, or None when another scheduler took it.

        The slot is the inbound's external id, ``job:<name>:<slot>`` (R8). One
        fenced statement inserts its `job_slots` row under ``fence`` (the
        ``role:scheduler`` lease; None: no role, a run-now); that row's primary
        key decides between rivals (a paused holder, a takeover). Only the
        winner, in the same transaction, stores the message and the job's
        fired fields as ``fired`` makes them. A stale token is `FencedOut`.
        """
        name, slot = _slot_of(inbound)

        def fire(conn: Connection, tick: _Tick) -> tuple[Accepted, Job] | bool | None:
            won = _take_slot(conn, self, name, slot, "fired", fence)
            if won is not True:
                return won
            accepted = self._accept(conn, tick, inbound, buffer_cap)
            job = fired(accepted)
            conn.execute(
                "UPDATE job_slots SET outcome = %s, message_id = %s WHERE job = %s AND slot = %s",
                (job.last_outcome or "fired", accepted.id, name, slot),
            )
            _store_fired(conn, job, slot)
            return accepted, job

        result = await self._slot_write(fire, fence)
        return None if result is False else result  # type: ignore[return-value]

    async def skip_slot(self, job: Job, fence: Fence | None = None) -> bool:
        """P23: record ``job``'s slot (``last_slot``) as skipped, with the job's
        fields, in one transaction; False when another scheduler took the slot.
        The same fenced `job_slots` insert as `fire_slot` decides."""
        slot = job.last_slot or ""

        def skip(conn: Connection, tick: _Tick) -> bool | None:
            won = _take_slot(conn, self, job.name, slot, job.last_outcome or "skipped", fence)
            if won is True:
                _store_fired(conn, job, slot)
            return won

        return bool(await self._slot_write(skip, fence))

    async def _slot_write(
        self, fn: Callable[[Connection, _Tick], T | None], fence: Fence | None
    ) -> T:
        if fence is None:
            return await self._write(fn)  # type: ignore[arg-type]
        return await self._fenced_write(fence, fn)

    # -- inbound (P18, P19, P21) ------------------------------------------------------

    async def accept_inbound(
        self, inbound: Inbound, *, registered: bool, buffer_cap: int
    ) -> Accepted:
        """Store a new inbound message in this tick's batch, or recognise a duplicate.

        `queued` or `buffered` is decided here, from the channel row read `FOR
        SHARE` (P18), not from ``registered`` (what this host knows): a
        registration on any host waits for this batch, or this sees it.
        ``Accepted.owner`` is the channel's live owner (None: nobody yet).
        """

        def accept(conn: Connection, tick: _Tick) -> Accepted:
            return self._accept(conn, tick, inbound, buffer_cap)

        return await self._write(accept)

    async def accept_batch(
        self, items: Sequence[tuple[Inbound, bool]], *, buffer_cap: int
    ) -> list[Accepted]:
        """Many inbound messages in one transaction: all land, or none does."""

        def accept(conn: Connection, tick: _Tick) -> list[Accepted]:
            return [self._accept(conn, tick, inbound, buffer_cap) for inbound, _ in items]

        return await self._write(accept)

    async def release_open(self, channel: str, *, buffer_cap: int) -> int:
        """Deregister (R26): the channel's queued messages go back to `buffered`,
        under R7's cap."""

        def release(conn: Connection, tick: _Tick) -> int:
            released = conn.execute(
                f"UPDATE messages SET state = {_BUFFERED} WHERE channel = %s AND state = {_QUEUED}",
                (channel,),
            ).rowcount
            dropped = _evict_over_cap(conn, channel, buffer_cap)
            if dropped and self.on_dropped is not None:
                self.on_dropped(dropped)
            return released

        return await self._write(release)

    def _accept(self, conn: Connection, tick: _Tick, inbound: Inbound, buffer_cap: int) -> Accepted:
        channel = inbound.channel
        row = _lock_channel(conn, channel)
        if row is None:
            conn.execute(
                "INSERT INTO channels (name) VALUES (%s) ON CONFLICT DO NOTHING", (channel,)
            )
            row = _lock_channel(conn, channel)
            assert row is not None
        agent, owner = row
        state = MessageState.QUEUED if agent is not None else MessageState.BUFFERED
        inserted = conn.execute(
            "INSERT INTO messages (id, channel, direction, content, state, metadata, external_id) "
            "VALUES (%s, %s, 'in', %s, %s, %s, %s) "
            "ON CONFLICT (channel, external_id) WHERE external_id IS NOT NULL AND direction = 'in' "
            f"DO NOTHING RETURNING {MESSAGE_COLUMNS}".encode(),
            (
                new_id(),
                channel,
                inbound.content,
                state.value,
                json.dumps(inbound.metadata),
                inbound.external_id,
            ),
        ).fetchone()
        if inserted is None:
            # P21: the row that won was committed by another host after this
            # statement's snapshot; only a second statement can see it.
            original = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages "
                "WHERE channel = %s AND external_id = %s AND direction = 'in'".encode(),
                (channel, inbound.external_id),
            ).fetchone()
            assert original is not None
            message = _message(original)
            return Accepted(id=message.id, state="duplicate", message=message, owner=owner)
        message = _message(inserted)
        if state is MessageState.BUFFERED:
            dropped = _evict_over_cap(conn, channel, buffer_cap)
            if dropped and self.on_dropped is not None:
                self.on_dropped(dropped)
        elif owner != self.host:
            tick.notify.add(("skydeck_wake", channel))  # P19: the owner reads it by state
        return Accepted(id=message.id, state=state, message=message, owner=owner)

    async def claim_open(self, channel: str, fence: Fence) -> list[Message]:
        """The channel's runnable messages, oldest first, for the owner holding
        ``fence`` (R28/P15: read by state, never by a seq high-water mark). A
        read (a reader session, no batch): buffered messages became queued when
        the agent registered, in that transaction (P18)."""
        self._check_deadline(fence)
        params = self._fence_params(fence)

        def read(conn: Connection) -> list[Message] | None:
            rows = conn.execute(
                f"WITH {_FENCE} SELECT (SELECT count(*) FROM f), {MESSAGE_COLUMNS} "
                "FROM (SELECT 1) one LEFT JOIN messages ON channel = %(fch)s "
                f"AND state IN {_RUNNABLE} ORDER BY seq".encode(),
                params,
            ).fetchall()
            if not rows or not rows[0][0]:
                return None
            return [_message(row[1:]) for row in rows if row[1] is not None]

        messages = await self._read(read)
        if messages is None:
            raise self._fenced(fence)
        return messages

    async def open_counts(self) -> dict[str, tuple[int, int]]:
        """R5 for channels owned elsewhere (P24): channel -> (working, queued)."""

        def read(conn: Connection) -> dict[str, tuple[int, int]]:
            rows = conn.execute(
                f"SELECT channel, count(*) FILTER (WHERE state = {_WORKING}), "
                f"count(*) FILTER (WHERE state = {_QUEUED}) FROM messages "
                f"WHERE state IN {_RUNNABLE} GROUP BY channel"
            ).fetchall()
            return {ch: (int(w), int(q)) for ch, w, q in rows}

        return await self._read(read)

    async def queued_channels(self, channels: Sequence[str]) -> list[str]:
        """Which of ``channels`` have `queued` messages (the scan's catch-up, P12)."""

        def read(conn: Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT channel FROM messages "
                f"WHERE channel = ANY(%s) AND state = {_QUEUED}",
                (list(channels),),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._read(read)

    async def count_buffered(self) -> int:
        def read(conn: Connection) -> int:
            row = conn.execute(
                f"SELECT count(*) FROM messages WHERE state = {_BUFFERED}"
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._read(read)

    # -- the turn (P11: every write fenced) -------------------------------------------

    async def start_turn(
        self, messages: Sequence[Message], thread: ThreadRecord, fence: Fence
    ) -> list[Message]:
        """The start record and the messages `working` (one more attempt), in one
        fenced statement; the stored ``started_at`` is the database's clock, set
        when the record is first written (a single-threaded conversation's
        record keeps it across turns, R17, as the SQLite store does)."""
        started = ledger.started(messages, thread.id)
        params = {
            **self._fence_params(fence),
            "ids": [m.id for m in messages],
            "thread": thread.id,
            "link": thread.mode == "single-threaded" and thread.turn_count == 0,
            "none": not messages,
            **_thread_params(thread),
        }
        # `ok`: the fence holds and every message is still startable (compare-and-set);
        # everything below is gated on it, so the statement is all or nothing.
        statement = f"""
        WITH {_FENCE},
        ok AS (
            SELECT 1 FROM f WHERE (SELECT count(*) FROM messages
                WHERE id = ANY(%(ids)s) AND state IN {_RUNNABLE})
                = cardinality(%(ids)s::text[])
        ),
        m AS (
            UPDATE messages SET state = {_WORKING}, attempts = attempts + 1,
                thread_id = %(thread)s, host = %(host)s, fence = %(token)s
            WHERE id = ANY(%(ids)s) AND EXISTS (SELECT 1 FROM ok)
            RETURNING id
        ),
        s AS (
            INSERT INTO sessions (agent, thread_id)
            SELECT %(agent)s, %(thread)s WHERE %(link)s AND EXISTS (SELECT 1 FROM ok)
            ON CONFLICT (agent) DO UPDATE SET thread_id = excluded.thread_id
            RETURNING 1
        ),
        t AS (
            INSERT INTO threads (id, channel, agent, mode, status, input, output, session,
                turn_count, usage, started_at, ended_at, message_id, host, fence)
            SELECT %(thread)s, %(channel)s, %(agent)s, %(mode)s, %(status)s, %(input)s,
                %(output)s, %(session)s, %(turn_count)s, %(usage)s, clock_timestamp(), NULL,
                %(message_id)s, %(host)s, %(token)s
            WHERE EXISTS (SELECT 1 FROM ok)
            ON CONFLICT (id) DO UPDATE SET channel = excluded.channel,
                status = excluded.status, input = excluded.input, output = excluded.output,
                session = excluded.session, turn_count = excluded.turn_count,
                usage = excluded.usage, ended_at = NULL,
                message_id = excluded.message_id, host = excluded.host, fence = excluded.fence
            RETURNING {_ts("started_at")}
        )
        SELECT (SELECT * FROM t), (SELECT count(*) FROM m) + (SELECT count(*) FROM s),
            (SELECT count(*) FROM f),
            (SELECT array_agg(extract(epoch FROM clock_timestamp() - created_at)::float8)
             FROM messages WHERE id = ANY(%(ids)s) AND attempts = 0)
        """
        waits: list[float] = []

        def start(conn: Connection, tick: _Tick) -> str | _Moved | None:
            row = conn.execute(statement.encode(), params).fetchone()
            assert row is not None
            if row[0] is None:
                return _MOVED if row[2] else None
            waits[:] = row[3] or []
            return str(row[0])

        started_at: str | _Moved = await self._fenced_write(fence, start)
        _check_moved(started_at, fence)
        if self.on_wait is not None:
            for wait in waits:  # P27: commit -> first start, both on the database clock
                self.on_wait(wait)
        return started

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
        """The end of a turn (R16/R17/R19) in one fenced statement: the record
        counted and ended, the reply stored, the messages moved from `working`
        to ``state``, the echoed session kept."""
        for message in messages:
            ledger.check_message_move(message.state, state)
        ended = replace(thread, turn_count=thread.turn_count + 1)
        reply_id = new_id() if reply else None
        params = {
            **self._fence_params(fence),
            **_thread_params(ended),
            "ids": [m.id for m in messages],
            "state": state.value,
            "error": error,
            "reply": reply,
            "reply_id": reply_id,
            "first": messages[0].id if messages else None,
            "persist": bool(ended.mode == "single-threaded" and persist_session and ended.session),
        }
        statement = f"""
        WITH {_FENCE},
        ok AS (
            SELECT 1 FROM f WHERE (SELECT count(*) FROM messages
                WHERE id = ANY(%(ids)s) AND state = {_WORKING}) = cardinality(%(ids)s::text[])
        ),
        t AS (
            UPDATE threads SET status = %(status)s, input = %(input)s, output = %(output)s,
                session = %(session)s, turn_count = %(turn_count)s, usage = %(usage)s,
                ended_at = clock_timestamp(), message_id = %(message_id)s
            WHERE id = %(id)s AND EXISTS (SELECT 1 FROM ok)
            RETURNING {_ts("ended_at")}
        ),
        s AS (
            UPDATE sessions SET session_id = %(session)s
            WHERE agent = %(agent)s AND %(persist)s AND EXISTS (SELECT 1 FROM ok)
            RETURNING 1
        ),
        r AS (
            INSERT INTO messages (id, channel, direction, content, state, metadata,
                in_reply_to, thread_id, host, fence)
            SELECT %(reply_id)s, %(channel)s, 'out', %(reply)s, {_DONE}, '{{}}', %(first)s,
                %(id)s, %(host)s, %(token)s
            WHERE %(reply_id)s::text IS NOT NULL AND EXISTS (SELECT 1 FROM ok)
            RETURNING {MESSAGE_COLUMNS}
        ),
        m AS (
            UPDATE messages SET state = %(state)s, error = %(error)s, reply_id = %(reply_id)s
            WHERE id = ANY(%(ids)s) AND EXISTS (SELECT 1 FROM ok)
            RETURNING id
        )
        SELECT (SELECT * FROM t), (SELECT count(*) FROM f),
            r.* FROM (SELECT 1) one LEFT JOIN r ON true
        """

        def end(conn: Connection, tick: _Tick) -> tuple[str, Message | None] | _Moved | None:
            row = conn.execute(statement.encode(), params).fetchone()
            assert row is not None
            if row[0] is None:
                return _MOVED if row[1] else None
            outbound = _message(row[2:]) if row[2] is not None else None
            return str(row[0]), outbound

        written: tuple[str, Message | None] | _Moved = await self._fenced_write(fence, end)
        ended_at, outbound = _check_moved(written, fence)
        settled = [replace(m, state=state, error=error, reply_id=reply_id) for m in messages]
        return settled, outbound, replace(ended, ended_at=ended_at)

    async def set_state(
        self,
        messages: Sequence[Message],
        state: MessageState,
        fence: Fence,
        error: str | None = None,
    ) -> list[Message]:
        """Move messages to ``state`` (each move checked), fenced and compare-and-set."""
        moved = ledger.moved(messages, state, error)
        params = {
            **self._fence_params(fence),
            "ids": [m.id for m in messages],
            "from": [m.state.value for m in messages],
            "state": state.value,
            "error": error,
        }

        def write(conn: Connection, tick: _Tick) -> int | None:
            row = conn.execute(
                f"WITH {_FENCE}, m AS (UPDATE messages SET state = %(state)s, error = %(error)s "
                "FROM unnest(%(ids)s::text[], %(from)s::text[]) AS w(id, state) "
                "WHERE messages.id = w.id AND messages.state = w.state "
                "AND EXISTS (SELECT 1 FROM f) RETURNING 1) "
                "SELECT (SELECT count(*) FROM f), (SELECT count(*) FROM m)".encode(),
                params,
            ).fetchone()
            assert row is not None
            return None if not row[0] else int(row[1])

        await self._fenced_write(fence, write)
        return moved

    async def rewrite_thread(self, thread: ThreadRecord, fence: Fence) -> None:
        """R21: rewrite the same turn's record; the turn count does not move."""
        await self._fenced_statement(
            "UPDATE threads SET status = %(status)s, "
            "input = %(input)s, output = %(output)s, session = %(session)s, "
            "turn_count = %(turn_count)s, usage = %(usage)s, message_id = %(message_id)s "
            "WHERE id = %(id)s AND EXISTS (SELECT 1 FROM f) RETURNING 1",
            fence,
            **_thread_params(thread),
        )

    async def end_thread(
        self, thread: ThreadRecord, status: ThreadStatus, output: str, fence: Fence
    ) -> ThreadRecord:
        """End a record without counting a turn (a cancelled turn never completed)."""
        ended = ledger.thread_moved(thread, status, output=output)
        params = {**self._fence_params(fence), **_thread_params(ended)}

        def write(conn: Connection, tick: _Tick) -> str | None:
            row = conn.execute(
                f"WITH {_FENCE} UPDATE threads SET status = %(status)s, output = %(output)s, "
                "ended_at = clock_timestamp() WHERE id = %(id)s AND EXISTS (SELECT 1 FROM f) "
                f"RETURNING {_ts('ended_at')}".encode(),
                params,
            ).fetchone()
            return None if row is None else str(row[0])

        ended_at = await self._fenced_write(fence, write)
        return replace(ended, ended_at=ended_at)

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
        at once, fenced like every write a turn makes (P11)."""
        params = {
            **self._fence_params(fence),
            "id": new_id(),
            "channel": channel,
            "content": content,
            "metadata": json.dumps(metadata),
            "in_reply_to": in_reply_to,
            "thread_id": thread_id,
        }

        def write(conn: Connection, tick: _Tick) -> Message | None:
            row = conn.execute(
                f"WITH {_FENCE} INSERT INTO messages (id, channel, direction, content, state, "
                "metadata, in_reply_to, thread_id, host, fence) "
                f"SELECT %(id)s, %(channel)s, 'out', %(content)s, {_DONE}, %(metadata)s, "
                "%(in_reply_to)s, %(thread_id)s, %(host)s, %(token)s "
                f"WHERE EXISTS (SELECT 1 FROM f) RETURNING {MESSAGE_COLUMNS}".encode(),
                params,
            ).fetchone()
            return None if row is None else _message(row)

        return await self._fenced_write(fence, write)

    async def set_remote_id(self, message: Message, remote_id: str, fence: Fence) -> Message:
        updated = replace(message, metadata={**message.metadata, "remote_id": remote_id})
        await self._fenced_statement(
            "UPDATE messages SET metadata = %(metadata)s "
            "WHERE id = %(id)s AND EXISTS (SELECT 1 FROM f) RETURNING 1",
            fence,
            id=message.id,
            metadata=json.dumps(updated.metadata),
        )
        return updated

    async def get_session(self, agent: str) -> str | None:
        def read(conn: Connection) -> str | None:
            row = conn.execute(
                "SELECT session_id FROM sessions WHERE agent = %s", (agent,)
            ).fetchone()
            return None if row is None else row[0]

        return await self._read(read)

    async def clear_session(self, agent: str) -> None:
        """R27: forget the session; the conversation's record keeps counting."""

        def write(conn: Connection, tick: _Tick) -> None:
            conn.execute(
                "UPDATE threads SET session = NULL WHERE id = "
                "(SELECT thread_id FROM sessions WHERE agent = %s)",
                (agent,),
            )
            conn.execute("UPDATE sessions SET session_id = NULL WHERE agent = %s", (agent,))

        await self._write(write)

    async def conversation(self, agent: str) -> ThreadRecord | None:
        def read(conn: Connection) -> ThreadRecord | None:
            row = conn.execute(
                f"SELECT {THREAD_COLUMNS} FROM threads WHERE id = "
                "(SELECT thread_id FROM sessions WHERE agent = %s)".encode(),
                (agent,),
            ).fetchone()
            return None if row is None else _thread(row)

        return await self._read(read)

    # -- outbox (fenced by role:vault-outbox, P17) ------------------------------------

    async def outbox_add(self, kind: str, payload: dict[str, Any], fence: Fence | None) -> int:
        """A row for the outbox's deliverer; a turn's (``fence``) only while its
        lease holds (P11, PT12)."""
        if fence is None:

            def write(conn: Connection, tick: _Tick) -> int:
                row = conn.execute(
                    "INSERT INTO outbox (kind, payload) VALUES (%s, %s) RETURNING seq",
                    (kind, json.dumps(payload)),
                ).fetchone()
                assert row is not None
                return int(row[0])

            return await self._write(write)
        params = {**self._fence_params(fence), "kind": kind, "payload": json.dumps(payload)}

        def fenced(conn: Connection, tick: _Tick) -> int | None:
            row = conn.execute(
                f"WITH {_FENCE}, o AS (INSERT INTO outbox (kind, payload) "
                "SELECT %(kind)s, %(payload)s WHERE EXISTS (SELECT 1 FROM f) RETURNING seq) "
                "SELECT (SELECT seq FROM o)".encode(),
                params,
            ).fetchone()
            return int(row[0]) if row and row[0] is not None else None

        return await self._fenced_write(fence, fenced)

    async def outbox_items(self) -> list[tuple[int, str, dict[str, Any], int]]:
        def read(conn: Connection) -> list[tuple[int, str, dict[str, Any], int]]:
            rows = conn.execute(
                "SELECT seq, kind, payload, attempts FROM outbox ORDER BY seq"
            ).fetchall()
            return [(int(r[0]), r[1], json.loads(r[2]), int(r[3])) for r in rows]

        return await self._read(read)

    async def outbox_failed(self, seq: int, error: str, fence: Fence) -> None:
        await self._fenced_statement(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %(error)s "
            "WHERE seq = %(seq)s AND EXISTS (SELECT 1 FROM f) RETURNING 1",
            fence,
            seq=seq,
            error=error,
        )

    async def outbox_done(self, seq: int, fence: Fence) -> None:
        await self._fenced_statement(
            "DELETE FROM outbox WHERE seq = %(seq)s AND EXISTS (SELECT 1 FROM f) RETURNING 1",
            fence,
            seq=seq,
        )

    async def outbox_count(self) -> int:
        def read(conn: Connection) -> int:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
            return int(row[0]) if row else 0

        return await self._read(read)

    # -- processes of this host (procs.ProcessRegistry) -------------------------------

    async def add_process(self, record: ProcessRecord) -> None:
        def write(conn: Connection, tick: _Tick) -> None:
            conn.execute(
                "INSERT INTO processes (host, boot_id, pid, start_time, agent, channel, "
                "started_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (
                    self.host,
                    record.boot_id,
                    record.pid,
                    record.start_time,
                    record.agent,
                    record.channel,
                    record.started_at,
                ),
            )

        await self._write(write)

    async def remove_process(self, record: ProcessRecord) -> None:
        def write(conn: Connection, tick: _Tick) -> None:
            conn.execute(
                "DELETE FROM processes WHERE host = %s AND boot_id = %s AND pid = %s "
                "AND start_time = %s",
                (self.host, record.boot_id, record.pid, record.start_time),
            )

        await self._write(write)

    async def list_processes(self) -> list[ProcessRecord]:
        def read(conn: Connection) -> list[ProcessRecord]:
            rows = conn.execute(
                "SELECT pid, start_time, boot_id, agent, channel, started_at FROM processes "
                "WHERE host = %s ORDER BY started_at",
                (self.host,),
            ).fetchall()
            return [
                ProcessRecord(
                    pid=r[0],
                    start_time=r[1],
                    boot_id=r[2],
                    agent=r[3],
                    channel=r[4],
                    started_at=r[5],
                )
                for r in rows
            ]

        return await self._read(read)

    async def clear_processes(self) -> None:
        def write(conn: Connection, tick: _Tick) -> None:
            conn.execute("DELETE FROM processes WHERE host = %s", (self.host,))

        await self._write(write)

    # -- reading ----------------------------------------------------------------------

    async def get_message(self, message_id: str) -> Message | None:
        def read(conn: Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %s".encode(), (message_id,)
            ).fetchone()
            return None if row is None else _message(row)

        return await self._read(read)

    async def list_messages(
        self,
        channel: str,
        *,
        limit: int,
        after: str | None = None,
        before: str | None = None,
        tail: bool = False,
    ) -> Page:
        """Cursor paging over a channel's transcript; every page is oldest first."""
        base = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE channel = %s"

        def read(conn: Connection) -> Page:
            if after is not None:
                rows = conn.execute(
                    f"{base} AND seq > %s ORDER BY seq LIMIT %s".encode(),
                    (channel, _cursor(after), limit),
                ).fetchall()
            elif before is not None or tail:
                bound = _cursor(before) if before is not None else 2**62
                rows = conn.execute(
                    f"{base} AND seq < %s ORDER BY seq DESC LIMIT %s".encode(),
                    (channel, bound, limit),
                ).fetchall()
                rows.reverse()
            else:
                rows = conn.execute(
                    f"{base} ORDER BY seq LIMIT %s".encode(), (channel, limit)
                ).fetchall()
            messages = [_message(row) for row in rows]
            if not messages:
                return Page(messages=[], next=None, prev=None)
            first, last = messages[0].seq, messages[-1].seq
            flags = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE channel = %s AND seq > %s), "
                "EXISTS (SELECT 1 FROM messages WHERE channel = %s AND seq < %s)",
                (channel, last, channel, first),
            ).fetchone()
            assert flags is not None
            return Page(
                messages=messages,
                next=str(last) if flags[0] else None,
                prev=str(first) if flags[1] else None,
            )

        return await self._read(read)

    async def list_threads(
        self, channel: str | None = None, limit: int = 500
    ) -> list[ThreadRecord]:
        def read(conn: Connection) -> list[ThreadRecord]:
            if channel is None:
                rows = conn.execute(
                    f"SELECT {THREAD_COLUMNS} FROM threads ORDER BY seq DESC LIMIT %s".encode(),
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {THREAD_COLUMNS} FROM threads WHERE channel = %s "
                    "ORDER BY seq DESC LIMIT %s".encode(),
                    (channel, limit),
                ).fetchall()
            return [_thread(row) for row in reversed(rows)]

        return await self._read(read)

    async def answered_by(self, reply_id: str) -> list[Message]:
        def read(conn: Connection) -> list[Message]:
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE reply_id = %s "
                "AND direction = 'in' ORDER BY seq".encode(),
                (reply_id,),
            ).fetchall()
            return [_message(row) for row in rows]

        return await self._read(read)

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        def read(conn: Connection) -> ThreadRecord | None:
            row = conn.execute(
                f"SELECT {THREAD_COLUMNS} FROM threads WHERE id = %s".encode(), (thread_id,)
            ).fetchone()
            return None if row is None else _thread(row)

        return await self._read(read)


class _Moved:
    """A fenced write whose fence held but whose messages had moved on."""


_MOVED = _Moved()


def _slot_of(inbound: Inbound) -> tuple[str, str]:
    """A slot's (job, slot) from its message's external id ``job:<name>:<slot>``
    (R1 names hold no ``:``; the slot, an ISO time, may)."""
    prefix, name, slot = (inbound.external_id or "").split(":", 2)
    assert prefix == "job", inbound.external_id
    return name, slot


# P23: the statement that decides a slot. Its `f` is the role's fence; the
# primary key (job, slot) decides between two schedulers that both got past it.
_TAKE_SLOT = f"""WITH {_FENCE},
s AS (INSERT INTO job_slots (job, slot, outcome)
      SELECT %(job)s, %(slot)s, %(outcome)s WHERE EXISTS (SELECT 1 FROM f)
      ON CONFLICT DO NOTHING RETURNING 1)
SELECT (SELECT count(*) FROM f), (SELECT count(*) FROM s)"""
_TAKE_SLOT_UNFENCED = """INSERT INTO job_slots (job, slot, outcome)
VALUES (%(job)s, %(slot)s, %(outcome)s) ON CONFLICT DO NOTHING RETURNING 1, 1"""


def _take_slot(
    conn: Connection, store: PostgresStore, job: str, slot: str, outcome: str, fence: Fence | None
) -> bool | None:
    """True: this scheduler has the slot; False: another took it; None: fenced."""
    params: dict[str, Any] = {"job": job, "slot": slot, "outcome": outcome}
    if fence is None:
        row = conn.execute(_TAKE_SLOT_UNFENCED.encode(), params).fetchone()
        return row is not None
    row = conn.execute(_TAKE_SLOT.encode(), params | store._fence_params(fence)).fetchone()
    assert row is not None
    if not row[0]:
        return None
    return bool(row[1])


#: What a fire changes in a job's stored spec, merged in, so an edit made
#: meanwhile on another host (P22) is kept; a scheduled slot (not a run-now,
#: which any host may make) also moves the schedule's fields on.
_FIRED_FIELDS = ("last_run_at", "last_outcome", "last_message_id")
_SCHEDULED_FIELDS = ("last_slot", "skipped", "next_run_at")


def _store_fired(conn: Connection, job: Job, slot: str) -> None:
    fields = {key: getattr(job, key) for key in _FIRED_FIELDS}
    if not slot.startswith(RUN_NOW_PREFIX):
        fields |= {key: getattr(job, key) for key in _SCHEDULED_FIELDS}
        if job.run_at is not None:
            fields["enabled"] = job.enabled  # M28: a fired one-shot stays listed, disabled
    conn.execute(
        "UPDATE jobs SET spec = (spec::jsonb || %s::jsonb)::text WHERE name = %s",
        (json.dumps(fields), job.name),
    )


def _check_moved(result: T | _Moved, fence: Fence) -> T:
    if isinstance(result, _Moved):
        log.info("turn skipped: its messages moved on", extra={"channel": fence.channel})
        raise Stale(f"the messages of channel {fence.channel!r} moved on")
    return result


def _lock_channel(conn: Connection, channel: str) -> tuple[str | None, str | None] | None:
    """(agent, live owner) of a channel row, locked FOR SHARE until commit (P18)."""
    row = conn.execute(
        "SELECT c.agent, (SELECT l.owner FROM leases l JOIN hosts h "
        "ON (h.host_id, h.incarnation) = (l.owner, l.incarnation) "
        "WHERE l.name = c.name AND h.expires_at > now()) "
        "FROM channels c WHERE c.name = %s FOR SHARE OF c",
        (channel,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _unregister_channel(conn: Connection, channel: str) -> None:
    """R26: no agent on the channel any more; its queued messages wait, buffered."""
    conn.execute("UPDATE channels SET agent = NULL WHERE name = %s", (channel,))
    conn.execute(
        f"UPDATE messages SET state = {_BUFFERED} WHERE channel = %s AND state = {_QUEUED}",
        (channel,),
    )


def _evict_over_cap(conn: Connection, channel: str, cap: int) -> int:
    """R7: the oldest buffered messages over the cap become `dropped`; how many."""
    ledger.check_message_move(MessageState.BUFFERED, MessageState.DROPPED)
    dropped = conn.execute(
        f"UPDATE messages SET state = {_DROPPED}, error = %s WHERE seq IN ("
        f"SELECT seq FROM messages WHERE channel = %s AND state = {_BUFFERED} "
        "ORDER BY seq DESC OFFSET %s)",
        (f"buffer cap of {cap} messages exceeded", channel, cap),
    ).rowcount
    if dropped > 0:
        log.warning(
            "buffer cap reached: oldest messages dropped",
            extra={"channel": channel, "dropped": dropped, "cap": cap},
        )
    return max(dropped, 0)


def _bump_defs(conn: Connection, what: str) -> None:
    """P22: every definition change moves `defs_version` and tells the others."""
    conn.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'defs_version'")
    conn.execute("SELECT pg_notify('skydeck_defs', %s)", (what,))


def _send_notifications(conn: Connection, tick: _Tick) -> None:
    """One statement for a batch's notifications, in its commit (§0: a notifying
    commit takes a database-wide lock, so once per tick)."""
    if tick.notify:
        channels, payloads = zip(*sorted(tick.notify), strict=True)
        conn.execute(
            "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)",
            (list(channels), list(payloads)),
        )


def _thread_params(thread: ThreadRecord) -> dict[str, Any]:
    return {
        "id": thread.id,
        "channel": thread.channel,
        "agent": thread.agent,
        "mode": thread.mode,
        "status": thread.status.value,
        "input": thread.input,
        "output": thread.output,
        "session": thread.session,
        "turn_count": thread.turn_count,
        "usage": json.dumps(thread.usage) if thread.usage is not None else None,
        "message_id": thread.message_id,
    }


def build_postgres(
    url: str,
    *,
    host_id: str,
    ttl_s: float,
    schema_name: str = "skydeck",
    readers: int = 4,
    advertise_url: str | None = None,
    version: str | None = None,
    on_dropped: Callable[[int], None] | None = None,
    on_fenced: Callable[[], None] | None = None,
) -> PostgresStore:
    """The store and its sessions (P7), not connected yet: `PostgresStore.open`
    migrates, joins and connects, in the daemon's Trio run."""

    def session(*, control: bool = False, autocommit: bool = False) -> Session:
        return Session(
            conninfo(
                url,
                application_name=f"skydeck/{host_id}/joining",
                schema=schema_name,
                timeouts=Timeouts.for_ttl(ttl_s, control=control),
            ),
            autocommit=autocommit,
        )

    ownership = PgOwnership(
        session(control=True), host_id=host_id, ttl_s=ttl_s, url=advertise_url, version=version
    )
    return PostgresStore(
        session(),
        [session(autocommit=True) for _ in range(readers)],
        ownership,
        url=url,
        schema_name=schema_name,
        on_dropped=on_dropped,
        on_fenced=on_fenced,
    )


async def open_postgres(url: str, *, host_id: str, ttl_s: float, readers: int = 4) -> PostgresStore:
    """`build_postgres` then `PostgresStore.open`: a joined store (tests, the bench)."""
    store = build_postgres(url, host_id=host_id, ttl_s=ttl_s, readers=readers)
    await store.open()
    return store
