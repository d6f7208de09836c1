"""Every metric, defined once; the registry is injected so each app (and test) has its own.

Names are an interface: ``dashboards/*.json`` and ``deploy/prometheus/rules.yml`` use them,
and a test holds the three together. Labels carry key *names*, never secrets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
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


class HotCounter:
    """A counter family for the request path: a dict of floats per label values, no lock.

    prometheus-client's Counter validates label values and takes a lock on every call (about
    1.5 µs with ``labels``, 0.4 µs without), several times a request. The gateway updates
    these only from its event loop thread, where /metrics is collected too, so nothing needs
    the lock; the registry collects them like any metric (``HotCollector``).
    """

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str) -> None:
        values = self.values
        values[label_values] = values.get(label_values, 0.0) + 1.0

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for label_values, value in self.values.items():
            family.add_metric(list(label_values), value)
        return family


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0


class HotHistogram:
    """A histogram family for the request path, as HotCounter: per label values, a count per
    bucket and a sum; the bucket of a value is the first upper bound at or above it."""

    __slots__ = ("bounds", "doc", "labels", "name", "series")

    def __init__(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.series: dict[tuple[str, ...], _Series] = {}

    def observe(self, value: float, *label_values: str) -> None:
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = _Series(len(self.bounds) + 1)
        series.counts[bisect_left(self.bounds, value)] += 1
        series.sum += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        uppers = [repr(b) for b in self.bounds] + ["+Inf"]  # as prometheus-client writes them
        for label_values, series in self.series.items():
            cumulative = list(accumulate(series.counts))
            family.add_metric(
                list(label_values), list(zip(uppers, cumulative, strict=True)), series.sum
            )
        return family


class HotCollector(Collector):
    """Hands the registry the hot metrics' families at each scrape."""

    def __init__(self, metrics: Sequence[HotCounter | HotHistogram]) -> None:
        self._metrics = tuple(metrics)

    def collect(self) -> Iterable[Metric]:
        return [m.family() for m in self._metrics]

    def describe(self) -> Iterable[Metric]:  # names only: the registry checks them for clashes
        return [m.family() for m in self._metrics]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._traffic(registry)
        self._quota(registry)
        registry.register(
            HotCollector(
                [self.requests, self.request_duration, self.upstream_duration, self.overhead]
            )
        )
        # Requests being handled: counted by the request path as a plain int, read at scrape.
        self.handling = 0
        self.inflight.set_function(lambda: self.handling)

    def _traffic(self, registry: CollectorRegistry) -> None:
        # Updated on every request: the lock-free kind (HotCounter), collected the same way.
        self.requests = HotCounter(
            "router_requests",
            "Requests answered, by client, model (alias or upstream id), provider and status.",
            ["client", "model", "provider", "status"],
        )
        self.request_duration = HotHistogram(
            "router_request_duration_seconds",
            "Whole request time, by the provider that answered.",
            ["provider"],
            LATENCY_BUCKETS,
        )
        self.upstream_duration = HotHistogram(
            "router_upstream_duration_seconds",
            "Time to the upstream's first byte.",
            ["provider", "key"],
            LATENCY_BUCKETS,
        )
        self.overhead = HotHistogram(
            "router_overhead_seconds",
            "Time spent in the gateway itself: the request's time less upstream and client waits.",
            [],
            OVERHEAD_BUCKETS,
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

    def _quota(self, registry: CollectorRegistry) -> None:
        # Read from the shared store: every replica reports the same values (aggregate with max).
        key_labels = ["provider", "key"]
        model_labels = ["provider", "key", "model"]
        self.quota_used = Gauge(
            "router_quota_used", "Calls counted today per key.", key_labels, registry=registry
        )
        self.quota_limit = Gauge(
            "router_quota_limit", "Daily limit per key.", key_labels, registry=registry
        )
        self.quota_remaining = Gauge(
            "router_quota_remaining", "Calls left today per key.", key_labels, registry=registry
        )
        self.model_quota_used = Gauge(
            "router_model_quota_used",
            "Calls counted today per key and model.",
            model_labels,
            registry=registry,
        )
        self.model_quota_limit = Gauge(
            "router_model_quota_limit",
            "Daily limit per key and model.",
            model_labels,
            registry=registry,
        )
        self.model_quota_remaining = Gauge(
            "router_model_quota_remaining",
            "Calls left today per key and model.",
            model_labels,
            registry=registry,
        )
        self.key_state = Gauge(
            "router_key_state",
            "1 for the key's current state (available, exhausted, cooling, disabled), else 0.",
            ["provider", "key", "state"],
            registry=registry,
        )
        self.key_cooldown_until = Gauge(
            "router_key_cooldown_until_timestamp_seconds",
            "When the key's cooldown ends (Unix time); 0 when it is not cooling.",
            key_labels,
            registry=registry,
        )
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
        self.store_up = Gauge(
            "router_store_up",
            "1 when the quota store answered the last check, else 0.",
            registry=registry,
        )
