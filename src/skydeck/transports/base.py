"""The outbound seam and its retry policy (R20).

The local store always keeps every record first. A `Mirror` is a second place
some channels' records must also land (a Parachute Vault, Telegram chats):
replies, thread records and callbacks; `Mirrors` is several of them at once. Writes raise
`DeliveryError` with the HTTP status when there was one, which is what decides
whether a retry can help.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeVar

import trio

from ..errors import DeliveryError
from ..model import AgentSpec, Inbound, Message, ThreadRecord
from ..store import Fence

log = logging.getLogger(__name__)

OUTBOUND_MAX_RETRIES = 2
OUTBOUND_BACKOFF_S = 0.25

T = TypeVar("T")


class Mirror(Protocol):
    """Where a channel's records go besides the local store."""

    def serves(self, channel: str) -> bool: ...

    def takes_callbacks(self, channel: str) -> bool:
        """R22a: callbacks for ``channel`` go here rather than to the local channel."""
        ...

    async def write_reply(self, reply: Message, inbound: Message) -> str:
        """Write the reply; return its id over there."""
        ...

    async def write_thread(
        self, thread: ThreadRecord, phase: Literal["start", "end"], inbound: Message
    ) -> None: ...

    async def read_session(self, agent: AgentSpec) -> str | None: ...

    async def queue_callback(self, callback: Inbound, fence: Fence) -> None:
        """R22a: a callback for a sender served there; written from a durable outbox
        (its row under the finishing turn's ``fence``, P11)."""
        ...

    async def defer_reply(self, reply: Message, thread: ThreadRecord, fence: Fence) -> None:
        """Keep retrying a reply that could not be written now (durable outbox)."""
        ...

    async def clear_session(self, agent: AgentSpec) -> None:
        """R27 there too (durable outbox)."""
        ...

    async def queue_notify(self, message: Message, fence: Fence) -> None:
        """mcp.md M17: a `notify` message, written there like a reply (durable outbox)."""
        ...


async def with_retry(
    write: Callable[[], Awaitable[T]],
    *,
    channel: str,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """R20: 3 attempts at most, 250 ms x attempt apart; the last error is raised.

    Any exception that is not a `DeliveryError` counts as transient without a
    status (a network library's error, a bug in a mirror): it is retried and
    then raised as a `DeliveryError`, so the caller has one thing to handle.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await write()
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # R25: a mirror's failure must not kill the turn
            error = DeliveryError(f"{type(exc).__name__}: {exc}")
        if not error.transient or not error.retry or attempt > OUTBOUND_MAX_RETRIES:
            raise error
        log.warning(
            "outbound write failed, retrying",
            extra={"channel": channel, "attempt": attempt, "error": str(error)},
        )
        if on_retry is not None:
            on_retry()
        await trio.sleep(OUTBOUND_BACKOFF_S * attempt)


class Mirrors:
    """Several mirrors as one (a vault channel linked to a Telegram chat writes a
    reply note and Telegram parts). Each write goes to every mirror serving the
    channel; a reply written by one is not written there again when R20 retries
    the lot, and the first failure that no retry can cure is the one raised."""

    def __init__(self, *mirrors: Mirror) -> None:
        self.mirrors = mirrors
        self._written: dict[str, dict[int, str]] = {}

    def _serving(self, channel: str) -> list[Mirror]:
        return [mirror for mirror in self.mirrors if mirror.serves(channel)]

    def serves(self, channel: str) -> bool:
        return bool(self._serving(channel))

    def takes_callbacks(self, channel: str) -> bool:
        return any(mirror.takes_callbacks(channel) for mirror in self.mirrors)

    async def write_reply(self, reply: Message, inbound: Message) -> str:
        written = self._written.setdefault(reply.id, {})
        errors: list[DeliveryError] = []
        for index, mirror in enumerate(self._serving(reply.channel)):
            if index in written:
                continue
            try:
                written[index] = await mirror.write_reply(reply, inbound)
            except DeliveryError as exc:
                errors.append(exc)
        if errors:
            raise next((e for e in errors if not e.transient or not e.retry), errors[0])
        del self._written[reply.id]
        return next(iter(written.values()), "")

    async def write_thread(
        self, thread: ThreadRecord, phase: Literal["start", "end"], inbound: Message
    ) -> None:
        for mirror in self._serving(thread.channel):
            await mirror.write_thread(thread, phase, inbound)

    async def read_session(self, agent: AgentSpec) -> str | None:
        for mirror in self._serving(agent.channel):
            session = await mirror.read_session(agent)
            if session:
                return session
        return None

    async def queue_callback(self, callback: Inbound, fence: Fence) -> None:
        for mirror in self.mirrors:
            if mirror.takes_callbacks(callback.channel):
                await mirror.queue_callback(callback, fence)
                return

    async def defer_reply(self, reply: Message, thread: ThreadRecord, fence: Fence) -> None:
        self._written.pop(reply.id, None)
        for mirror in self._serving(reply.channel):
            await mirror.defer_reply(reply, thread, fence)

    async def clear_session(self, agent: AgentSpec) -> None:
        for mirror in self._serving(agent.channel):
            await mirror.clear_session(agent)

    async def queue_notify(self, message: Message, fence: Fence) -> None:
        for mirror in self._serving(message.channel):
            await mirror.queue_notify(message, fence)
