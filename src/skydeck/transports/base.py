"""The outbound seam and its retry policy (R20).

The local store always keeps a reply first; a `ReplySink` is an extra place it
must also land (a vault note, a chat message). Sinks raise `DeliveryError`
with the HTTP status when there was one, which is what decides whether a retry
can help.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from ..model import Message

log = logging.getLogger(__name__)

OUTBOUND_MAX_RETRIES = 2
OUTBOUND_BACKOFF_S = 0.25


class DeliveryError(Exception):
    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} ({status})")
        self.status = status

    @property
    def transient(self) -> bool:
        """No status (network error, timeout) or a 5xx may pass; a 4xx will not."""
        return self.status is None or 500 <= self.status <= 599


class ReplySink(Protocol):
    async def write_reply(self, reply: Message) -> None: ...


async def deliver_with_retry(
    sink: ReplySink, reply: Message, *, on_retry: Callable[[], None] | None = None
) -> str | None:
    """Write ``reply`` to ``sink``: 3 attempts at most, 250 ms × attempt apart.

    Returns None when delivered, else the last error as text.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            await sink.write_reply(reply)
            return None
        except DeliveryError as exc:
            error, transient = str(exc), exc.transient
        except Exception as exc:  # a sink bug must not kill the turn (R25)
            error, transient = f"{type(exc).__name__}: {exc}", True
        if not transient or attempt > OUTBOUND_MAX_RETRIES:
            return error
        log.warning(
            "outbound write failed, retrying",
            extra={"channel": reply.channel, "attempt": attempt, "error": error},
        )
        if on_retry is not None:
            on_retry()
        await trio.sleep(OUTBOUND_BACKOFF_S * attempt)
