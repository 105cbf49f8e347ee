"""`Notifier` (store/__init__.py) over PostgreSQL's LISTEN/NOTIFY (P12, P19, P22).

A thin adapter: the store already sends every notification in the commit of
the batch it belongs to, and `driver.Listener` already reads them from Trio
without a thread. This names them as `Signal`s, so a host can be written
against the seam and run on the embedded store unchanged (`store.local`).

Each `listen()` (re)connects first and then yields a ``lease`` signal with no
name: notifications sent while nobody listened are gone, so the host scans
(P12). A broken session ends the iteration with `StoreUnreachable`; the caller
listens again, after a backoff of its own.

`watch` and `relay` speak P25's wire format (`pg.relay`: the `watchers` row
and `skydeck_watch`; `skydeck_events` payloads, spilled past 7,000 bytes),
one transaction each on the control session. The daemon does not use them:
its `pg.relay.ClusterEvents` watches for its local subscribers and batches
an owner's events every 50 ms; the two would disagree about this host's
`watchers` rows, so a host uses one or the other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator

from ..model import TurnEvent
from ..store import Fence, Signal, SignalKind
from ..store.postgres import PostgresStore
from .driver import Connection, Listener, Timeouts, conninfo
from .ownership import application_name
from .relay import EVENTS, WATCH, WATCH_TTL_S, Outgoing, Spill, event_from_json, parse, plan

log = logging.getLogger(__name__)

#: NOTIFY channel -> the signal it is.
KINDS: dict[str, SignalKind] = {
    "skydeck_wake": "wake",
    "skydeck_lease": "lease",
    "skydeck_defs": "defs",
    WATCH: "watch",
    EVENTS: "event",
}
WAKE_CHANNEL = "skydeck_wake"
_WATCHED = "EXISTS (SELECT 1 FROM watchers WHERE channel = %s AND expires_at > now())"


class PgNotifier:
    """This host's signals: sent in the writer's batches, read on the listener session."""

    def __init__(self, store: PostgresStore, listener: Listener) -> None:
        self.store = store
        self.listener = listener
        #: Serials of relayed events (P25: identical payloads of one commit are sent once).
        self._serial = 0

    @classmethod
    def for_store(cls, store: PostgresStore) -> PgNotifier:
        """A notifier with a listener session of its own on ``store``'s database (P7)."""
        ownership = store.ownership
        listener = Listener(
            conninfo(
                store.url,
                application_name=application_name(
                    ownership.host_id, ownership.incarnation or "joining"
                ),
                schema=store.schema_name,
                timeouts=Timeouts.for_ttl(ownership.ttl_s),
            ),
            tuple(KINDS),
        )
        return cls(store, listener)

    async def wake(self, channel: str) -> None:
        await self.store.notify(WAKE_CHANNEL, channel)

    async def listen(self) -> AsyncGenerator[Signal, None]:
        ownership = self.store.ownership
        if ownership.incarnation is not None:
            self.listener.rename(application_name(ownership.host_id, ownership.incarnation))
        await self.listener.connect()
        try:
            yield Signal("lease")  # P12: whatever was notified before this is gone
            while True:
                for channel, payload in await self.listener.receive():
                    signal = await self._signal(KINDS[channel], payload)
                    if signal is not None:
                        yield signal
        finally:
            await self.listener.close()

    async def _signal(self, kind: SignalKind, payload: str) -> Signal | None:
        """A notification as a signal; None (logged) for one no skydeck sends."""
        if kind == "watch":
            try:
                return Signal(kind, str(json.loads(payload)["c"]))
            except (ValueError, KeyError, TypeError):
                log.warning("bad watch notification", extra={"payload": payload[:200]})
                return None
        if kind != "event":
            return Signal(kind, payload)
        relayed = parse(payload)
        data = relayed.event if relayed is not None else None
        if relayed is not None and relayed.spill is not None:
            data = await self._spilled(relayed.spill)
        event = event_from_json(data) if data is not None else None
        if relayed is None or event is None:
            log.warning("bad relayed event", extra={"payload": payload[:200]})
            return None
        return Signal(kind, relayed.channel, event, relayed.token)

    async def _spilled(self, spill_id: int) -> dict[str, object] | None:
        def read(conn: Connection) -> str | None:
            row = conn.execute("SELECT body FROM event_spill WHERE id = %s", (spill_id,)).fetchone()
            return None if row is None else str(row[0])

        body = await self.store._read(read)
        data = json.loads(body) if body is not None else None
        return data if isinstance(data, dict) else None

    async def watch(self, channel: str) -> None:
        """This host's `watchers` row for ``channel`` (P25's TTL), announced."""
        ownership = self.store.ownership
        notice = json.dumps({"c": channel, "h": ownership.host_id})

        def watch(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO watchers (channel, host, expires_at) "
                "VALUES (%s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (channel, host) DO UPDATE SET expires_at = excluded.expires_at",
                (channel, ownership.host_id, WATCH_TTL_S),
            )
            conn.execute("SELECT pg_notify(%s, %s)", (WATCH, notice))

        await ownership.session.run(watch)

    async def relay(self, channel: str, event: TurnEvent, fence: Fence) -> None:
        """``event`` on `skydeck_events` if some host watches ``channel``; nothing
        past this host's lease deadline (P10: it is no channel's source then)."""
        ownership = self.store.ownership
        if not ownership.alive():
            return
        (notice,) = plan([Outgoing(channel, fence.token, event)], self._serial)
        self._serial += 1

        def relay(conn: Connection) -> None:
            row = conn.execute(f"SELECT {_WATCHED}", (channel,)).fetchone()
            if row is None or not row[0]:
                return
            if isinstance(notice, Spill):
                spilled = conn.execute(
                    "INSERT INTO event_spill (body) VALUES (%s) RETURNING id", (notice.body,)
                ).fetchone()
                assert spilled is not None
                payload = notice.payload(int(spilled[0]))
            else:
                payload = notice.payload
            conn.execute("SELECT pg_notify(%s, %s)", (EVENTS, payload))

        await ownership.session.run(relay)
