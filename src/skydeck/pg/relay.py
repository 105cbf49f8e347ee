"""Turn events on every host of a cluster (multi-host.md P25).

A channel has one event source, its owner. A subscriber may be connected to
any host, so the owner relays a channel's events through PostgreSQL to the
hosts that watch it; nothing is proxied host to host and nobody is
redirected (browsers and httpx drop `Authorization` on a cross-origin
redirect, and a load balancer may hide the hosts).

- **Watching.** A host with a local subscriber to a channel upserts
  `watchers(channel, host, expires_at = now() + 15 s)`, renews it every 5 s
  and deletes it when the channel's last local subscriber leaves (a crashed
  host's rows expire). A new row is announced with `NOTIFY skydeck_watch`.
  ``subscribe`` is answered ``: subscribed`` only after that commit
  (`ClusterEvents.ready`), so `skydeck send --wait` on any host sees its turn.
- **Relaying.** Every host caches the channels other hosts watch (from the
  table every 5 s, and from `skydeck_watch` at once). An owner buffers the
  events of its watched channels only, and sends them at most every 50 ms in
  ONE transaction on the control session, each as
  `pg_notify('skydeck_events', {"c": channel, "t": token, "n": serial, "e": event})`.
  One notifying commit per tick keeps NOTIFY's database-wide commit lock rare.
  An event whose notification would pass 7,000 bytes (NOTIFY's limit is
  8,000) is stored in `event_spill` (kept 60 s) and the notification names
  its id (``"s"``) instead of carrying it.
- **Receiving.** The listener hands `skydeck_events` payloads over in the
  order they arrived (commit order); one task delivers them in that order to
  the local hub, reading a spilled body first. An event whose token is below
  the highest seen for its channel is dropped: that is a paused former
  owner, whose lease a higher token has replaced. A host ignores relayed
  events of the channels it owns: it is their source.

Live events are best effort, as on one host: a batch the store refuses is
dropped (logged), never re-sent, since an unknown commit may have landed.

The pure parts (`plan`, `parse`, `TokenFilter`) decide; `ClusterEvents`
does the I/O, in `_send`, `_sync` and `_deliver`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter

from ..errors import StoreUnreachable
from ..events import DEFAULT_SUBSCRIBER_BUFFER, TurnEvents
from ..model import EventKind, TurnEvent
from ..store import Fence
from .driver import Connection

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..store.postgres import PostgresStore

log = logging.getLogger(__name__)

EVENTS = "skydeck_events"
WATCH = "skydeck_watch"
#: An owner sends its buffered events at most this often, in one commit.
FLUSH_S = 0.05
#: A notification longer than this (UTF-8 bytes) spills its event to `event_spill`.
SPILL_BYTES = 7_000
#: How long a spilled event is kept for its receivers.
SPILL_KEEP_S = 60.0
#: A watch row lives this long unless renewed; it is renewed (and the cache re-read) this often.
WATCH_TTL_S = 15.0
WATCH_RENEW_S = 5.0
#: How long a new subscription waits for its watch to commit before it is answered anyway.
READY_WAIT_S = 2.0
#: Events an owner buffers, and relayed payloads a receiver queues, before dropping more.
MAX_PENDING = 10_000


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# -- the pure parts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An owner's event, buffered for the next relay batch."""

    channel: str
    token: int
    event: TurnEvent


@dataclass(frozen=True, slots=True)
class Inline:
    """A notification that carries its event."""

    payload: str


@dataclass(frozen=True, slots=True)
class Spill:
    """An event too big for a notification: ``body`` goes to `event_spill`,
    the notification carries ``head`` and the row's id."""

    head: dict[str, Any]
    body: str

    def payload(self, spill_id: int) -> str:
        return _dumps({**self.head, "s": spill_id})


def plan(
    items: Sequence[Outgoing], serial: int, *, limit: int = SPILL_BYTES
) -> list[Inline | Spill]:
    """The notifications of one relay batch, in order.

    Each carries a serial, ``serial`` onwards: PostgreSQL sends identical
    payloads of one transaction once, and two identical `text` chunks are
    two events.
    """
    out: list[Inline | Spill] = []
    for n, item in enumerate(items, start=serial):
        head = {"c": item.channel, "t": item.token, "n": n}
        event = item.event.to_json()
        payload = _dumps({**head, "e": event})
        if len(payload.encode()) > limit:
            out.append(Spill(head, _dumps(event)))
        else:
            out.append(Inline(payload))
    return out


@dataclass(frozen=True, slots=True)
class Relayed:
    """A `skydeck_events` notification as received: the event, or its spill id."""

    channel: str
    token: int
    event: dict[str, Any] | None = None
    spill: int | None = None


def parse(payload: str) -> Relayed | None:
    """A `skydeck_events` payload, or None when it is not one `plan` makes."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    channel, token, event, spill = data.get("c"), data.get("t"), data.get("e"), data.get("s")
    if not isinstance(channel, str) or type(token) is not int:
        return None
    if isinstance(event, dict) and spill is None:
        return Relayed(channel, token, event=event)
    if type(spill) is int and event is None:
        return Relayed(channel, token, spill=spill)
    return None


def event_from_json(data: dict[str, Any]) -> TurnEvent | None:
    """`TurnEvent.to_json` read back; None for anything else."""
    rest = dict(data)
    kind, message_id = rest.pop("kind", None), rest.pop("message_id", None)
    if not isinstance(message_id, str) or kind not in set(EventKind):
        return None
    return TurnEvent(kind=EventKind(kind), message_id=message_id, data=rest)


class TokenFilter:
    """Drops a channel's events whose token is below the highest seen for it.

    Tokens of a channel only rise (P9), so a lower one is a former owner's:
    one that was paused while another host claimed the channel."""

    def __init__(self) -> None:
        self._highest: dict[str, int] = {}

    def admit(self, channel: str, token: int) -> bool:
        if token < self._highest.get(channel, token):
            return False
        self._highest[channel] = token
        return True


# -- the hub of a cluster host ------------------------------------------------------


class ClusterEvents(TurnEvents):
    """The local event hub, plus P25's watch, relay and receipt (module docstring).

    ``owned`` (set by `attach`) is the registry's channel -> fence of what this
    host runs: the channels it is the source of, and their tokens.
    """

    def __init__(
        self,
        store: PostgresStore,
        *,
        subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER,
        flush_s: float = FLUSH_S,
        renew_s: float = WATCH_RENEW_S,
        watch_ttl_s: float = WATCH_TTL_S,
        spill_keep_s: float = SPILL_KEEP_S,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(subscriber_buffer)
        self.store = store
        self.host = store.host
        self.flush_s = flush_s
        self.renew_s = renew_s
        self.watch_ttl_s = watch_ttl_s
        self.spill_keep_s = spill_keep_s
        self.owned: Callable[[], dict[str, Fence]] = lambda: {}
        #: Channels other hosts watch: only their events are relayed.
        self.watched: set[str] = set()
        #: Channels whose watch row this host committed.
        self.confirmed: set[str] = set()
        self.filter = TokenFilter()
        #: The notification serial (unique within a batch, see `plan`).
        self.serial = 0
        self.counts = Counter(
            "skydeck_relay_events",
            "Turn events relayed between hosts (P25), by outcome: sent and spilled (of the "
            "sent) by this owner, discarded (not sent: store refused, too many buffered, past "
            "the lease deadline; or not queued here on receipt), stale (received under a "
            "lower token)",
            ["outcome"],
            registry=registry,
        )
        self._pending: list[Outgoing] = []
        self._dirty = trio.Event()
        self._poke = trio.Event()
        self._synced = trio.Event()
        self._noticed: set[str] = set()
        self._inbox_send, self._inbox = trio.open_memory_channel[str](MAX_PENDING)

    def attach(self, owned: Callable[[], dict[str, Fence]]) -> None:
        self.owned = owned

    # -- the hub's side ---------------------------------------------------------------

    def publish(self, channel: str, event: TurnEvent) -> None:
        """Deliver here, and buffer for the relay when another host watches ``channel``."""
        super().publish(channel, event)
        if channel not in self.watched:
            return
        fence = self.owned().get(channel)
        if fence is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self.counts.labels("discarded").inc()
            return
        self._pending.append(Outgoing(channel, fence.token, event))
        self._dirty.set()

    @contextmanager
    def subscribe(
        self, channel: str, *, buffer: int | None = None
    ) -> Iterator[trio.MemoryReceiveChannel[TurnEvent]]:
        """A local subscription; the first one of a channel makes this host watch it,
        the last one leaving ends the watch."""
        try:
            with super().subscribe(channel, buffer=buffer) as receive:
                if channel not in self.confirmed:
                    self._poke.set()
                yield receive
        finally:
            if not self.subscriber_count(channel):
                self._poke.set()

    async def ready(self, channel: str) -> None:
        """Return once this host's watch of ``channel`` is committed and announced
        (or after `READY_WAIT_S`, when the store does not answer: events flow once
        it does)."""
        with trio.move_on_after(READY_WAIT_S):
            while channel not in self.confirmed:
                self._poke.set()
                await self._synced.wait()

    def poke(self) -> None:
        """Re-sync watches and the watched cache now (the listener reconnected,
        so `skydeck_watch` notifications may have been missed)."""
        self._poke.set()

    def received(self, channel: str, payload: str) -> None:
        """A notification on `EVENTS` or `WATCH`, handed over in arrival order."""
        if channel == WATCH:
            try:
                data = json.loads(payload)
                watched, host = str(data["c"]), str(data["h"])
            except (ValueError, KeyError, TypeError):
                log.warning("bad watch notification", extra={"payload": payload[:200]})
                return
            if host != self.host:
                self.watched.add(watched)
                self._noticed.add(watched)
        elif channel == EVENTS:
            try:
                self._inbox_send.send_nowait(payload)
            except trio.WouldBlock:
                self.counts.labels("discarded").inc()

    # -- the loops --------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started once the watched channels were read (or the store did not answer),
        so a host's first claims already relay their replayed turns."""
        await self._watch_once()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flushes, name="relay-flush")
            nursery.start_soon(self._watches, name="relay-watch")
            nursery.start_soon(self._receiving, name="relay-receive")
            task_status.started()

    async def _flushes(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            batch, self._pending = self._pending, []
            await self._send(batch)
            await trio.sleep(self.flush_s)

    async def _send(self, batch: Sequence[Outgoing]) -> None:
        """One transaction on the control session: the spills, then every notification."""
        if not self.store.ownership.alive():
            # P10: past the deadline this host is no channel's source.
            self.counts.labels("discarded").inc(len(batch))
            return
        notices = plan(batch, self.serial)
        self.serial += len(notices)

        def send(conn: Connection) -> None:
            payloads: list[str] = []
            for notice in notices:
                if isinstance(notice, Spill):
                    row = conn.execute(
                        "INSERT INTO event_spill (body) VALUES (%s) RETURNING id", (notice.body,)
                    ).fetchone()
                    assert row is not None
                    payloads.append(notice.payload(int(row[0])))
                else:
                    payloads.append(notice.payload)
            # One round trip for the lot, in order (unnest yields the array's order):
            # the control session also carries the heartbeats, which must not wait
            # behind a notification per event.
            conn.execute(
                "SELECT count(pg_notify(%s, payload)) FROM unnest(%s::text[]) AS t(payload)",
                (EVENTS, payloads),
            )

        try:
            await self.store.ownership.session.run(send)
        except StoreUnreachable as exc:
            self.counts.labels("discarded").inc(len(batch))
            log.warning(
                "turn events not relayed", extra={"events": len(batch), "reason": exc.reason}
            )
            return
        self.counts.labels("sent").inc(len(batch))
        self.counts.labels("spilled").inc(sum(isinstance(notice, Spill) for notice in notices))

    async def _watches(self) -> None:
        while True:
            with trio.move_on_after(self.renew_s):
                await self._poke.wait()
            await self._watch_once()

    async def _watch_once(self) -> None:
        self._poke = trio.Event()
        try:
            await self._sync()
        except StoreUnreachable as exc:
            log.warning("watches not renewed", extra={"reason": exc.reason})
        synced, self._synced = self._synced, trio.Event()
        synced.set()

    async def _sync(self) -> None:
        """One transaction: this host's watch rows as its subscriptions are, the
        new ones announced; expired watches and old spills removed; the channels
        other hosts watch read back."""
        subscribed = sorted(c for c, subs in self._subscribers.items() if subs)
        new = [c for c in subscribed if c not in self.confirmed]
        self._noticed = set()

        def sync(conn: Connection) -> set[str]:
            conn.execute(
                "INSERT INTO watchers (channel, host, expires_at) "
                "SELECT c, %(host)s, now() + make_interval(secs => %(ttl)s) "
                "FROM unnest(%(channels)s::text[]) AS c "
                "ON CONFLICT (channel, host) DO UPDATE SET expires_at = excluded.expires_at",
                {"host": self.host, "ttl": self.watch_ttl_s, "channels": subscribed},
            )
            conn.execute(
                "DELETE FROM watchers WHERE expires_at <= now() "
                "OR (host = %s AND NOT channel = ANY(%s::text[]))",
                (self.host, subscribed),
            )
            for channel in new:
                conn.execute(
                    "SELECT pg_notify(%s, %s)", (WATCH, _dumps({"c": channel, "h": self.host}))
                )
            conn.execute(
                "DELETE FROM event_spill WHERE created_at < now() - make_interval(secs => %s)",
                (self.spill_keep_s,),
            )
            rows = conn.execute(
                "SELECT DISTINCT channel FROM watchers WHERE host <> %s AND expires_at > now()",
                (self.host,),
            ).fetchall()
            return {str(row[0]) for row in rows}

        watched = await self.store.ownership.session.run(sync)
        # A watch announced while this read ran may be missing from it: keep those.
        self.watched = watched | self._noticed
        self.confirmed = set(subscribed)

    async def _receiving(self) -> None:
        while True:
            batch = [await self._inbox.receive()]
            while True:
                try:
                    batch.append(self._inbox.receive_nowait())
                except trio.WouldBlock:
                    break
            owned = self.owned()
            for payload in batch:
                await self._deliver(payload, owned)

    async def _deliver(self, payload: str, owned: dict[str, Fence]) -> None:
        relayed = parse(payload)
        if relayed is None:
            log.warning("bad relayed event", extra={"payload": payload[:200]})
            return
        if relayed.channel in owned:
            return  # this host is the channel's source; its hub has the event already
        if not self.filter.admit(relayed.channel, relayed.token):
            self.counts.labels("stale").inc()
            return
        if not self.subscriber_count(relayed.channel):
            return
        data = relayed.event
        if relayed.spill is not None:
            data = await self._spilled(relayed.spill)
        event = event_from_json(data) if data is not None else None
        if event is None:
            log.warning("relayed event lost", extra={"channel": relayed.channel})
            return
        super().publish(relayed.channel, event)  # the local hub only: never relayed again

    async def _spilled(self, spill_id: int) -> dict[str, Any] | None:
        def read(conn: Connection) -> str | None:
            row = conn.execute("SELECT body FROM event_spill WHERE id = %s", (spill_id,)).fetchone()
            return None if row is None else str(row[0])

        try:
            body = await self.store._read(read)
        except StoreUnreachable:
            return None
        if body is None:
            return None
        data = json.loads(body)
        return data if isinstance(data, dict) else None
