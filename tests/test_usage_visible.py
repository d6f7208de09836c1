"""Tokens and cost of the quota day, visible everywhere: /admin/quota, /admin/clients,
/admin/usage (checked against admin_openapi.yaml), the quota gauges of /metrics and the status
tables.

The usage is put into the store with ``record_usage``, as the request path does once an answer
ends. The store here is the memory store: the Redis and SQLite stores get ``usage`` and
``record_usage`` in another branch.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from router.admin import openapi_document
from router.app import create_app
from router.config import Settings
from router.demo import running
from router.metrics import Metrics
from router.pool import KeyPool
from router.quota.days import next_reset, quota_day, to_ms
from router.quota.memory_store import MemoryStore
from router.quota.store import ForwardingStore, StoreError
from router.quota.types import UsageRecord, UsageRow
from router.quota_metrics import QuotaReporter
from router.state import LIVE
from router.status import amount, render
from tests.conftest import GatewayClock
from tests.support import CLIENT_KEY, gateway_config
from tests.test_admin import ADMIN, ADMIN_KEY
from tests.test_metrics import parse, value

BILLION = 10**9  # nanos per currency unit
BOTS_KEY = "sk-test-bots-key"


def settings_with_money(
    *, clients: bool = True, bots: bool = True, budget: float | None = 10, currency: str = "CNY"
) -> Settings:
    """ModelScope (free) and Bailian (paid, 10 CNY a day); clients with every limit or none."""
    config = gateway_config(
        "http://127.0.0.1:9/v1",
        "http://127.0.0.1:9/v1",
        tokens=[("alice", "ms-test-alice", 100), ("bob", "ms-test-bob", 100)],
    )
    config["admin"] = {"key": ADMIN_KEY}
    config["providers"][1]["prices"] = {"qwen*": {"input": 2, "output": 8}}
    config["providers"][1]["daily_budget"] = budget
    config["providers"][1]["currency"] = currency
    config["clients"] = (
        [
            {
                "name": "team",
                "key": CLIENT_KEY,
                "daily_tokens": 5000,
                "daily_budget": 2,
                "rpm": 30,
                "tpm": 90_000,
            },
            *([{"name": "bots", "key": BOTS_KEY}] if bots else []),
        ]
        if clients
        else []
    )
    return Settings.model_validate(config)


@dataclass
class Day:
    """The quota day of a moment, as the gateway computes it."""

    day: str
    end_ms: int

    @classmethod
    def at(cls, settings: Settings, now: datetime) -> Day:
        tz, reset = settings.quota.tz, settings.quota.reset_time
        return cls(quota_day(now, tz, reset), to_ms(next_reset(now, tz, reset)))


def record(
    day: Day,
    client: str,
    provider: str,
    key: str,
    model: str,
    prompt: int,
    completion: int,
    cost: int = 0,
    estimated: bool = False,
) -> UsageRecord:
    return UsageRecord(
        day=day.day,
        day_end_ms=day.end_ms,
        client=client,
        provider=provider,
        key=key,
        model=model,
        prompt=prompt,
        completion=completion,
        total=prompt + completion,
        cost=cost,
        at_ms=day.end_ms - 3_600_000,
        estimated=estimated,
    )


def usage_of_two_days(settings: Settings, now: datetime) -> list[UsageRecord]:
    today = Day.at(settings, now)
    yesterday = Day.at(settings, now - timedelta(days=1))
    return [
        record(today, "team", "modelscope", "alice", "Qwen/Qwen3-32B", 100, 50),
        record(today, "team", "modelscope", "bob", "Qwen/Qwen3-32B", 200, 25),
        record(today, "team", "bailian", "main", "qwen3-32b", 1000, 500, cost=1_250_000_000),
        record(today, "team", "bailian", "main", "qwen3-32b", 10, 5, cost=7, estimated=True),
        record(today, "bots", "bailian", "main", "qwen-max", 300, 100, cost=3 * BILLION),
        record(yesterday, "team", "bailian", "main", "qwen3-32b", 4000, 0, cost=BILLION // 2),
    ]


@asynccontextmanager
async def serving(
    settings: Settings, clock: GatewayClock, store: MemoryStore
) -> AsyncIterator[tuple[str, Any]]:
    app = create_app(
        settings, clock=clock, store=store, registry=CollectorRegistry(), fetch_catalog=False
    )
    async with running(app) as url:
        yield url, app


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


# -- a small JSON Schema check, enough for admin_openapi.yaml ----------------------------------


def conforms(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> None:
    """Raise AssertionError where ``value`` breaks ``schema`` (the keywords the document uses)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        conforms(value, root["components"]["schemas"][name], root, at)
    for part in schema.get("allOf", []):
        conforms(value, part, root, at)
    if "oneOf" in schema:
        matched = 0
        for option in schema["oneOf"]:
            try:
                conforms(value, option, root, at)
            except AssertionError:
                continue
            matched += 1
        assert matched == 1, f"{at}: {value!r} matches {matched} of oneOf"
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        assert any(_is(value, t) for t in names), f"{at}: {value!r} is not {names}"
    if "const" in schema:
        assert value == schema["const"], at
    if "enum" in schema:
        assert value in schema["enum"], at
    if isinstance(value, int | float) and not isinstance(value, bool) and "minimum" in schema:
        assert value >= schema["minimum"], f"{at}: {value} < {schema['minimum']}"
    if isinstance(value, str) and "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{at}: {value!r}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            assert name in value, f"{at}: no {name!r}"
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                conforms(item, properties[name], root, f"{at}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                conforms(item, schema["additionalProperties"], root, f"{at}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            conforms(item, schema["items"], root, f"{at}[{i}]")


def _is(value: Any, kind: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "null": value is None,
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
    }[kind]


def answer_schema(path: str) -> dict[str, Any]:
    operation = openapi_document()["paths"][path]["get"]
    schema: dict[str, Any] = operation["responses"]["200"]["content"]["application/json"]["schema"]
    return schema


def test_the_schema_check_can_fail() -> None:
    root = openapi_document()
    row = {
        "client": "team",
        "provider": "bailian",
        "key": "main",
        "model": "qwen3-32b",
        "prompt": 1,
        "completion": 2,
        "total": 3,
        "cost": 0.5,
        "currency": "CNY",
        "answers": 1,
        "estimated": 0,
    }
    conforms(row, {"$ref": "#/components/schemas/UsageRow"}, root)
    for broken in ({**row, "cost": "0.5"}, {**row, "total": -1}, {**row, "currency": "yuan"}):
        with pytest.raises(AssertionError):
            conforms(broken, {"$ref": "#/components/schemas/UsageRow"}, root)
    del row["answers"]
    with pytest.raises(AssertionError, match="answers"):
        conforms(row, {"$ref": "#/components/schemas/UsageRow"}, root)


# -- the admin API ------------------------------------------------------------------------------


async def test_admin_answers_show_tokens_cost_budgets_and_limits(
    gateway_clock: GatewayClock,
) -> None:
    settings = settings_with_money()
    store = MemoryStore()
    records = usage_of_two_days(settings, gateway_clock.now)
    await store.record_usage("batch-1", records)
    await store.record_usage("batch-1", records)  # a retried batch adds nothing
    async with (
        serving(settings, gateway_clock, store) as (url, _app),
        aiohttp.ClientSession(headers=ADMIN) as http,
    ):
        status, quota = await get(http, url + "/admin/quota")
        assert status == 200
        status, clients = await get(http, url + "/admin/clients")
        assert status == 200
        status, usage = await get(http, url + "/admin/usage")
        assert status == 200
    root = openapi_document()
    conforms(quota, answer_schema("/admin/quota"), root)
    conforms(clients, answer_schema("/admin/clients"), root)
    conforms(usage, answer_schema("/admin/usage"), root)

    modelscope, bailian = quota["providers"]
    assert modelscope["tokens"] == {"prompt": 300, "completion": 75, "total": 375}
    assert (modelscope["cost"], modelscope["daily_budget"], modelscope["budget_remaining"]) == (
        0,
        None,
        None,
    )
    alice, bob = modelscope["keys"]
    assert alice["tokens"] == {"prompt": 100, "completion": 50, "total": 150}
    assert bob["tokens"]["total"] == 225
    assert bailian["tokens"] == {"prompt": 1310, "completion": 605, "total": 1915}
    assert bailian["currency"] == "CNY"
    # 1.25 + 0.000000007 + 3 of 10 CNY: yesterday's half yuan is yesterday's
    assert bailian["cost"] == pytest.approx(4.250000007, abs=1e-12)
    assert bailian["daily_budget"] == 10
    assert bailian["budget_remaining"] == pytest.approx(5.749999993, abs=1e-12)
    [main] = bailian["keys"]
    assert main["tokens"] == bailian["tokens"]
    assert main["cost"] == bailian["cost"]

    team, bots = clients["clients"]
    assert (team["daily_tokens"], team["daily_budget"], team["rpm"], team["tpm"]) == (
        5000,
        2,
        30,
        90_000,
    )
    assert team["budget_currency"] == "CNY"
    today = team["today"]
    assert today["tokens"] == {"prompt": 1310, "completion": 580, "total": 1890}
    assert today["tokens_remaining"] == 5000 - 1890
    assert today["cost"] == {"CNY": pytest.approx(1.250000007, abs=1e-12)}
    assert today["budget_remaining"] == pytest.approx(0.749999993, abs=1e-12)
    yesterday = team["yesterday"]
    assert yesterday["tokens"] == {"prompt": 4000, "completion": 0, "total": 4000}
    assert (yesterday["cost"], yesterday["budget_remaining"]) == ({"CNY": 0.5}, 1.5)
    assert (bots["daily_tokens"], bots["daily_budget"], bots["rpm"], bots["tpm"]) == (
        None,
        None,
        None,
        None,
    )
    assert bots["today"]["tokens"]["total"] == 400
    assert bots["today"]["cost"] == {"CNY": 3}
    assert (bots["today"]["tokens_remaining"], bots["today"]["budget_remaining"]) == (None, None)
    assert bots["yesterday"]["cost"] == {}

    assert usage["day"] == "2026-11-29"
    by_row = {(r["client"], r["provider"], r["key"], r["model"]): r for r in usage["rows"]}
    assert len(by_row) == len(usage["rows"]) == 4
    estimated = by_row["team", "bailian", "main", "qwen3-32b"]
    assert (estimated["prompt"], estimated["completion"], estimated["total"]) == (1010, 505, 1515)
    assert (estimated["answers"], estimated["estimated"]) == (2, 1)
    assert estimated["currency"] == "CNY"
    assert by_row["bots", "bailian", "main", "qwen-max"]["cost"] == 3
    # every row adds up to the documents above
    assert sum(r["total"] for r in usage["rows"]) == sum(
        p["tokens"]["total"] for p in quota["providers"]
    )


async def test_usage_of_another_day_and_a_bad_day(gateway_clock: GatewayClock) -> None:
    settings = settings_with_money()
    store = MemoryStore()
    await store.record_usage("b", usage_of_two_days(settings, gateway_clock.now))
    yesterday = Day.at(settings, gateway_clock.now - timedelta(days=1)).day
    async with (
        serving(settings, gateway_clock, store) as (url, _app),
        aiohttp.ClientSession(headers=ADMIN) as http,
    ):
        status, usage = await get(http, f"{url}/admin/usage?day={yesterday}")
        assert status == 200
        assert [(r["client"], r["total"], r["cost"]) for r in usage["rows"]] == [
            ("team", 4000, 0.5)
        ]
        status, usage = await get(http, f"{url}/admin/usage?day=20000101")
        assert (status, usage["rows"], usage["day"]) == (200, [], "2000-01-01")
        for bad in ("2026-11-29", "20261329", "tomorrow", "２０２６１１２９", ""):
            status, body = await get(http, f"{url}/admin/usage?day={bad}")
            assert status == 400, bad
            assert body["error"]["param"] == "day"
        async with http.get(url + "/admin/usage", headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 401


# -- /metrics -----------------------------------------------------------------------------------


async def scrape(url: str) -> dict[Any, float]:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as response:
        assert response.status == 200
        return parse(await response.text())


def series(samples: dict[Any, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def test_metrics_report_today_and_drop_what_a_reload_removed(
    gateway_clock: GatewayClock,
) -> None:
    settings = settings_with_money()
    store = MemoryStore()
    await store.record_usage("b", usage_of_two_days(settings, gateway_clock.now))
    async with serving(settings, gateway_clock, store) as (url, app):
        samples = await scrape(url)
        assert value(samples, "router_cost_today", provider="bailian", currency="CNY") == (
            pytest.approx(4.250000007, abs=1e-12)
        )
        assert value(samples, "router_cost_today", provider="modelscope", currency="CNY") == 0
        assert series(samples, "router_daily_budget") == {
            (("currency", "CNY"), ("provider", "bailian")): 10
        }
        assert series(samples, "router_client_tokens_today") == {
            (("client", "team"),): 1890,
            (("client", "bots"),): 400,
        }
        assert series(samples, "router_client_cost_today") == {
            (("client", "team"), ("currency", "CNY")): pytest.approx(1.250000007, abs=1e-12),
            (("client", "bots"), ("currency", "CNY")): 3,
        }

        # the quota day turns: yesterday's usage no longer counts as today's
        gateway_clock.advance(days=1)
        samples = await scrape(url)
        assert value(samples, "router_cost_today", provider="bailian", currency="CNY") == 0
        assert value(samples, "router_client_tokens_today", client="team") == 0
        gateway_clock.advance(days=-1)

        # a reload without the bots and without Bailian's budget, in dollars
        await app[LIVE].reload(settings_with_money(bots=False, budget=None, currency="USD"))
        samples = await scrape(url)
        assert series(samples, "router_daily_budget") == {}
        assert series(samples, "router_client_tokens_today") == {(("client", "team"),): 1890}
        assert set(series(samples, "router_cost_today")) == {
            (("currency", "CNY"), ("provider", "modelscope")),
            (("currency", "USD"), ("provider", "bailian")),
        }
        assert series(samples, "router_client_cost_today") == {
            (("client", "team"), ("currency", "USD")): pytest.approx(1.250000007, abs=1e-12)
        }


async def test_an_open_gateway_reports_its_anonymous_client(gateway_clock: GatewayClock) -> None:
    settings = settings_with_money(clients=False)
    store = MemoryStore()
    today = Day.at(settings, gateway_clock.now)
    await store.record_usage(
        "b", [record(today, "anonymous", "bailian", "main", "qwen-max", 7, 3, cost=20)]
    )
    async with serving(settings, gateway_clock, store) as (url, _app):
        samples = await scrape(url)
    assert series(samples, "router_client_tokens_today") == {(("client", "anonymous"),): 10}
    assert value(samples, "router_client_cost_today", client="anonymous", currency="CNY") == 2e-8


class FailingUsage(ForwardingStore):
    """A store whose usage reads fail while ``down`` (the rest answers)."""

    down = False

    async def usage(self, day: str) -> list[UsageRow]:
        if self.down:
            raise StoreError("usage unreachable")
        return await super().usage(day)


async def test_a_store_error_leaves_the_reporter_working(gateway_clock: GatewayClock) -> None:
    settings = settings_with_money()
    memory = MemoryStore()
    store = FailingUsage(memory)
    metrics = Metrics(CollectorRegistry())
    reporter = QuotaReporter(
        settings, store, KeyPool(settings), metrics, gateway_clock, lambda: frozenset()
    )
    today = Day.at(settings, gateway_clock.now)
    await memory.record_usage("1", [record(today, "team", "bailian", "main", "m", 5, 5, cost=9)])
    assert await reporter.refresh() is True
    assert metrics.client_tokens_today.labels("team")._value.get() == 10

    store.down = True
    await memory.record_usage("2", [record(today, "team", "bailian", "main", "m", 5, 5, cost=9)])
    assert await reporter.refresh() is False
    assert metrics.store_up._value.get() == 0
    # the last good figures stay until the store answers again
    assert metrics.client_tokens_today.labels("team")._value.get() == 10

    store.down = False
    assert await reporter.refresh() is True
    assert metrics.store_up._value.get() == 1
    assert metrics.client_tokens_today.labels("team")._value.get() == 20
    assert metrics.cost_today.labels("bailian", "CNY")._value.get() == 18e-9


# -- the status tables --------------------------------------------------------------------------


def test_amounts_read_plainly() -> None:
    assert [amount(v) for v in (0, 12.5, 0.01, 0.000123, 1.250000007, 3)] == [
        "0.00",
        "12.50",
        "0.01",
        "0.000123",
        "1.25",
        "3.00",
    ]


async def test_status_tables_show_tokens_cost_and_limits(gateway_clock: GatewayClock) -> None:
    settings = settings_with_money()
    store = MemoryStore()
    await store.record_usage("b", usage_of_two_days(settings, gateway_clock.now))
    async with (
        serving(settings, gateway_clock, store) as (url, _app),
        aiohttp.ClientSession(headers=ADMIN) as http,
    ):
        document = {
            "quota": (await get(http, url + "/admin/quota"))[1],
            "clients": (await get(http, url + "/admin/clients"))[1],
        }
    console = Console(width=400, record=True, color_system=None)
    render(document, console)
    lines = console.export_text().splitlines()

    def row(*cells: str) -> list[str]:
        """The table line that holds every cell, split into its cells."""
        [line] = [ln for ln in lines if all(c in ln for c in cells)]
        return [c.strip() for c in line.split("│")[1:-1]]

    bailian = row("bailian", "(all keys)")
    assert bailian[-2:] == ["1915", "4.25 of 10.00 CNY (5.75 left)"]
    assert row("alice", "(all models)")[-2:] == ["150", "0.00 CNY"]
    team = row("team")
    assert team[-5:] == ["1890", "5000 (3110)", "1.25 CNY", "2.00 CNY (0.75)", "30 / 90000"]
    bots = row("bots")
    assert bots[-5:] == ["400", "no cap", "3.00 CNY", "no cap", "no cap / no cap"]
