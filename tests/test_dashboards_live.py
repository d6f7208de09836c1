"""Every dashboard panel returns data from a real Prometheus that scraped the real gateway.

The simulator and the gateway run in this process on the real wall clock; a private Prometheus
(tests/prometheus_server.py) scrapes GET /metrics every second and evaluates
deploy/prometheus/rules.yml. Traffic comes in bursts, and before the next burst the test waits
until Prometheus has scraped the previous one, so the data spans several scrapes: successes, two
failovers after a 503, a throttle 429, streams (one cut by the upstream), the Bailian fallback
and finally the gateway's own 429 pool_exhausted.

Then every panel target (and query variable) of both dashboards, with Grafana's variables
substituted (provider=modelscope, key=alice, $__rate_interval=1m), is run as an instant query
and must return at least one series with real numbers (no NaN: there was traffic in the window).
Every rule expression of rules.yml must evaluate, and Prometheus must report every rule healthy.

The prometheus binary is required (Debian/Ubuntu: apt-get install prometheus); without it the
test fails, it does not skip.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, RateLimitError

from router.simulator import Simulator
from tests.prometheus_server import PrometheusServer, prometheus_binary
from tests.support import CLIENT_KEY, gateway
from tests.test_gateway import MODEL, ask, config_for, openai_client, rejected, sim_config
from tests.test_observability_assets import (
    GRAFANA_VARIABLES,
    RULES,
    dashboard_expressions,
    dashboard_paths,
    load_rules,
    substitute,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LIMIT = 5  # calls per ModelScope token (three tokens)
BAILIAN_LIMIT = 6
SYNC_TIMEOUT_S = 20.0


class Traffic:
    """Client requests sent through the gateway, counted so Prometheus can be checked."""

    def __init__(self, url: str, client: AsyncOpenAI, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.client = client
        self.session = session
        self.sent = 0
        self.providers: list[str] = []
        self.refusals: list[str] = []

    async def ask(self, stream: bool = False) -> str:
        self.sent += 1
        provider, _key, text = await ask(self.client, stream=stream)
        assert text
        self.providers.append(provider)
        return provider

    async def cut_stream(self) -> None:
        """A stream the upstream breaks after the first chunks: it ends with an error event."""
        self.sent += 1
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with self.session.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            text = await response.text()
        assert response.status == 200, text
        assert '"error"' in text, f"the stream was not cut: {text[-300:]}"
        assert "[DONE]" not in text

    async def until_refused(self, attempts: int = 40) -> None:
        """Ask until the gateway says pool_exhausted; waits out cooldowns (rate_limited)."""
        for _ in range(attempts):
            self.sent += 1
            try:
                provider, _key, _text = await ask(self.client)
            except RateLimitError as error:
                body: Any = error.body
                self.refusals.append(body["code"])
                if body["code"] == "pool_exhausted":
                    return
                wait = float(error.response.headers["retry-after"])
                await asyncio.sleep(min(max(wait, 0.2), 5))  # a key is cooling: wait it out
            else:
                self.providers.append(provider)
        raise AssertionError(f"no pool_exhausted after {attempts} requests: {self.refusals}")


async def prom_query(prom: PrometheusServer, expr: str, at: float | None = None) -> dict[str, Any]:
    return await asyncio.to_thread(prom.query, expr, at)


async def scalar_value(prom: PrometheusServer, expr: str) -> float | None:
    data = await prom_query(prom, expr)
    if not data["result"]:
        return None
    return float(data["result"][0]["value"][1])


async def wait_for(
    what: str, condition: Callable[[], Awaitable[bool]], timeout: float = SYNC_TIMEOUT_S
) -> None:
    """Poll a condition on Prometheus (bounded); the short sleeps let the next scrape happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def scraped(prom: PrometheusServer, traffic: Traffic) -> float:
    """Wait until Prometheus holds a scrape that counts every request sent so far."""
    expected = traffic.sent

    async def seen() -> bool:
        value = await scalar_value(prom, "sum(router_requests_total)")
        return value is not None and value >= expected

    await wait_for(f"a scrape with sum(router_requests_total) >= {expected}", seen)
    return expected


def describe(result: dict[str, Any]) -> str:
    """A short account of an instant query's answer: how many series, which kinds of values."""
    if result["resultType"] == "scalar":
        values = [result["result"][1]]
    else:
        values = [series["value"][1] for series in result["result"]]
    numbers = [float(v) for v in values]
    kinds = sorted(
        {
            "NaN" if math.isnan(n) else "+Inf" if n == math.inf else "0" if n == 0 else "number"
            for n in numbers
        }
    )
    shown = ", ".join(f"{n:.4g}" for n in numbers[:4]) + (", ..." if len(numbers) > 4 else "")
    return f"{len(numbers)} series [{'/'.join(kinds)}]: {shown}"


async def drive(traffic: Traffic, sim: Simulator, prom: PrometheusServer) -> list[float]:
    """Five bursts, each one scraped before the next starts; returns the totals Prometheus saw."""
    seen: list[float] = []
    # 1: successes, a 503 on alice (failover to another key), a stream cut by the upstream
    sim.faults.add("status_503", token="alice")
    for _ in range(3):
        await traffic.ask()
    sim.faults.add("mid_stream_cut")
    await traffic.cut_stream()
    await traffic.ask(stream=True)
    seen.append(await scraped(prom, traffic))

    # 2: the same again, plus a throttle 429 on bob (failover, call given back)
    sim.faults.add("status_503", token="alice")
    sim.faults.add("throttle", token="bob")
    for _ in range(3 * LIMIT):  # until both faults have fired: alice or bob may be cooling
        if not sim.faults.pending():
            break
        await traffic.ask()
    assert not sim.faults.pending(), sim.faults.pending()
    sim.faults.add("mid_stream_cut")
    await traffic.cut_stream()
    await traffic.ask(stream=True)
    seen.append(await scraped(prom, traffic))

    # 3: the free pool runs short: answers from the Bailian fallback
    for _ in range(3 * LIMIT + 2):
        if await traffic.ask() == "bailian":
            break
    assert traffic.providers[-1] == "bailian", traffic.providers
    seen.append(await scraped(prom, traffic))

    # 4: the rest of both pools, until the gateway's own 429 pool_exhausted
    await traffic.until_refused()
    seen.append(await scraped(prom, traffic))

    # 5: still spent: another 429, so the gateway's own answers have a rate (not only a sample)
    await traffic.until_refused(attempts=1)
    seen.append(await scraped(prom, traffic))
    return seen


async def test_every_dashboard_panel_returns_live_data(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = prometheus_binary()
    monkeypatch.setitem(GRAFANA_VARIABLES, "__rate_interval", "1m")
    monkeypatch.setitem(GRAFANA_VARIABLES, "__interval", "1s")
    monkeypatch.setitem(GRAFANA_VARIABLES, "__range", "5m")
    started = time.monotonic()
    async with Simulator(sim_config(LIMIT, BAILIAN_LIMIT)) as sim:  # the real wall clock
        config = config_for(sim, limit=LIMIT, bailian_limit=BAILIAN_LIMIT)
        # the paid fallback has prices and a budget: the cost-against-budget panels have data
        config["providers"][1]["prices"] = {"*": {"input": 2, "output": 8}}
        config["providers"][1]["daily_budget"] = 100
        async with gateway(config) as url, aiohttp.ClientSession() as session:
            target = url.removeprefix("http://")
            prom = PrometheusServer([target], rule_files=[RULES], binary=binary)
            await asyncio.to_thread(prom.start)
            client = openai_client(url)
            try:
                traffic = Traffic(url, client, session)
                totals = await drive(traffic, sim, prom)
                report = await evaluate_everything(prom)
            except BaseException:
                print(f"prometheus log:\n{prom.log_tail()}")
                raise
            finally:
                await client.close()
                await asyncio.to_thread(prom.stop)
        assert rejected(sim, "modelscope", "503") >= 1, "no 503 failover happened"
        assert rejected(sim, "modelscope", "429") == 1, "the throttle 429 did not happen"
    # five bursts, each seen by a later scrape than the one before: at least five scrapes
    assert totals == sorted(set(totals)), totals
    assert traffic.refusals[-1] == "pool_exhausted"
    assert {"modelscope", "bailian"} <= set(traffic.providers)
    print(f"\n{len(report)} expressions returned data ({time.monotonic() - started:.1f} s):")
    for where, description in report:
        print(f"  {where}: {description}")


async def evaluate_everything(prom: PrometheusServer) -> list[tuple[str, str]]:
    """Every dashboard expression returns numbers; every rule evaluates and is healthy."""
    up = await scalar_value(prom, "min(up)")
    assert up == 1, f"the gateway target is not up: {up}"
    scrapes = await scalar_value(prom, "sum(count_over_time(up[5m]))")
    assert scrapes is not None
    assert scrapes >= 5, f"only {scrapes} scrapes"

    # The recording rules lag the scrapes by up to an evaluation: wait until they caught up.
    live = (
        "sum(max by (provider, key) (router_quota_remaining)"
        " and on (provider, key) max by (provider, key) (router_quota_limit))"
    )

    async def rules_caught_up() -> bool:
        recorded = await scalar_value(prom, "sum(provider:router_quota_remaining:sum)")
        return recorded is not None and recorded == await scalar_value(prom, live)

    await wait_for("the recording rules to reflect the last scrape", rules_caught_up)

    at = time.time()  # one evaluation time for every expression
    report: list[tuple[str, str]] = []
    empty: list[str] = []
    nan: list[str] = []
    expressions = [pair for path in dashboard_paths() for pair in dashboard_expressions(path)]
    assert len(expressions) > 10
    for where, expr in expressions:
        concrete = substitute(expr)
        data = await prom_query(prom, concrete, at)
        if not data["result"]:
            empty.append(f"{where}: {concrete}")
            continue
        description = describe(data)
        report.append((where, description))
        if "NaN" in description:
            nan.append(f"{where}: {concrete} -> {description}")
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)
    assert not nan, "dashboard expressions with NaN despite traffic:\n" + "\n".join(nan)

    for rule in load_rules():
        name = rule.get("alert") or rule["record"]
        data = await prom_query(prom, rule["expr"], at)  # raises PrometheusError if it fails
        state = describe(data) if data["result"] else "no series (not firing)"
        report.append((f"rules.yml {name}", state))
    groups = (await asyncio.to_thread(prom.api, "rules"))["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {rule.get("alert") or rule["record"] for rule in load_rules()}
    assert set(loaded) == expected, f"rules loaded by Prometheus: {sorted(loaded)}"
    unhealthy = {n: r.get("lastError") for n, r in loaded.items() if r["health"] == "err"}
    assert not unhealthy, f"rules failing in Prometheus: {unhealthy}"
    return report
