"""The `/metrics` series of one PostgreSQL host that are read, not counted (P27).

`ClusterMetrics` (cluster.py) counts what the cluster loops do; this module adds
what is a value at scrape time (heartbeat age, live hosts, the sessions' batch
retries) and the two timings the store measures as it writes, so every series
P27 lists exists on a PostgreSQL host, each with its labels, from the first scrape.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..store.postgres import PostgresStore
from .cluster import Cluster

#: P27's reasons a batch is run again: deadlock and serialization failure (40P01,
#: 40001, re-run once, P18) and a connection lost since the last call (a read,
#: re-run once on a fresh connection).
RETRY_REASONS = ("deadlock", "serialization", "connection")
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
WAIT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _RetriesCollector(Collector):
    """`skydeck_store_retries_total{reason}`: the sessions keep the counts."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "skydeck_store_retries",
            "Store calls run again, by reason (deadlock, serialization, connection)",
            labels=["reason"],
        )
        for reason in RETRY_REASONS:
            family.add_metric(
                [reason], sum(s.retries.get(reason, 0) for s in self._store.sessions())
            )
        yield family


def watch(registry: CollectorRegistry, store: PostgresStore, cluster: Cluster) -> None:
    """Register the read series, and give the store its two timing hooks."""
    Gauge(
        "skydeck_heartbeat_age_seconds",
        "Seconds since the last successful heartbeat was sent (P8)",
        registry=registry,
    ).set_function(cluster.heartbeat_age_s)
    Gauge(
        "skydeck_cluster_hosts",
        "Live hosts, as this host's last scan counted them",
        registry=registry,
    ).set_function(lambda: cluster.hosts_alive)
    store.on_batch = Histogram(
        "skydeck_store_batch_seconds",
        "Time one group-commit batch took, its thread hop and COMMIT included (P18)",
        buckets=BATCH_BUCKETS,
        registry=registry,
    ).observe
    store.on_wait = Histogram(
        "skydeck_message_wait_seconds",
        "From an inbound message's commit to its first turn start, on the database clock",
        buckets=WAIT_BUCKETS,
        registry=registry,
    ).observe
    registry.register(_RetriesCollector(store))
