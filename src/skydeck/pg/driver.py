"""psycopg 3 on Trio: sync connections driven from worker threads (multi-host.md §6).

Why threads and not psycopg's `AsyncConnection`: that one is asyncio-only
(psycopg#29), and a bridge costs more per statement than a thread hop
(*measured* in §6). A hop costs ~270 µs, a statement ~110 µs, so a caller
hands a `Session` one function that runs a whole batch (its statements and
the COMMIT) on one hop. One thread per connection at a time: a `trio.Lock`
orders the callers of one session.

Thread calls are never abandoned (`trio.to_thread.run_sync`'s default,
``abandon_on_cancel=False``): a write in
flight completes or fails, within ``statement_timeout``, before its task sees
a cancellation, so nobody is told "not written" about a write that landed.

LISTEN needs no thread: the `Listener` waits for its socket to be readable in
Trio, then lets psycopg parse what arrived without blocking
(``notifies(timeout=0)`` polls once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import psycopg
import psycopg.conninfo
import trio
import trio.lowlevel
from psycopg import sql

from ..errors import StoreUnreachable

log = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

URL_SCHEMES = ("postgres", "postgresql")
#: P5: how long one connection attempt may take.
CONNECT_TIMEOUT_S = 5
#: SQLSTATEs a batch is re-run once for (P18): deadlock, serialization failure.
RETRYABLE = {"40P01": "deadlock", "40001": "serialization"}
#: SQLSTATEs of a server ending the session, its transaction rolled back: the idle
#: in transaction timeout (P7: a paused host's batch), a terminated backend, a
#: server shutting down. The store is unreachable for this call, not refusing a write.
SESSION_ENDED = {"25P03", "57P01", "57P02", "57P03"}
#: SQLSTATEs of P7's own timeouts: `statement_timeout` (57014) and `lock_timeout`
#: (55P03). The session stays usable, but the call did not happen: as for a lost
#: connection, the caller sees an unreachable store (a heartbeat fences itself in
#: time, a post gets P6's 503), never a raw database error that ends the daemon.
TIMED_OUT = {"57014", "55P03"}


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in URL_SCHEMES


def redact(url: str) -> str:
    """``postgres://user@host:port/db``: never a password, never other parameters
    but the socket directory (P1)."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    query = f"?host={socket_dir}" if socket_dir and socket_dir.startswith("/") else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}{query}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """P7: what each session sets, so a paused or lost host never holds locks for long."""

    statement_s: float = 5.0
    lock_s: float = 2.0
    idle_in_transaction_s: float = 5.0
    tcp_user_timeout_s: float = 5.0

    @classmethod
    def for_ttl(cls, ttl_s: float, *, control: bool = False) -> Timeouts:
        return cls(
            statement_s=ttl_s / 4 if control else 5.0,
            lock_s=2.0,
            idle_in_transaction_s=min(5.0, ttl_s / 2),
            tcp_user_timeout_s=ttl_s / 2,
        )


def conninfo(url: str, *, application_name: str, schema: str, timeouts: Timeouts) -> str:
    """The libpq connection string of one session: the URL plus P7's settings."""
    options = " ".join(
        (
            f"-c statement_timeout={int(timeouts.statement_s * 1000)}",
            f"-c lock_timeout={int(timeouts.lock_s * 1000)}",
            f"-c idle_in_transaction_session_timeout={int(timeouts.idle_in_transaction_s * 1000)}",
            f"-c search_path={schema}",
            "-c timezone=UTC",
        )
    )
    return psycopg.conninfo.make_conninfo(
        url,
        application_name=application_name,
        connect_timeout=CONNECT_TIMEOUT_S,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
        tcp_user_timeout=int(timeouts.tcp_user_timeout_s * 1000),
        options=options,
    )


def describe(exc: BaseException) -> str:
    """One line for a driver error: its first line, without libpq's details."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Session:
    """One PostgreSQL session; every `run` is one transaction on one thread hop.

    A broken session is reconnected on the next `run`: the caller learns about
    the break once, as `StoreUnreachable`, and decides what it means.
    """

    def __init__(self, conninfo: str, *, autocommit: bool = False) -> None:
        self._conninfo = conninfo
        self._autocommit = autocommit
        self._conn: Connection | None = None
        self._lock = trio.Lock()
        #: Batches re-run after a deadlock or serialization failure (P18), by reason.
        self.retries: dict[str, int] = {}

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` then COMMIT, on a worker thread; rolled back if it raises.

        A deadlock or serialization failure re-runs the batch once (P18). A
        lost connection is `StoreUnreachable`; any other database error is the
        caller's (a constraint, a bug), raised as psycopg raised it.
        """
        async with self._lock:
            return await trio.to_thread.run_sync(self._call, fn)

    def _call(self, fn: Callable[[Connection], T]) -> T:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                result = fn(conn)
                if not self._autocommit:
                    conn.commit()
                return result
            except psycopg.Error as exc:
                reason = RETRYABLE.get(exc.sqlstate or "")
                self._rollback(conn)
                if reason is not None and attempt == 1:
                    self.retries[reason] = self.retries.get(reason, 0) + 1
                    continue
                lost = isinstance(exc, psycopg.OperationalError) and (
                    conn.broken or conn.closed or exc.sqlstate is None
                )
                if reason is None and (lost or exc.sqlstate in SESSION_ENDED):
                    self._drop()
                    raise StoreUnreachable(describe(exc)) from exc
                if exc.sqlstate in TIMED_OUT:  # the session is fine; the store was too slow
                    raise StoreUnreachable(describe(exc)) from exc
                raise
            except BaseException:
                self._rollback(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            try:
                self._conn = psycopg.connect(self._conninfo, autocommit=self._autocommit)
            except psycopg.OperationalError as exc:
                raise StoreUnreachable(describe(exc)) from exc
        return self._conn

    def _rollback(self, conn: Connection) -> None:
        if conn.closed or conn.broken or self._autocommit:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:  # closing a broken session only fails the same way
                log.debug("closing a broken session failed", exc_info=True)

    async def rename(self, application_name: str) -> None:
        """Carry another application_name from now on (a new incarnation, P3)."""
        self._conninfo = psycopg.conninfo.make_conninfo(
            self._conninfo, application_name=application_name
        )
        if self.connected:
            try:
                await self.run(
                    lambda conn: conn.execute(
                        "SELECT set_config('application_name', %s, false)", (application_name,)
                    )
                )
            except StoreUnreachable:
                # The connection was gone (idle through a server restart): the next
                # one is opened with the new name. A rejoin must not fail on it, or
                # its retry finds its own new incarnation in use.
                log.debug("renaming a lost session: the next connection carries the name")

    async def connect(self) -> None:
        """Open the session now (a `run` would do it too), so start-up fails early."""
        await self.run(lambda conn: None)

    async def close(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._drop)

    def close_now(self) -> None:
        """Close from the Trio thread, on the way out (closing a socket does not block)."""
        self._drop()


class Listener:
    """A LISTEN session read from Trio: no thread waits for a notification."""

    def __init__(self, conninfo: str, channels: Sequence[str]) -> None:
        self._conninfo = conninfo
        self._channels = tuple(channels)
        self._conn: Connection | None = None
        #: Connections made after the first: notifications were lost meanwhile (P12).
        self.reconnects = -1

    @property
    def conninfo(self) -> str:
        """What the next connection is made with (its P7 settings included)."""
        return self._conninfo

    def rename(self, application_name: str) -> None:
        """The application_name of the next connection (a new incarnation, P3)."""
        self._conninfo = psycopg.conninfo.make_conninfo(
            self._conninfo, application_name=application_name
        )

    async def connect(self) -> None:
        """(Re)connect and LISTEN. The caller scans afterwards: whatever was
        notified while nobody listened is gone."""
        await self.close()

        def open_and_listen() -> Connection:
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True)
                for channel in self._channels:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            except psycopg.OperationalError as exc:
                raise StoreUnreachable(describe(exc)) from exc
            return conn

        self._conn = await trio.to_thread.run_sync(open_and_listen)
        self.reconnects += 1

    async def receive(self) -> list[tuple[str, str]]:
        """The next notifications, as (channel, payload), once at least one arrived.

        Raises `StoreUnreachable` when the session breaks; `connect` again then.
        """
        conn = self._conn
        if conn is None:
            raise StoreUnreachable("the listener is not connected")
        while True:
            try:
                batch = [(n.channel, n.payload) for n in conn.notifies(timeout=0)]
            except psycopg.OperationalError as exc:
                await self.close()
                raise StoreUnreachable(describe(exc)) from exc
            if batch:
                return batch
            await trio.lowlevel.wait_readable(conn.fileno())

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            fd = conn.pgconn.socket if not conn.closed and not conn.broken else -1
            if fd >= 0:
                trio.lowlevel.notify_closing(fd)
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing the listener failed", exc_info=True)
