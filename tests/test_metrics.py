"""GET /metrics after real traffic: every metric there, with labels and values that match."""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import aiohttp
import pytest
from openai import RateLimitError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.logs import configure_logging
from router.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, Metrics
from router.quota_metrics import Pace, forecast_seconds
from router.simulator import Simulator
from tests.conftest import MODEL, TOKENS, GatewayClock
from tests.support import CLIENT_KEY, gateway
from tests.test_gateway import ask, config_for, openai_client

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


async def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics", headers=headers) as r:
        return r.status, await r.text()


async def test_metrics_after_failover_fallback_and_exhaustion(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    sim.faults.add("status_503", token="alice", count=1)
    async with gateway(config_for(sim, model_daily_limit=2), gateway_clock) as url:
        client = openai_client(url)
        try:
            await ask(client)  # alice answers 503: bob serves, alice cools for a second
            gateway_clock.advance(seconds=2)
            # The 503 stays counted on alice (the upstream may have counted it): 5 ModelScope
            # successes in all, then 2 on Bailian.
            for _ in range(6):
                await ask(client)
            with pytest.raises(RateLimitError):
                await ask(client)
        finally:
            await client.close()
        status, text = await scrape(url)
    assert status == 200
    s = parse(text)
    ms, bl = "modelscope", "bailian"
    expected: list[tuple[str, dict[str, str], float]] = [
        (
            "router_requests_total",
            {"client": "team", "model": MODEL, "provider": ms, "status": "200"},
            5,
        ),
        (
            "router_requests_total",
            {"client": "team", "model": MODEL, "provider": bl, "status": "200"},
            2,
        ),
        (
            "router_requests_total",
            {"client": "team", "model": MODEL, "provider": "none", "status": "429"},
            1,
        ),
        (
            "router_failovers_total",
            {"from_provider": ms, "to_provider": ms, "reason": "upstream_failure"},
            1,
        ),
        (
            "router_upstream_errors_total",
            {"provider": ms, "key": "alice", "kind": "server_error"},
            1,
        ),
        ("router_fallback_requests_total", {"provider": bl}, 2),
        ("router_request_duration_seconds_count", {"provider": ms}, 5),
        ("router_upstream_duration_seconds_count", {"provider": ms, "key": "alice"}, 2),
        ("router_overhead_seconds_count", {}, 8),
        ("router_inflight_requests", {}, 0),
        ("router_model_quota_remaining", {"provider": ms, "key": "alice", "model": MODEL}, 0),
        ("router_quota_used", {"provider": bl, "key": "main"}, 2),
        # 06:00:02 UTC: the next reset is 16:00 UTC (00:00 Asia/Shanghai)
        ("router_quota_reset_timestamp_seconds", {}, gateway_clock.seconds() - 2 + 10 * 3600),
        ("router_quota_exhaustion_forecast_seconds", {"provider": ms}, 0),
        ("router_store_up", {}, 1),
    ]
    for name, _ in TOKENS:
        key = {"provider": ms, "key": name}
        expected += [
            ("router_quota_used", key, 2),
            ("router_quota_limit", key, 2),
            ("router_quota_remaining", key, 0),
            ("router_key_state", {**key, "state": "exhausted"}, 1),
            ("router_key_state", {**key, "state": "available"}, 0),
            ("router_model_quota_used", {**key, "model": MODEL}, 2),
        ]
    for metric, labels, number in expected:
        assert value(s, metric, **labels) == number, (metric, labels)


async def test_metrics_token(sim: Simulator, gateway_clock: GatewayClock) -> None:
    config = config_for(sim)
    config["metrics"] = {"token": "metrics-secret-canary"}
    async with gateway(config, gateway_clock) as url:
        assert (await scrape(url))[0] == 401
        assert (await scrape(url, "wrong"))[0] == 401
        assert (await scrape(url, CLIENT_KEY))[0] == 401
        status, text = await scrape(url, "metrics-secret-canary")
    assert status == 200
    assert "router_quota_used" in text
    assert "metrics-secret-canary" not in text
    for _, secret in TOKENS:
        assert secret not in text


async def test_random_model_names_do_not_grow_the_label_set(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with gateway(config_for(sim), gateway_clock) as url, aiohttp.ClientSession() as http:
        for i in range(20):
            body: dict[str, Any] = {
                "model": f"random-{i}",
                "messages": [{"role": "user", "content": "x"}],
            }
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 404
        _, text = await scrape(url)
    assert "random-" not in text
    assert (
        value(
            parse(text),
            "router_requests_total",
            client="team",
            model="other",
            provider="none",
            status="404",
        )
        == 20
    )


def test_pace_and_forecast() -> None:
    pace = Pace(window=3600)
    pace.add(0, "d1", 100)
    pace.add(1800, "d1", 280)  # 180 calls in half an hour
    assert pace.rate() == pytest.approx(0.1)
    assert forecast_seconds(360, pace.rate(), until_reset=7200) == pytest.approx(3600)
    assert forecast_seconds(360, pace.rate(), until_reset=1800) == math.inf
    assert forecast_seconds(0, pace.rate(), until_reset=1800) == 0
    pace.add(1900, "d2", 3)  # a new day: yesterday's samples say nothing about today's pace
    assert pace.rate() == 0
    pace.add(5000, "d2", 40)  # older than the window is dropped
    assert pace.rate() == pytest.approx(37 / 3100)


async def test_access_log_is_one_json_line_per_request(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream, json=True)
    try:
        async with gateway(config_for(sim), gateway_clock) as url:
            client = openai_client(url)
            try:
                await ask(client)
            finally:
                await client.close()
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "router.access"]
    assert len(access) == 1
    entry = access[0]
    assert entry["status"] == 200
    assert entry["client"] == "team"
    assert entry["provider"] == "modelscope"
    assert entry["key"] in {n for n, _ in TOKENS}
    assert entry["attempts"] == 1
    assert len(entry["request_id"]) == 32
    assert entry["total_ms"] >= entry["upstream_ms"] >= 0
    for _, secret in TOKENS:
        assert secret not in stream.getvalue()
    assert CLIENT_KEY not in stream.getvalue()


def test_request_path_metrics_keep_their_names_labels_and_buckets() -> None:
    """The dashboards and alert rules read these: names, label names and bucket edges are an
    interface (router/metrics.py defines them with prometheus-client's own types)."""
    metrics = Metrics(CollectorRegistry())
    metrics.requests.labels("team", MODEL, "modelscope", "200").inc()
    metrics.request_duration.labels("modelscope").observe(0.0050001)
    metrics.upstream_duration.labels("modelscope", "alice").observe(0.005)
    metrics.overhead.observe(0.0001)
    metrics.inflight.inc()
    got = parse(generate_latest(metrics.registry).decode())
    labels = {"client": "team", "model": MODEL, "provider": "modelscope", "status": "200"}
    assert value(got, "router_requests_total", **labels) == 1
    edges = {le for name, pairs in got if name.endswith("_bucket") for k, le in pairs if k == "le"}
    assert edges == {repr(float(b)) for b in (*LATENCY_BUCKETS, *OVERHEAD_BUCKETS)} | {"+Inf"}
    request = "router_request_duration_seconds_bucket"
    assert value(got, request, provider="modelscope", le="0.005") == 0
    assert value(got, request, provider="modelscope", le="0.01") == 1
    upstream = "router_upstream_duration_seconds_bucket"
    assert value(got, upstream, provider="modelscope", key="alice", le="0.005") == 1  # an edge
    assert value(got, "router_overhead_seconds_bucket", le="0.0001") == 1
    assert value(got, "router_inflight_requests") == 1
