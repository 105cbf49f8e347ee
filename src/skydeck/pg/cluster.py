"""One host's part in the cluster: heartbeats, claims, wake-ups (multi-host.md §3, §4).

`Cluster.run` keeps three loops beside the registry:

- **heartbeat** every TTL/4 (P8). A heartbeat with no row back, or the local
  deadline passing first (P10), is `lease lost`: every channel task is
  cancelled as R29's forced stop does, the leases are forgotten, and the host
  rejoins as a new incarnation and claims afresh, without a restart.
- **scan** every ``--scan-interval``, and at once when poked (P12): expire
  hosts with no session (P16), then claim up to the room the share rule gives
  (P13), orphans even above the share, never above ``--max-channels``.
- **listen** (P12, P19, P22): `skydeck_wake` for a channel this host owns
  wakes its task (it reads open messages by state); for another channel, and
  on `skydeck_lease`, it pokes the scan; `skydeck_defs` re-reads definitions.
  On every (re)connect it scans, since notifications sent meanwhile are gone.
  `skydeck_events` and `skydeck_watch` go to the event relay (P25,
  `pg/relay.py`), in arrival order.

Whatever the registry does with a channel goes through `ChannelHost`, so
this module decides *when*, and the registry alone runs turns.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter

from ..errors import FencedOut, StoreUnreachable
from ..store import Fence
from ..store.postgres import PostgresStore
from .driver import Listener
from .ownership import ROLE_PREFIX, Claimed, HostInUse, Lease, NotJoined, application_name
from .relay import EVENTS, WATCH, ClusterEvents

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

CHANNELS = ("skydeck_wake", "skydeck_lease", "skydeck_defs", EVENTS, WATCH)
#: P13: how often an over-share host gives idle channels back, and at most how many.
REBALANCE_S = 30.0
REBALANCE_BATCH = 10
#: P22: every host re-reads `defs_version` this often, bounding a missed notification.
DEFS_POLL_S = 5.0
REJOIN_BACKOFF_S = (0.2, 2.0)


class ChannelHost(Protocol):
    """What the cluster asks of the registry."""

    def owned(self) -> dict[str, Fence]:
        """Channel -> the fence its running task holds."""
        ...

    async def adopt(self, channel: str, fence: Fence, interrupted_by: str | None = None) -> None:
        """Run the channel's task under ``fence``, replaying its open messages (P15);
        ``interrupted_by``: the dead owner, whose `working` messages are announced
        as retried."""
        ...

    async def wake(self, channel: str) -> None:
        """Read the channel's open messages by state; feed the task those it lacks (P19)."""
        ...

    async def abandon(self, channels: Sequence[str], reason: str) -> None:
        """Cancel these channel tasks as R29's forced stop does (messages stay open)."""
        ...

    def idle_movable(self, shared: bool) -> list[str]:
        """Owned channels with nothing running or queued that may move (P13):
        any with workspaces on shared storage (``shared``), else echo ones."""
        ...

    def idle(self) -> list[str]:
        """Owned channels with nothing running or queued in memory."""
        ...

    async def definitions_changed(self) -> None:
        """Re-read agents and jobs from the store (P22)."""
        ...


def share(channels: int, hosts: int) -> tuple[int, int]:
    """P13: (share, slack) for ``channels`` with agents over ``hosts`` live hosts."""
    fair = math.ceil(channels / max(hosts, 1))
    return fair, max(1, math.ceil(fair / 10))


def keep(fair: int, slack: int, owned: Sequence[int]) -> int:
    """P13: how many channels a rebalancing host keeps, given what each live host owns.

    share + slack, as P13 says, while every host is within share - slack; but once
    one holds fewer (a joiner), share itself. Releasing only down to share + slack
    leaves a joiner short (36 channels on 4 hosts: 10, 10, 10 and 6, against a
    share of 9 +- 1), so the spec's "converge to within share +- slack" needs it.
    """
    if owned and min(owned) < fair - slack:
        return fair
    return fair + slack


@dataclass(slots=True)
class ClusterMetrics:
    """P27's counters of ownership (the rest read the cluster at scrape time)."""

    claims: Counter
    releases: Counter
    lost: Counter
    heartbeats: Counter
    fenced: Counter
    reconnects: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ClusterMetrics:
        metrics = cls._counters(registry)
        # P27: every labelled series shows from the first scrape, at 0.
        for reason in ("unowned", "orphan", "released", "rebalance"):
            metrics.claims.labels(reason)
        for reason in ("rebalance", "shutdown", "removed"):
            metrics.releases.labels(reason)
        for outcome in ("ok", "lost", "error"):
            metrics.heartbeats.labels(outcome)
        return metrics

    @classmethod
    def _counters(cls, registry: CollectorRegistry) -> ClusterMetrics:
        return cls(
            claims=Counter(
                "skydeck_lease_claims",
                "Leases claimed, by reason (unowned, orphan, released, rebalance)",
                ["reason"],
                registry=registry,
            ),
            releases=Counter(
                "skydeck_lease_releases",
                "Leases released, by reason (rebalance, shutdown, removed)",
                ["reason"],
                registry=registry,
            ),
            lost=Counter(
                "skydeck_lease_lost", "Incarnations that lost their leases (P10)", registry=registry
            ),
            heartbeats=Counter(
                "skydeck_heartbeats",
                "Lease renewals, by outcome (ok, lost, error)",
                ["outcome"],
                registry=registry,
            ),
            fenced=Counter(
                "skydeck_fenced_writes", "Turn writes refused by the fence (P11)", registry=registry
            ),
            reconnects=Counter(
                "skydeck_listener_reconnects",
                "LISTEN sessions re-opened (notifications may have been missed)",
                registry=registry,
            ),
        )


class Cluster:
    """The loops of one host in a PostgreSQL cluster (see the module docstring)."""

    def __init__(
        self,
        store: PostgresStore,
        listener: Listener,
        host: ChannelHost,
        *,
        scan_interval_s: float = 1.0,
        max_channels: int = 0,
        fast_failover: bool = True,
        listen: bool = True,
        rebalance_s: float = REBALANCE_S,
        workspaces_shared: bool = False,
        metrics: ClusterMetrics | None = None,
        relay: ClusterEvents | None = None,
    ) -> None:
        self.store = store
        self.ownership = store.ownership
        self.listener = listener
        self.host = host
        self.scan_interval_s = scan_interval_s
        self.max_channels = max_channels
        self.fast_failover = fast_failover
        self.listen = listen
        self.rebalance_s = rebalance_s
        self.workspaces_shared = workspaces_shared
        self.metrics = metrics
        self.relay = relay
        #: Roles this incarnation holds (P17): role name -> fence.
        self.roles: dict[str, Fence] = {}
        #: Told the roles after each change (`roles.Roles.held`); False
        #: `claim_roles`: stopping (P14), so none is taken again.
        self.on_roles: Callable[[dict[str, Fence]], None] | None = None
        self.claim_roles = True
        #: Also told when definitions changed (the scheduler's jobs, P22).
        self.on_definitions: list[Callable[[], Awaitable[None]]] = []
        self.lost_count = 0
        #: Live hosts as the last scan counted them (P27 `skydeck_cluster_hosts`).
        self.hosts_alive = 1
        self.heartbeat_sent_at = time.monotonic()
        self._poke = trio.Event()
        self._defs_version = -1

    # -- lifetime -----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim a first round, then keep heartbeating, scanning and listening."""
        async with trio.open_nursery() as nursery:
            if self.relay is not None:  # P25: watched channels known before the first claim
                await nursery.start(self.relay.run, name="cluster-relay")
            await self._scan()
            nursery.start_soon(self._heartbeats, name="cluster-heartbeat")
            nursery.start_soon(self._scans, name="cluster-scan")
            nursery.start_soon(self._defs_poll, name="cluster-defs")
            nursery.start_soon(self._rebalances, name="cluster-rebalance")
            if self.listen:
                nursery.start_soon(self._listen, name="cluster-listen")
            task_status.started()
            await trio.sleep_forever()

    async def leave(self) -> None:
        """P14's last step, after every channel task was stopped: release all at once."""
        with trio.CancelScope(shield=True):
            try:
                await self.ownership.leave()
                if self.metrics is not None:
                    self.metrics.releases.labels("shutdown").inc()
            except StoreUnreachable as exc:
                log.warning("leases not released; they expire", extra={"reason": exc.reason})

    def heartbeat_age_s(self) -> float:
        """Seconds since the last successful heartbeat was sent (P26)."""
        return time.monotonic() - self.heartbeat_sent_at

    def poke(self) -> None:
        """Scan now rather than at the next interval (a release, an unowned wake-up)."""
        self._poke.set()

    # -- heartbeat and self-fencing (P8, P10) ---------------------------------------

    async def _heartbeats(self) -> None:
        """Every TTL/4, and never sleeping past the local deadline (P10).

        Past the deadline every fenced write already refuses itself (the store
        checks `PgOwnership.alive` before sending); the leases are given up on
        the store's word: a heartbeat with no row back, or none answered in time.
        """
        period = self.ownership.ttl_s / 4
        while True:
            left = self.ownership.deadline() - time.monotonic()
            await trio.sleep(max(0.0, min(period, left)))
            try:
                sent = time.monotonic()
                alive = await self.ownership.heartbeat()
            except StoreUnreachable as exc:
                self.store._failed(exc.reason)
                self._count_heartbeat("error")
                if time.monotonic() >= self.ownership.deadline():
                    await self._lose("the store did not answer before the local deadline")
                continue
            if not alive:
                self._count_heartbeat("lost")
                await self._lose("the heartbeat found the host row expired")
                continue
            self.heartbeat_sent_at = sent
            self.store.reached()
            self._count_heartbeat("ok")

    def _count_heartbeat(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.heartbeats.labels(outcome).inc()

    async def _lose(self, why: str) -> None:
        """P10: stop every channel task, forget the leases, rejoin, claim afresh."""
        owned = self.host.owned()
        log.warning(
            "lease lost",
            extra={
                "incarnation": self.ownership.incarnation,
                "owned": len(owned),
                "why": why,
            },
        )
        self.lost_count += 1
        if self.metrics is not None:
            self.metrics.lost.inc()
        self.roles.clear()
        self._roles_changed()
        await self.host.abandon(list(owned), "lease lost")
        self.ownership.forget()
        await self._rejoin()
        self.poke()

    async def _rejoin(self) -> None:
        """Join as a new incarnation, then name the sessions after it. A join that
        committed is not made again when only the renaming failed (a session the
        outage broke): the scan may already claim under that incarnation, and a
        second join would void those leases behind the tasks running them (its
        own sessions would also make it `HostInUse` until the row expired)."""
        delay = REJOIN_BACKOFF_S[0]
        while True:
            try:
                if self.ownership.incarnation is None:
                    await self.ownership.join()
                await self._rename_sessions()
                self.store.reached()
                return
            except (StoreUnreachable, HostInUse) as exc:
                log.warning("rejoin failed; retrying", extra={"reason": str(exc)})
            await trio.sleep(delay)
            delay = min(delay * 2, REJOIN_BACKOFF_S[1])

    async def _rename_sessions(self) -> None:
        """P3: the sessions of a new incarnation carry its application_name."""
        assert self.ownership.incarnation is not None
        name = application_name(self.ownership.host_id, self.ownership.incarnation)
        await self.store.rename_sessions(name)

    # -- claims (P12, P13, P16, P17) ------------------------------------------------

    async def _scans(self) -> None:
        while True:
            with trio.move_on_after(self.scan_interval_s):
                await self._poke.wait()
            self._poke = trio.Event()
            await self._scan()

    async def _scan(self) -> None:
        if not self.ownership.alive():
            return  # past the deadline nothing is claimed; the heartbeat decides the rest
        try:
            if self.fast_failover:
                await self.ownership.expire_dead()
            await self._claim_roles()
            await self._claim_channels()
            await self._catch_up()
        except StoreUnreachable as exc:
            self.store._failed(exc.reason)
        except NotJoined:
            pass  # the lease was lost during the scan: the rejoin scans again

    async def _claim_channels(self) -> None:
        owned = len(self.host.owned())
        channels, hosts = await self.store.cluster_size()
        self.hosts_alive = hosts
        fair, slack = share(channels, hosts)
        cap = self.max_channels if self.max_channels > 0 else math.inf
        room = int(min(fair + slack, cap) - owned)
        claimed: list[Claimed] = []
        if room > 0:
            claimed += await self.ownership.claim(room)
        orphan_room = int(min(cap - owned - len(claimed), 1_000_000))
        if orphan_room > 0:
            claimed += await self.ownership.claim(orphan_room, orphans=True)
        for item in claimed:
            if self.metrics is not None:
                self.metrics.claims.labels(item.reason).inc()
        dead_owner = {item.lease.name: item.previous_owner for item in claimed}
        # Every lease the store says is ours runs here: the new ones, and any whose
        # adoption a store failure cut short last time.
        running = self.host.owned()
        adopting = [
            lease
            for lease in await self.ownership.owned()
            if not lease.name.startswith(ROLE_PREFIX) and lease.name not in running
        ]
        # All at once: each adoption's replay is a store write, and together they
        # share one group commit. One after another, a failover of 100 channels
        # waited for 100 commits (PB2: 2.4 s p99 after SIGTERM at fsync=on).
        failures: list[StoreUnreachable | NotJoined] = []
        async with trio.open_nursery() as nursery:
            for lease in adopting:
                nursery.start_soon(self._adopt, lease, dead_owner.get(lease.name), failures)
        if failures:
            raise failures[0]

    async def _adopt(
        self, lease: Lease, dead_owner: str | None, failures: list[StoreUnreachable | NotJoined]
    ) -> None:
        try:
            try:
                await self.host.adopt(
                    lease.name, self.store.fence(lease.name, lease.token), dead_owner
                )
            except FencedOut:
                log.warning("claimed channel lost at once", extra={"channel": lease.name})
            if lease.name not in self.host.owned():  # its agent is gone: let the lease go
                await self.ownership.release([lease.name])
                if self.metrics is not None:
                    self.metrics.releases.labels("removed").inc()
        except (StoreUnreachable, NotJoined) as exc:  # the scan's caller handles the first
            failures.append(exc)

    async def _catch_up(self) -> None:
        """P12: an idle owned channel with queued messages in the store missed its
        wake-up (sent while nobody listened, or no LISTEN at all): wake it now, so
        every message is served within one scan of its commit."""
        idle = self.host.idle()
        if idle:
            for channel in await self.store.queued_channels(idle):
                await self.host.wake(channel)

    async def _rebalances(self) -> None:
        """P13: a host over share + slack gives idle movable channels back, at most
        `REBALANCE_BATCH` a round, so owned counts converge to share +- slack
        wherever channels can move. A live owner's channel is never taken back."""
        while True:
            await trio.sleep(self.rebalance_s)
            if not self.ownership.alive():
                continue
            try:
                channels, hosts = await self.store.cluster_size()
                fair, slack = share(channels, hosts)
                alive = [host.owned for host in await self.ownership.hosts() if host.alive]
                over = len(self.host.owned()) - keep(fair, slack, alive)
                if over <= 0:
                    continue
                give = self.host.idle_movable(self.workspaces_shared)[: min(over, REBALANCE_BATCH)]
                await self.host.abandon(give, "rebalance")
                await self.ownership.release(give)
            except (StoreUnreachable, NotJoined):
                continue
            if self.metrics is not None:
                self.metrics.releases.labels("rebalance").inc(len(give))
            log.info("channels released to rebalance", extra={"released": len(give)})

    async def _claim_roles(self) -> None:
        if not self.claim_roles:
            return
        claimed = await self.ownership.claim(3, roles=True)
        for item in claimed:
            self.roles[item.lease.name] = self.store.fence(item.lease.name, item.lease.token)
            log.info("role taken", extra={"role": item.lease.name, "token": item.lease.token})
        if claimed:
            self._roles_changed()

    def _roles_changed(self) -> None:
        if self.on_roles is not None:
            self.on_roles(dict(self.roles))

    async def release_roles(self) -> None:
        """P14's first step: stop the role tasks, claim no role again, and let
        the others take them (a task's write still in flight holds its lease
        row, so the release commits after it; see `roles.Roles.held`)."""
        self.claim_roles = False
        names = sorted(self.roles)
        self.roles.clear()
        self._roles_changed()
        try:
            await self.ownership.release(names)
        except (StoreUnreachable, NotJoined) as exc:
            log.warning("roles not released; they expire", extra={"reason": str(exc)})

    # -- notifications (P12, P19, P22) ------------------------------------------------

    async def _listen(self) -> None:
        delay = REJOIN_BACKOFF_S[0]
        while True:
            try:
                if self.ownership.incarnation is not None:
                    self.listener.rename(
                        application_name(self.ownership.host_id, self.ownership.incarnation)
                    )
                await self.listener.connect()
                if self.listener.reconnects > 0 and self.metrics is not None:
                    self.metrics.reconnects.inc()
                delay = REJOIN_BACKOFF_S[0]
                self.poke()  # whatever was notified while nobody listened is gone
                if self.relay is not None:
                    self.relay.poke()
                async with trio.open_nursery() as handlers:
                    while True:
                        try:
                            notes = await self.listener.receive()
                        except StoreUnreachable as exc:
                            log.warning("listener lost; reconnecting", extra={"reason": exc.reason})
                            break
                        batch = {(c, p) for c, p in notes if c not in (EVENTS, WATCH)}
                        if self.relay is not None:  # in order: a turn's events keep theirs
                            for channel, payload in notes:
                                if channel in (EVENTS, WATCH):
                                    self.relay.received(channel, payload)
                        # A wake-up reads the store: each runs on its own, so one
                        # channel's read never delays another's (the registry
                        # coalesces a channel's wake-ups).
                        for channel, payload in batch:
                            handlers.start_soon(self._notified, channel, payload)
            except StoreUnreachable as exc:
                log.warning("listener lost; reconnecting", extra={"reason": exc.reason})
            await trio.sleep(delay)
            delay = min(delay * 2, REJOIN_BACKOFF_S[1])

    async def _notified(self, channel: str, payload: str) -> None:
        try:
            await self._handle(channel, payload)
        except StoreUnreachable as exc:  # the next scan and the defs poll catch up
            log.warning("notification not handled", extra={"reason": exc.reason})

    async def _handle(self, channel: str, payload: str) -> None:
        if channel == "skydeck_wake":
            if payload in self.host.owned():
                await self.host.wake(payload)
            else:
                self.poke()
        elif channel == "skydeck_lease":
            self.poke()
        elif channel == "skydeck_defs":
            await self._definitions_changed()

    async def _defs_poll(self) -> None:
        while True:
            await trio.sleep(DEFS_POLL_S)
            try:
                version = await self.store.defs_version()
            except StoreUnreachable:
                continue
            if version != self._defs_version:
                if self._defs_version >= 0:
                    await self._definitions_changed()
                self._defs_version = version

    async def _definitions_changed(self) -> None:
        await self.host.definitions_changed()
        for listener in self.on_definitions:
            await listener()

    def role(self, name: str) -> Fence | None:
        """The fence of a cluster role this incarnation holds (P17), if any."""
        return self.roles.get(f"{ROLE_PREFIX}{name}")
