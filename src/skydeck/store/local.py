"""`Ownership` and `Notifier` for a store only one host uses (the embedded SQLite one).

multi-host.md §7: with one host, ownership and notification are local. The
host owns every channel with an agent, under token 0 (`Fence.local`), for
good: its heartbeat never fails and its deadline never passes, so nothing is
ever fenced. Signals stay in memory: a `wake` hands the channel to this
host's listener, and events relayed for a watched channel come back to it.

These keep the same contract as the PostgreSQL versions (tests/
test_store_contract.py runs both with the same assertions), so code written
against the seam behaves the same on one host as on several; the only
differences are the ones the contract allows: the token and the incarnation
stay 0 instead of rising, and there are never other hosts to expire.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence

import trio

from ..model import TurnEvent
from . import (
    LOCAL_HOST,
    Claimed,
    ClaimReason,
    Fence,
    HostInfo,
    Incarnation,
    Lease,
    NotJoined,
    Signal,
    Store,
)

#: The embedded store's one token and incarnation (`Fence.local`).
LOCAL_TOKEN = 0


class LocalNotifier:
    """Signals in memory, for this host's one listener.

    Wake-ups of one channel coalesce until the listener takes one (as identical
    notifications of one commit do on PostgreSQL), so a burst of posts to a busy
    channel costs one read of its open messages, and memory stays bounded.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Signal](math.inf)
        self._waking: set[str] = set()
        self._watched: set[str] = set()

    async def wake(self, channel: str) -> None:
        if channel not in self._waking:
            self._waking.add(channel)
            self._send.send_nowait(Signal("wake", channel))

    async def listen(self) -> AsyncGenerator[Signal, None]:
        yield Signal("lease")  # as a (re)connected listener does: scan first
        async for signal in self._receive:
            if signal.kind == "wake":
                self._waking.discard(signal.name)
            yield signal

    async def watch(self, channel: str) -> None:
        self._watched.add(channel)
        self._send.send_nowait(Signal("watch", channel))

    async def relay(self, channel: str, event: TurnEvent, fence: Fence) -> None:
        if channel in self._watched:  # an unwatched channel's events go nowhere (P25)
            self._send.send_nowait(Signal("event", channel, event, fence.token))

    def lease_released(self) -> None:
        """What a release tells the listener (PostgreSQL: ``NOTIFY skydeck_lease``)."""
        self._send.send_nowait(Signal("lease", LOCAL_HOST))


class LocalOwnership:
    """The only host of ``store``: every channel with an agent is claimable by
    it, under token 0, and stays its own until released."""

    def __init__(
        self,
        store: Store,
        *,
        notifier: LocalNotifier | None = None,
        url: str | None = None,
        version: str | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.url = url
        self.version = version
        self.host_id = LOCAL_HOST
        self.incarnation: int | None = None
        self._joined_once = False
        self._held: set[str] = set()
        self._released: set[str] = set()

    def _check_joined(self) -> None:
        if self.incarnation is None:
            raise NotJoined(f"host {self.host_id} has not joined the store")

    async def join(self) -> int:
        self.incarnation = LOCAL_TOKEN
        self._joined_once = True
        return self.incarnation

    async def heartbeat(self) -> bool:
        self._check_joined()
        return True

    async def claim(self, room: int, wanted: Sequence[str] | None = None) -> list[Claimed]:
        if room <= 0:
            return []
        self._check_joined()
        channels = sorted({agent.channel for agent in await self.store.list_agents()})
        if wanted is not None:
            names = set(wanted)
            channels = [channel for channel in channels if channel in names]
        claimed = []
        for channel in [c for c in channels if c not in self._held][:room]:
            reason: ClaimReason = "released" if channel in self._released else "unowned"
            self._held.add(channel)
            claimed.append(Claimed(Lease(channel, LOCAL_TOKEN), reason, None, None))
        return claimed

    async def release(self, names: Sequence[str]) -> int:
        if not names:
            return 0
        self._check_joined()
        released = self._held & set(names)
        self._held -= released
        self._released |= released
        if self.notifier is not None:
            self.notifier.lease_released()
        return len(released)

    async def leave(self) -> None:
        if self.incarnation is None:
            return
        await self.release(sorted(self._held))
        self.incarnation = None

    def deadline(self) -> float:
        return math.inf if self.incarnation is not None else -math.inf

    async def hosts(self) -> list[HostInfo]:
        if not self._joined_once:
            return []
        return [
            HostInfo(
                id=self.host_id,
                incarnation=LOCAL_TOKEN,
                url=self.url,
                alive=self.incarnation is not None,
                owned=len(self._held),
                heartbeat_age_s=0.0,
                version=self.version,
            )
        ]

    async def expire_dead(self) -> list[Incarnation]:
        self._check_joined()
        return []  # there is no other host
