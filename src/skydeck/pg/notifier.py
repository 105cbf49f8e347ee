"""`Notifier` (store/__init__.py) over PostgreSQL's LISTEN/NOTIFY (P12, P19, P22).

A thin adapter: the store already sends every notification in the commit of
the batch it belongs to, and `driver.Listener` already reads them from Trio
without a thread. This names them as `Signal`s, so a host can be written
against the seam and run on the embedded store unchanged (`store.local`).

Each `listen()` (re)connects first and then yields a ``lease`` signal with no
name: notifications sent while nobody listened are gone, so the host scans
(P12). A broken session ends the iteration with `StoreUnreachable`; the caller
listens again, after a backoff of its own.

Cross-host turn events (`watch`, `relay`, P25) are not built on PostgreSQL in
this version: both raise `NotImplementedError` rather than pretend.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from ..model import TurnEvent
from ..store import Fence, Signal, SignalKind
from ..store.postgres import PostgresStore
from .driver import Listener, Timeouts, conninfo
from .ownership import application_name

#: NOTIFY channel -> the signal it is.
KINDS: dict[str, SignalKind] = {
    "skydeck_wake": "wake",
    "skydeck_lease": "lease",
    "skydeck_defs": "defs",
}
WAKE_CHANNEL = "skydeck_wake"
NOT_BUILT = "cross-host turn events (P25) are not built on PostgreSQL yet"


class PgNotifier:
    """This host's signals: sent in the writer's batches, read on the listener session."""

    def __init__(self, store: PostgresStore, listener: Listener) -> None:
        self.store = store
        self.listener = listener

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
                    yield Signal(KINDS[channel], payload)
        finally:
            await self.listener.close()

    async def watch(self, channel: str) -> None:
        raise NotImplementedError(NOT_BUILT)

    async def relay(self, channel: str, event: TurnEvent, fence: Fence) -> None:
        raise NotImplementedError(NOT_BUILT)
