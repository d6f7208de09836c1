"""Every metric, defined once; the registry is injected so each app (and test) has its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "router_requests",
            "Requests answered, by client, model (alias or upstream id), provider and status.",
            ["client", "model", "provider", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "router_request_duration_seconds",
            "Whole request time, by the provider that answered.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "router_upstream_duration_seconds",
            "Time to the upstream's first byte.",
            ["provider", "key"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.failovers = Counter(
            "router_failovers",
            "Moves from one key or route to the next, by reason (classification outcome).",
            ["from_provider", "to_provider", "reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "router_upstream_errors",
            "Upstream answers other than success, by the classification row that matched.",
            ["provider", "key", "kind"],
            registry=registry,
        )
        self.fallback_requests = Counter(
            "router_fallback_requests",
            "Requests served by a route other than the model's first.",
            ["provider"],
            registry=registry,
        )
        self.inflight = Gauge(
            "router_inflight_requests", "Requests being handled.", registry=registry
        )
        self.stream_aborts = Counter(
            "router_stream_aborts",
            "Streams that ended early: side=client (went away) or upstream (broke).",
            ["side"],
            registry=registry,
        )
