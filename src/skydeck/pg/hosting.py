"""What `service.Service` needs to be one host of a PostgreSQL cluster, in one place.

The service stays the composition root; this module builds the parts it adds
for ``--store postgres://...`` (the store, the cluster loops, their metrics,
the event hub that relays turn events between hosts, P25)
and says what the host adds to `/health` (P26), `/metrics` (P27) and
`/api/cluster` (P28), so `service.py` only calls in at its few seams.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Gauge

from .. import __version__
from ..errors import StoreUnreachable
from ..store.postgres import PostgresStore, build_postgres
from . import metrics as pg_metrics
from .cluster import CHANNELS, REBALANCE_S, Cluster, ClusterMetrics
from .config import default_host_id
from .driver import Listener, Timeouts, conninfo, redact
from .ownership import HostInUse
from .relay import ClusterEvents
from .schema import SCHEMA_VERSION, SchemaError

if TYPE_CHECKING:
    from ..registry import Registry
    from ..service import Settings

#: Test hook (P12): no LISTEN, so every wake-up comes from the scan.
NO_LISTEN_ENV = "SKYDECK_TEST_NO_LISTEN"
#: Test hook (P13): seconds between rebalancing rounds (default `cluster.REBALANCE_S`),
#: so a test sees a joiner get its share without waiting half a minute.
REBALANCE_ENV = "SKYDECK_TEST_REBALANCE_S"
#: P4: how often a running host re-reads `meta.min_compatible`.
VERSION_CHECK_S = 60.0
#: Test hook (P4): that interval, shorter.
VERSION_CHECK_ENV = "SKYDECK_TEST_VERSION_CHECK_S"


@dataclass(slots=True)
class PgHost:
    """The store, the event hub, and (once the registry exists) the cluster loops."""

    settings: Settings
    store: PostgresStore
    metrics: ClusterMetrics
    events: ClusterEvents
    cluster: Cluster | None = None

    @classmethod
    def build(cls, settings: Settings, registry: CollectorRegistry, *, on_dropped: Any) -> PgHost:
        assert settings.store_url is not None
        metrics = ClusterMetrics.create(registry)
        store = build_postgres(
            settings.store_url,
            host_id=settings.host_id or default_host_id(settings.port),
            ttl_s=settings.lease_ttl_s,
            schema_name=settings.store_schema,
            readers=settings.store_pool,
            advertise_url=settings.advertise_url or settings.public_url,
            version=__version__,
            on_dropped=on_dropped,
            on_fenced=metrics.fenced.inc,
        )
        return cls(settings, store, metrics, ClusterEvents(store, registry=registry))

    def attach(self, registry: Registry, metrics_registry: CollectorRegistry) -> Cluster:
        """The cluster loops, driving ``registry`` (a `ChannelHost`)."""
        s = self.settings
        self.events.attach(registry.owned)
        assert s.store_url is not None
        listener = Listener(
            conninfo(
                s.store_url,
                application_name=f"skydeck/{self.store.host}/joining",
                schema=s.store_schema,
                timeouts=Timeouts.for_ttl(s.lease_ttl_s),
            ),
            CHANNELS,
        )
        self.cluster = Cluster(
            self.store,
            listener,
            registry,
            scan_interval_s=s.scan_interval_s,
            max_channels=s.max_channels,
            fast_failover=s.fast_failover,
            listen=os.environ.get(NO_LISTEN_ENV) != "1",
            rebalance_s=float(os.environ.get(REBALANCE_ENV, REBALANCE_S)),
            workspaces_shared=s.workspaces_shared,
            metrics=self.metrics,
            relay=self.events,
        )
        owned = Gauge(
            "skydeck_owned_channels",
            "Channels this host holds the lease of",
            registry=metrics_registry,
        )
        owned.set_function(lambda: len(registry.owned()))
        pg_metrics.watch(metrics_registry, self.store, self.cluster)
        return self.cluster

    async def open(self) -> None:
        """P3, P4, P5: migrate, join, connect; before HTTP is bound."""
        s = self.settings
        await self.store.open(wait_s=s.store_wait_s, migrate=s.migrate)

    def start_failure(self, exc: BaseException) -> str | None:
        """One sentence for a start that cannot go on (exit 2), or None."""
        url = redact(self.settings.store_url or "")
        if isinstance(exc, StoreUnreachable):
            return (
                f"cannot reach the store at {url}: {exc.reason} "
                "(check --store / SKYDECK_STORE_URL, or give --store-wait)"
            )
        if isinstance(exc, (SchemaError, HostInUse)):
            return str(exc)
        return None

    async def health(self) -> dict[str, Any]:
        """P26 (and P6): what `/health` adds for this host.

        While the store is unreachable nothing is read from it (a read would only
        wait for its timeout): ``hosts_alive`` is unknown, and ``owners`` names
        this host for what it still runs and no one for the rest.
        """
        ownership = self.store.ownership
        cluster = self.cluster
        owned = cluster.host.owned() if cluster is not None else {}
        store: dict[str, Any] = {"kind": "postgres", "url": redact(self.settings.store_url or "")}
        hosts_alive: int | None = None
        if self.store.unreachable_since is None:
            with contextlib.suppress(StoreUnreachable):
                hosts_alive = sum(1 for host in await ownership.hosts() if host.alive)
        owners = await self.owners()
        since = self.store.unreachable_since  # a failed read above counts too
        if since is not None:
            store |= {"state": "unreachable", "since": since}
        return {
            "store": store,
            "host": {
                "id": ownership.host_id,
                "incarnation": ownership.incarnation,
                "owned": len(owned),
                "roles": sorted(cluster.roles) if cluster is not None else [],
                "lease_ttl_s": ownership.ttl_s,
                "heartbeat_age_s": round(cluster.heartbeat_age_s(), 3) if cluster else None,
                "hosts_alive": hosts_alive,
            },
            "owners": owners,
        }

    async def watch_compatibility(self, too_old: Callable[[str], None]) -> None:
        """P4: every `VERSION_CHECK_S`, re-read the oldest version allowed to serve
        the store; once a newer skydeck has raised it past this one, say why to
        ``too_old`` (which drains, R29, and exits 3) and stop watching."""
        interval = float(os.environ.get(VERSION_CHECK_ENV, VERSION_CHECK_S))
        while True:
            await trio.sleep(interval)
            try:
                needed = await self.store.min_compatible()
            except StoreUnreachable:
                continue  # P6 handles the outage; look again next time
            if needed > SCHEMA_VERSION:
                too_old(
                    f"the store now needs skydeck with schema {needed} or later "
                    f"(this is {SCHEMA_VERSION}); upgrade skydeck"
                )
                return

    async def owners(self) -> dict[str, str | None]:
        """Channel with an agent -> the live host holding its lease (P26, P28).
        While the store is unreachable: this host for what it still runs (a read
        would only wait for its timeout)."""
        owned = self.cluster.host.owned() if self.cluster is not None else {}
        if self.store.unreachable_since is None:
            with contextlib.suppress(StoreUnreachable):
                return await self.store.channel_owners()
        return dict.fromkeys(owned, self.store.ownership.host_id)

    async def view(self) -> dict[str, Any]:
        """P28: `GET /api/cluster`."""
        hosts = await self.store.ownership.hosts()
        owned = sum(host.owned for host in hosts if host.alive)
        channels, _ = await self.store.cluster_size()
        return {
            "hosts": [host.to_json() for host in hosts],
            "channels": {"owned": owned, "unowned": max(channels - owned, 0)},
        }
