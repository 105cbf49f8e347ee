"""Prometheus metrics (``GET /metrics``).

One `CollectorRegistry` per service, not the process-global default, so two
daemons in one test process never share counters. Queue depth and buffered
counts are read at scrape time from the registry itself (a custom collector),
so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .ledger import MessageState
from .model import Accepted

TURN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class _QueueCollector(Collector):
    def __init__(self, depths: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._depths = depths

    def collect(self) -> Iterable[Metric]:
        queued = GaugeMetricFamily(
            "skydeck_queue_depth", "Messages waiting per agent (R5, R10)", labels=["agent"]
        )
        for agent, depth in self._depths():
            queued.add_metric([agent], depth)
        yield queued


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: Read before each render: values only an await can get (the store's).
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        self.accepted = Counter(
            "skydeck_messages_accepted",
            "Inbound messages acknowledged, by the state they were acknowledged in",
            ["state"],
            registry=self.registry,
        )
        self.final = Counter(
            "skydeck_messages_final",
            "Inbound messages that reached a terminal state",
            ["state"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "skydeck_messages_dropped",
            "Buffered messages marked dropped over the per-channel cap (R7), "
            "by a new message or by a deregister",
            registry=self.registry,
        )
        self.turns = Counter(
            "skydeck_turns", "Turns by outcome", ["outcome"], registry=self.registry
        )
        self.turn_seconds = Histogram(
            "skydeck_turn_duration_seconds",
            "Wall time of a turn",
            buckets=TURN_BUCKETS,
            registry=self.registry,
        )
        self.backend_retries = Counter(
            "skydeck_backend_retries", "Backend attempts retried (R33)", registry=self.registry
        )
        self.outbound_retries = Counter(
            "skydeck_outbound_retries", "Outbound writes retried (R20)", registry=self.registry
        )
        self.job_slots = Counter(
            "skydeck_job_slots",
            "Cron slots, by outcome (fired, skipped because the previous run was open)",
            ["outcome"],
            registry=self.registry,
        )
        self.claude_warm_spawns = Counter(
            "skydeck_claude_warm_spawns",
            "Warm claude processes started, by why the agent needed a new one (W2-W14)",
            ["reason"],
            registry=self.registry,
        )
        self.mcp_tool_calls = Counter(
            "skydeck_mcp_tool_calls",
            "MCP tool calls, by tool and outcome (ok, error) (mcp.md M27)",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.claude_cold_fallbacks = Counter(
            "skydeck_claude_cold_fallbacks",
            "Single-threaded claude turn attempts run cold, by reason (W6, W10)",
            ["reason"],
            registry=self.registry,
        )

        self.sandbox_egress_denied = Counter(
            "skydeck_sandbox_egress_denied",
            "Sandbox gateway requests refused (S17 d), by agent",
            ["agent"],
            registry=self.registry,
        )

    def watch_sandboxes(self, count: Callable[[], int]) -> None:
        gauge = Gauge(
            "skydeck_sandbox_processes", "Sandboxed processes alive (S23)", registry=self.registry
        )
        gauge.set_function(count)

    def watch_mcp_sessions(self, count: Callable[[], int]) -> None:
        gauge = Gauge(
            "skydeck_mcp_sessions", "Live MCP sessions (mcp.md M4)", registry=self.registry
        )
        gauge.set_function(count)

    def on_mcp_call(self, tool: str, outcome: str) -> None:
        self.mcp_tool_calls.labels(tool, outcome).inc()

    def watch_queues(self, depths: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Queue depth per agent, read from the registry at each scrape."""
        self.registry.register(_QueueCollector(depths))

    def watch_claude_warm(self, count: Callable[[], int]) -> None:
        gauge = Gauge(
            "skydeck_claude_warm_processes",
            "Warm claude processes alive (closing ones included)",
            registry=self.registry,
        )
        gauge.set_function(count)

    def watch_outbox(self, pending: Callable[[], Awaitable[int]]) -> None:
        """The outbox depth is the store's to count, and store reads are async:
        it is read as the metrics are rendered."""
        gauge = Gauge(
            "skydeck_vault_outbox", "Vault writes waiting to be retried", registry=self.registry
        )

        async def refresh() -> None:
            gauge.set(await pending())

        self._refreshers.append(refresh)

    def on_accepted(self, accepted: Accepted) -> None:
        self.accepted.labels(accepted.state).inc()

    def on_finished(self, outcome: str, state: MessageState, seconds: float, messages: int) -> None:
        self.turns.labels(outcome).inc()
        self.turn_seconds.observe(seconds)
        self.final.labels(state.value).inc(messages)

    async def render(self) -> bytes:
        for refresh in self._refreshers:
            await refresh()
        return generate_latest(self.registry)
