"""Every metric, defined once; the registry is injected so each app (and test) has its own.

Names are an interface: ``dashboards/*.json`` and ``deploy/prometheus/rules.yml`` use them,
and a test holds the three together. Labels carry key *names*, never secrets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


KEY_LABELS = ("provider", "key")
MODEL_LABELS = ("provider", "key", "model")
# The per-key quota series: name -> (help, labels).
QUOTA_SERIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "router_quota_used": ("Calls counted today per key.", KEY_LABELS),
    "router_quota_limit": ("Daily limit per key.", KEY_LABELS),
    "router_quota_remaining": ("Calls left today per key.", KEY_LABELS),
    "router_model_quota_used": ("Calls counted today per key and model.", MODEL_LABELS),
    "router_model_quota_limit": ("Daily limit per key and model.", MODEL_LABELS),
    "router_model_quota_remaining": ("Calls left today per key and model.", MODEL_LABELS),
    "router_key_state": (
        "1 for the key's current state (available, exhausted, cooling, disabled), else 0.",
        ("provider", "key", "state"),
    ),
    "router_key_cooldown_until_timestamp_seconds": (
        "When the key's cooldown ends (Unix time); 0 when it is not cooling.",
        KEY_LABELS,
    ),
}
Rows = Mapping[str, Sequence[tuple[tuple[str, ...], float]]]


class QuotaSeries(Collector):
    """The per-key quota series of the last store snapshot, made into metric families only
    while a scrape reads them (prometheus-client's custom collector).

    Measured: a Gauge child per key and series costs about 0.8 KB, and there are eleven per
    key, so 1,000 keys held 9 MB in gauges; the rows kept here take about a tenth of that.
    A snapshot replaces every row at once, so keys and models that went away leave no series.
    """

    def __init__(self) -> None:
        self._rows: Rows = {}

    def replace(self, rows: Rows) -> None:
        self._rows = rows

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, labels) in QUOTA_SERIES.items():
            yield GaugeMetricFamily(name, doc, labels=labels)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._rows
        for name, (doc, labels) in QUOTA_SERIES.items():
            family = GaugeMetricFamily(name, doc, labels=labels)
            for label_values, value in rows.get(name, ()):
                family.add_metric(label_values, value)
            yield family


class Metrics:
    """The gateway's metrics on one registry: traffic (updated by the request path) and quota
    (read from the store by router.quota_metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._traffic(registry)
        self._quota(registry)

    def _traffic(self, registry: CollectorRegistry) -> None:
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
        self.overhead = Histogram(
            "router_overhead_seconds",
            "Time spent in the gateway itself: the request's time less upstream and client waits.",
            buckets=OVERHEAD_BUCKETS,
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
        self.tokens = Counter(
            "router_tokens",
            "Tokens the upstreams reported, by client, provider, model (alias or upstream id) "
            "and kind: prompt, completion, cache_read, cache_write (disjoint).",
            ["client", "provider", "model", "kind"],
            registry=registry,
        )
        self.tokens_estimated = Counter(
            "router_tokens_estimated",
            "Streams whose usage was incomplete (they ended before the upstream reported it): "
            "only the tokens they had reported were counted.",
            ["client", "provider"],
            registry=registry,
        )
        self.cost = Counter(
            "router_cost",
            "Money the answers cost at the configured prices (providers[].prices), by client, "
            "provider and currency; free providers cost nothing.",
            ["client", "provider", "currency"],
            registry=registry,
        )
        self.refusals = Counter(
            "router_limit_refusals",
            "Requests refused by a limit before any upstream call: client_limit, "
            "client_tokens, client_budget, client_rpm, client_tpm, provider_budget.",
            ["client", "reason"],
            registry=registry,
        )
        self.stream_aborts = Counter(
            "router_stream_aborts",
            "Streams that ended early: side=client (went away) or upstream (broke).",
            ["side"],
            registry=registry,
        )

    def _quota(self, registry: CollectorRegistry) -> None:
        # Read from the shared store: every replica reports the same values (aggregate with max).
        self.quota = QuotaSeries()
        registry.register(self.quota)
        self.reset_timestamp = Gauge(
            "router_quota_reset_timestamp_seconds",
            "The next quota reset (Unix time).",
            registry=registry,
        )
        self.exhaustion_forecast = Gauge(
            "router_quota_exhaustion_forecast_seconds",
            "At the pace of the last hour, seconds until the provider's pool is spent "
            "(+Inf when not before the reset).",
            ["provider"],
            registry=registry,
        )
        # Tokens and money of the quota day, from the store (every replica's answers).
        self.cost_today = Gauge(
            "router_cost_today",
            "Money spent today on each provider (its currency), from the store.",
            ["provider", "currency"],
            registry=registry,
        )
        self.budget = Gauge(
            "router_daily_budget",
            "A provider's configured daily_budget (its currency); absent when it has none.",
            ["provider", "currency"],
            registry=registry,
        )
        self.client_tokens_today = Gauge(
            "router_client_tokens_today",
            "Tokens each client used today on every provider, from the store.",
            ["client"],
            registry=registry,
        )
        self.client_cost_today = Gauge(
            "router_client_cost_today",
            "Money each client spent today, from the store.",
            ["client", "currency"],
            registry=registry,
        )
        self.store_up = Gauge(
            "router_store_up",
            "1 when the quota store answered the last check, else 0.",
            registry=registry,
        )
