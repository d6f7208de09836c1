"""Tokens, cost and the limits on them, below the HTTP layer: the per-minute windows
(router/quota/rates.py), prices (router/pricing.py), the config, and every store's
``record_usage``, ``usage`` and the refusals of ``reserve`` (memory, SQLite, Redis: one server,
Cluster, Sentinel; the ``store`` fixture). Through the gateway: tests/test_budgets.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import ConfigError, Price, Settings, load_settings
from router.pricing import NANOS, Prices, cost_nanos, from_nanos, to_nanos
from router.quota import rates
from router.quota.store import QuotaStore
from router.quota.types import (
    ClientQuota,
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Strategy,
    UsageRecord,
    UsageRow,
)
from router.usage import Usage
from tests.conftest import FakeClock

# -- per-minute windows ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 6),
    gaps=st.lists(st.integers(0, 30_000) | st.sampled_from([0, 1, 999, 1000, 59_999]), max_size=60),
)
def test_a_window_holds_its_limit_in_any_minute_and_refuses_at_most_a_second_early(
    limit: int, gaps: list[int]
) -> None:
    """Calls at random times, each taken when its window has room: no 60 s span ever holds
    more than ``limit`` of them, and a call is refused only when ``limit`` were taken in the
    61 seconds before it (the window's whole seconds)."""
    raw: str | None = None
    taken: list[int] = []
    now = 1_700_000_000_000
    for gap in gaps:
        now += gap
        kept, total = rates.window(raw, now)
        if total < limit:
            raw = rates.add(kept, now, 1)
            taken.append(now)
        else:
            assert sum(1 for t in taken if t > now - 61_000) >= limit
            retry = rates.retry_at(kept, total, limit)
            assert retry is not None
            assert retry > now
            assert rates.window(raw, retry)[1] < limit  # room at retry_at ...
            assert rates.window(raw, retry - 1)[1] >= limit  # ... and not a millisecond before
    for t in taken:
        assert sum(1 for u in taken if t - 60_000 < u <= t) <= limit


def test_a_window_is_short_text_whatever_the_count() -> None:
    raw = None
    for ms in range(0, 120_000, 10):  # 12,000 calls over two minutes
        kept, _ = rates.window(raw, 1_700_000_000_000 + ms)
        raw = rates.add(kept, 1_700_000_000_000 + ms, 1)
    assert raw is not None
    assert len(rates.parse(raw)) == 61  # the last 61 seconds, 100 calls each
    assert rates.window(raw, 1_700_000_120_000)[1] == 6000


def test_blocked_until_is_none_without_a_limit_or_below_it() -> None:
    raw = "100:2,130:1"
    assert rates.blocked_until(raw, None, 130_000) is None
    assert rates.blocked_until(raw, 4, 130_000) is None
    assert rates.blocked_until(raw, 3, 130_000) == 161_000  # second 100 leaves at 161


# -- prices ------------------------------------------------------------------------------------


def test_cost_is_tokens_times_price_per_million_in_nanos() -> None:
    price = Price(input=2.0, output=8.0)
    # 1,000 input tokens at 2 per million = 0.002; 500 output tokens at 8 per million = 0.004
    assert cost_nanos(price, Usage(1000, 500, 1500)) == 6_000_000
    assert from_nanos(6_000_000) == 0.006
    # Cache reads and writes cost the input price unless priced apart.
    assert cost_nanos(price, Usage(0, 0, 30, cache_read=10, cache_write=20)) == 60_000
    cached = Price(input=2.0, output=8.0, cache_read=0.5, cache_write=2.5)
    assert cost_nanos(cached, Usage(0, 0, 30, cache_read=10, cache_write=20)) == 55_000
    assert to_nanos(20.0) == 20 * NANOS


def _settings(**bailian: object) -> Settings:
    return Settings.model_validate(
        {
            "providers": [
                {
                    "name": "modelscope",
                    "type": "modelscope",
                    "base_url": "http://127.0.0.1:1/v1",
                    "keys": [{"name": "a", "secret": "ms-a"}],
                },
                {
                    "name": "bailian",
                    "type": "bailian",
                    "base_url": "http://127.0.0.1:2/v1",
                    "keys": [{"name": "main", "secret": "sk-b"}],
                    **bailian,
                },
            ]
        }
    )


def test_prices_look_up_the_exact_id_then_patterns_in_order() -> None:
    prices = Prices(
        _settings(
            prices={
                "qwen3-*": {"input": 1.0, "output": 1.0},
                "qwen3-32b": {"input": 2.0, "output": 8.0},
                "*": {"input": 4.0, "output": 4.0},
            }
        )
    )
    usage = Usage(1_000_000, 0, 1_000_000)
    assert prices.cost("bailian", "qwen3-32b", usage) == 2 * NANOS  # exact beats the pattern
    assert prices.cost("bailian", "qwen3-8b", usage) == 1 * NANOS  # the first pattern
    assert prices.cost("bailian", "deepseek-r1", usage) == 4 * NANOS
    assert prices.cost("modelscope", "qwen3-32b", usage) == 0  # free calls cost nothing


def test_an_unpriced_model_costs_nothing_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prices = Prices(_settings(prices={"qwen3-32b": {"input": 2.0, "output": 8.0}}))
    with caplog.at_level("WARNING", logger="router.pricing"):
        assert prices.cost("bailian", "other", Usage(10, 10, 20)) == 0
        assert prices.cost("bailian", "other", Usage(10, 10, 20)) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "no price for other on bailian: its calls count 0 toward budgets and cost "
        "(add it to providers[].prices)"
    ]


def test_money_settings_are_checked(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "c.yaml"  # type: ignore[operator]
    free_priced = """
providers:
  - name: ms
    type: modelscope
    base_url: http://127.0.0.1:1/v1
    daily_budget: 5
    keys: [{name: a, secret: ms-a}]
"""
    path.write_text(free_priced)
    with pytest.raises(ConfigError, match=r"providers\[0\]: .*daily_budget: the provider 'ms' is"):
        load_settings(path)
    two_currencies = """
providers:
  - {name: b1, type: bailian, base_url: "http://127.0.0.1:1/v1", currency: CNY,
     keys: [{name: a, secret: sk-a}]}
  - {name: b2, type: openai, base_url: "http://127.0.0.1:2/v1", currency: USD,
     keys: [{name: a, secret: sk-b}]}
clients:
  - {name: bob, key: sk-client, daily_budget: 5}
"""
    path.write_text(two_currencies)
    with pytest.raises(ConfigError, match=r"clients\[0\].daily_budget: .*\(CNY, USD\)"):
        load_settings(path)
    bad = """
providers:
  - {name: b, type: bailian, base_url: "http://127.0.0.1:1/v1", currency: yuan, rpm: 0,
     keys: [{name: a, secret: sk-a}]}
"""
    path.write_text(bad)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "providers[0].currency" in str(caught.value)
    assert "providers[0].rpm" in str(caught.value)


# -- the stores --------------------------------------------------------------------------------

DAY = "20991230"
PROVIDER = "bailian"
KEYS = (KeySpec("k0", "fp0", None, None), KeySpec("k1", "fp1", None, None))


def _record(clock: FakeClock, *, client: str = "bob", key: str = "k0", **kw: int) -> UsageRecord:
    fields: dict[str, int] = {"prompt": 10, "completion": 5, "total": 15, "cost": 700} | kw
    return UsageRecord(
        day=DAY,
        day_end_ms=clock() + 3_600_000,
        client=client,
        provider=PROVIDER,
        key=key,
        model="qwen3-32b",
        at_ms=clock(),
        tpm=True,
        **fields,
    )


def _req(
    clock: FakeClock,
    client: ClientQuota | None = None,
    budget: int | None = None,
    keys: tuple[KeySpec, ...] = KEYS,
) -> ReserveRequest:
    return ReserveRequest(
        PROVIDER,
        "qwen3-32b",
        keys,
        Strategy.FILL_FIRST,
        DAY,
        clock(),
        clock() + 3_600_000,
        client,
        budget,
    )


async def test_usage_is_added_once_per_batch_and_read_back(
    store: QuotaStore, clock: FakeClock
) -> None:
    batch = [_record(clock), _record(clock, key="k1"), _record(clock, total=9, prompt=9)]
    await store.record_usage("batch-1", batch)
    await store.record_usage("batch-1", batch)  # a retry after a lost reply adds nothing
    await store.record_usage("batch-2", [_record(clock, client="amy", cost=0, estimated=True)])
    assert await store.usage(DAY) == [
        UsageRow("amy", PROVIDER, "k0", "qwen3-32b", 10, 5, 15, 0, 1, 1),
        UsageRow("bob", PROVIDER, "k0", "qwen3-32b", 19, 10, 24, 1400, 2, 0),
        UsageRow("bob", PROVIDER, "k1", "qwen3-32b", 10, 5, 15, 700, 1, 0),
    ]
    assert await store.usage("20991231") == []


async def test_a_provider_budget_refuses_once_the_recorded_cost_reaches_it(
    store: QuotaStore, clock: FakeClock
) -> None:
    assert isinstance(await store.reserve(_req(clock, budget=1400)), Reservation)
    await store.record_usage("b1", [_record(clock, cost=1399)])
    assert isinstance(await store.reserve(_req(clock, budget=1400)), Reservation)
    await store.record_usage("b2", [_record(clock, cost=1)])
    refused = await store.reserve(_req(clock, budget=1400))
    assert refused == NoCapacity(PROVIDER, "qwen3-32b", None, Refusal.PROVIDER_BUDGET, 1400)
    assert isinstance(await store.reserve(_req(clock, budget=1401)), Reservation)


async def test_a_client_is_refused_at_its_daily_tokens_or_budget(
    store: QuotaStore, clock: FakeClock
) -> None:
    await store.record_usage("b1", [_record(clock, total=100, cost=500)])
    tokens = ClientQuota("bob", None, None, daily_tokens=100)
    budget = ClientQuota("bob", None, None, daily_budget=500)
    roomy = ClientQuota("bob", None, None, daily_tokens=101, daily_budget=501)
    assert (await store.reserve(_req(clock, tokens))) == NoCapacity(
        PROVIDER, "qwen3-32b", None, Refusal.CLIENT_TOKENS, 100
    )
    assert (await store.reserve(_req(clock, budget))) == NoCapacity(
        PROVIDER, "qwen3-32b", None, Refusal.CLIENT_BUDGET, 500
    )
    assert isinstance(await store.reserve(_req(clock, roomy)), Reservation)
    other = ClientQuota("amy", None, None, daily_tokens=1, daily_budget=1)
    assert isinstance(await store.reserve(_req(clock, other)), Reservation)


async def test_a_client_rpm_holds_and_says_when_there_is_room(
    store: QuotaStore, clock: FakeClock
) -> None:
    quota = ClientQuota("bob", None, None, rpm=2)
    first_second = clock() // 1000
    assert isinstance(await store.reserve(_req(clock, quota)), Reservation)
    clock.advance(30_000)
    assert isinstance(await store.reserve(_req(clock, quota)), Reservation)
    # a later attempt of the same request is not counted again
    again = ClientQuota("bob", None, None, rpm=2, count_rate=False)
    assert isinstance(await store.reserve(_req(clock, again)), Reservation)
    refused = await store.reserve(_req(clock, quota))
    assert isinstance(refused, NoCapacity)
    assert refused.reason is Refusal.CLIENT_RPM
    assert refused.retry_at_ms == (first_second + 61) * 1000
    assert refused.client_limit == 2
    clock.ms = (first_second + 61) * 1000
    assert isinstance(await store.reserve(_req(clock, quota)), Reservation)


async def test_a_client_tpm_counts_the_recorded_tokens_of_the_last_minute(
    store: QuotaStore, clock: FakeClock
) -> None:
    quota = ClientQuota("bob", None, None, tpm=30)
    await store.record_usage("b1", [_record(clock, total=29)])
    assert isinstance(await store.reserve(_req(clock, quota)), Reservation)
    await store.record_usage("b2", [_record(clock, total=1)])
    refused = await store.reserve(_req(clock, quota))
    assert isinstance(refused, NoCapacity)
    assert refused.reason is Refusal.CLIENT_TPM
    assert refused.retry_at_ms == (clock() // 1000 + 61) * 1000
    clock.advance(61_000)
    assert isinstance(await store.reserve(_req(clock, quota)), Reservation)


async def test_a_key_at_its_rpm_is_skipped_like_a_cooling_key(
    store: QuotaStore, clock: FakeClock
) -> None:
    keys = (KeySpec("k0", "fp0", None, None, 2), KeySpec("k1", "fp1", None, None, 1))
    served = []
    for _ in range(3):
        outcome = await store.reserve(_req(clock, keys=keys))
        assert isinstance(outcome, Reservation)
        served.append(outcome.key)
    assert served == ["k0", "k0", "k1"]
    refused = await store.reserve(_req(clock, keys=keys))
    assert refused == NoCapacity(PROVIDER, "qwen3-32b", (clock() // 1000 + 61) * 1000)
    clock.advance(61_000)
    outcome = await store.reserve(_req(clock, keys=keys))
    assert isinstance(outcome, Reservation)
    assert outcome.key == "k0"
