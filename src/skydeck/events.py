"""Per-channel fan-out of live turn events.

A turn must never wait for a viewer, so publishing is synchronous and
non-blocking: each subscriber owns a bounded memory channel, and one that has
fallen a whole buffer behind is disconnected (its receive side sees the end of
the stream) instead of slowing the turn down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from .model import TurnEvent

log = logging.getLogger(__name__)

DEFAULT_SUBSCRIBER_BUFFER = 256


class TurnEvents:
    def __init__(self, subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER) -> None:
        self._buffer = subscriber_buffer
        self._subscribers: dict[str, set[trio.MemorySendChannel[TurnEvent]]] = {}

    def publish(self, channel: str, event: TurnEvent) -> None:
        """Deliver to every subscriber of ``channel`` now; drop the ones that lag."""
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        for send in list(subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("slow turn-event subscriber disconnected", extra={"channel": channel})
                self._drop(channel, send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop(channel, send)

    def _drop(self, channel: str, send: trio.MemorySendChannel[TurnEvent]) -> None:
        send.close()
        subscribers = self._subscribers.get(channel)
        if subscribers is not None:
            subscribers.discard(send)
            if not subscribers:
                del self._subscribers[channel]

    @contextmanager
    def subscribe(
        self, channel: str, *, buffer: int | None = None
    ) -> Iterator[trio.MemoryReceiveChannel[TurnEvent]]:
        """Receive the channel's events until the block ends or we fall behind."""
        size = self._buffer if buffer is None else buffer
        send, receive = trio.open_memory_channel[TurnEvent](math.inf if size < 0 else size)
        self._subscribers.setdefault(channel, set()).add(send)
        try:
            yield receive
        finally:
            self._drop(channel, send)
            receive.close()

    async def ready(self, channel: str) -> None:
        """Return once a subscription to ``channel`` sees every later event: at once
        here; a cluster host first commits its watch of the channel (pg/relay.py, P25)."""
        await trio.lowlevel.checkpoint()

    def close_all(self) -> None:
        """End every stream (shutdown): live views see the end, not a hang."""
        for channel, subscribers in list(self._subscribers.items()):
            for send in list(subscribers):
                self._drop(channel, send)

    def subscriber_count(self, channel: str) -> int:
        return len(self._subscribers.get(channel, ()))
