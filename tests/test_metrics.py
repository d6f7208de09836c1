"""GET /metrics after real traffic: every metric there, with labels and values that match."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from openai import RateLimitError
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.logs import configure_logging
from router.metrics import HotCollector, HotCounter, HotHistogram
from router.quota_metrics import Pace, forecast_seconds
from router.simulator import Simulator
from tests.support import CLIENT_KEY, FakeClock, gateway
from tests.test_gateway import MODEL, TOKENS, ask, config_for, openai_client, sim_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    async with Simulator(sim_config(2, 2), clock=clock.seconds) as simulator:
        yield simulator


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
    sim: Simulator, clock: FakeClock
) -> None:
    sim.faults.add("status_503", token="alice", count=1)
    async with gateway(config_for(sim, model_daily_limit=2), clock) as url:
        client = openai_client(url)
        try:
            await ask(client)  # alice answers 503: bob serves, alice cools for a second
            clock.advance(seconds=2)
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
        ("router_quota_reset_timestamp_seconds", {}, clock.seconds() - 2 + 10 * 3600),
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


async def test_metrics_token(sim: Simulator, clock: FakeClock) -> None:
    config = config_for(sim)
    config["metrics"] = {"token": "metrics-secret-canary"}
    async with gateway(config, clock) as url:
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
    sim: Simulator, clock: FakeClock
) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with gateway(config_for(sim), clock) as url, aiohttp.ClientSession() as http:
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


async def test_access_log_is_one_json_line_per_request(sim: Simulator, clock: FakeClock) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream, json=True)
    try:
        async with gateway(config_for(sim), clock) as url:
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


def _exposition(
    registry: CollectorRegistry,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        key: v
        for key, v in parse(generate_latest(registry).decode()).items()
        if not key[0].endswith("_created")  # prometheus-client's own; the hot kind has none
    }


def test_hot_metrics_expose_what_prometheus_client_s_own_would() -> None:
    """HotCounter and HotHistogram against prometheus-client's Counter and Histogram, fed the
    same values (bucket edges included): the same samples, labels and values."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0, 2.5)
    counter = HotCounter("t_requests", "doc", ["client", "status"])
    histogram = HotHistogram("t_seconds", "doc", ["provider"], buckets)
    bare = HotHistogram("t_bare_seconds", "doc", [], buckets)
    ours.register(HotCollector([counter, histogram, bare]))
    ref_counter = Counter("t_requests", "doc", ["client", "status"], registry=theirs)
    ref_histogram = Histogram("t_seconds", "doc", ["provider"], buckets=buckets, registry=theirs)
    ref_bare = Histogram("t_bare_seconds", "doc", buckets=buckets, registry=theirs)
    values = [0.0, 0.0005, 0.001, 0.0010001, 0.01, 0.5, 1.0, 2.5, 2.6, 99.0]
    for i, v in enumerate(values):
        provider = ("modelscope", "bailian")[i % 2]
        histogram.observe(v, provider)
        ref_histogram.labels(provider).observe(v)
        bare.observe(v)
        ref_bare.observe(v)
        counter.inc("team", str(200 + i % 3))
        ref_counter.labels("team", str(200 + i % 3)).inc()
    got, want = _exposition(ours), _exposition(theirs)
    assert got == want
    # modelscope had 0.0, 0.001, 0.01, 1.0, 2.6: an edge value is in its own bucket
    assert value(got, "t_seconds_bucket", provider="modelscope", le="0.001") == 2
    assert value(got, "t_bare_seconds_bucket", le="+Inf") == len(values)
