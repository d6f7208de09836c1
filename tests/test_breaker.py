"""Provider breakers: unit tests on a fake clock, then end to end with the simulator.

The rule: failures alike on 3 distinct keys (every key of a smaller provider) within 10 s open a
breaker, unless something of the provider answered well in those 10 s (for a throttle: the
provider for that model); tests/test_partial_outage.py has a partly failing provider end to end.

End to end, a provider-wide fault (every ModelScope token answering 503, or an HTML 403 from
a WAF) must cost a few attempts, not one per key per request: after the breaker opens,
requests go straight to the next route, no key is disabled or long-cooled, and ModelScope
serves again once the breaker's time has passed and the fault is gone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.breaker import MAX_CIRCUITS, BreakerPolicy, Breakers, Open, Signature
from router.classify import Outcome
from router.demo import running
from router.quota.types import KeyState
from tests.conftest import MODEL, TOKENS, GatewayClock
from tests.test_disconnects import Gateway, in_process_gateway
from tests.test_failover import (
    OTHER_MODEL,
    THIRD_MODEL,
    Reply,
    chat,
    config_of,
    make_sim,
    rejected,
    served_by,
    stats,
    used,
)

F, T, OK = Outcome.UPSTREAM_FAILURE, Outcome.THROTTLED, Outcome.OK
MS = "modelscope"


class Seconds:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def seconds() -> Seconds:
    return Seconds()


@pytest.fixture
def breakers(seconds: Seconds) -> Breakers:
    return Breakers(seconds)


def fail(b: Breakers, *keys: str, outcome: Outcome = F, model: str = MODEL, n: int = 3) -> Any:
    """Record one answer per key; the last record's result."""
    result = None
    for key in keys:
        result = b.record(MS, model, key, outcome, n)
    return result


# -- unit -----------------------------------------------------------------------------------


def test_three_distinct_keys_within_the_window_open_it_for_15_s(
    breakers: Breakers, seconds: Seconds
) -> None:
    assert fail(breakers, "a", "b") is None
    assert breakers.blocking(MS, MODEL) is None
    seconds.now += 9.9
    opened = fail(breakers, "c")
    assert opened == Open(MS, None, Signature.FAILURE, seconds.now + 15, 1, ("a", "b", "c"))
    # a failure breaker stops the whole provider, every model
    assert breakers.blocking(MS, MODEL) == Open(MS, None, Signature.FAILURE, opened.until, 1)
    assert breakers.blocking(MS, OTHER_MODEL) is not None
    assert breakers.blocking("bailian", MODEL) is None
    seconds.now += 14.9
    assert breakers.blocking(MS, MODEL) is not None
    seconds.now += 0.2
    assert breakers.blocking(MS, MODEL) is None


def test_one_key_failing_again_and_again_is_that_keys_business(breakers: Breakers) -> None:
    for _ in range(20):
        assert fail(breakers, "a") is None
    assert fail(breakers, "b") is None
    assert breakers.blocking(MS, MODEL) is None


def test_failures_outside_the_window_do_not_add_up(breakers: Breakers, seconds: Seconds) -> None:
    fail(breakers, "a")
    seconds.now += 6
    fail(breakers, "b")
    seconds.now += 6  # a's failure is 12 s old
    assert fail(breakers, "c") is None
    assert breakers.blocking(MS, MODEL) is None
    assert fail(breakers, "a") is not None  # b, c and a again within 10 s


@pytest.mark.parametrize(("keys", "trips_after"), [(2, 2), (3, 3), (5, 3), (1, None)])
def test_a_small_provider_trips_when_all_its_keys_fail(
    seconds: Seconds, keys: int, trips_after: int | None
) -> None:
    b = Breakers(seconds)
    names = [f"k{i}" for i in range(keys)]
    results = [fail(b, name, n=keys) for name in names]
    opened_at = [i + 1 for i, r in enumerate(results) if r is not None]
    if trips_after is None:  # one key: its own cooldown is already the provider's
        assert opened_at == []
        assert b.blocking(MS, MODEL) is None
    else:
        assert opened_at == [trips_after]


def test_a_success_closes_it_and_forgets_the_doubling(breakers: Breakers, seconds: Seconds) -> None:
    first = fail(breakers, "a", "b", "c")
    assert first.until == seconds.now + 15
    breakers.record(MS, OTHER_MODEL, "a", OK, 3)  # any model: the provider answers
    assert breakers.blocking(MS, MODEL) is None
    seconds.now += 1
    assert fail(breakers, "a", "b", "c") is None  # it answered 1 s ago: not down
    seconds.now += 10  # the success is out of the window; b's and c's failures are not
    again = fail(breakers, "a")
    assert (again.until - seconds.now, again.trips, again.keys) == (15, 1, ("a", "b", "c"))


# -- a partly failing provider (issue #11) ---------------------------------------------------


def test_keys_failing_beside_a_key_that_answers_never_open_it(
    breakers: Breakers, seconds: Seconds
) -> None:
    # a, b and c fail both provider-wide ways, over and over; d keeps answering
    for _ in range(60):
        breakers.record(MS, MODEL, "d", OK, 4)
        for _ in range(4):
            assert fail(breakers, "a", "b", "c", n=4) is None
            assert fail(breakers, "a", "b", "c", outcome=T, n=4) is None
            seconds.now += 2.5  # the next success comes 10 s after this one
    assert breakers.blocking(MS, MODEL) is None


def test_one_success_keeps_it_closed_for_the_whole_window(
    breakers: Breakers, seconds: Seconds
) -> None:
    breakers.record(MS, MODEL, "d", OK, 4)
    seconds.now += 10  # the last moment the success is in the window
    assert fail(breakers, "a", "b", "c", n=4) is None
    assert breakers.blocking(MS, MODEL) is None
    seconds.now += 0.5
    opened = fail(breakers, "a", n=4)  # a, b and c failed, nothing answered for 10.5 s
    assert opened == Open(MS, None, Signature.FAILURE, seconds.now + 15, 1, ("a", "b", "c"))


def test_a_two_key_provider_with_one_healthy_key_never_opens(
    breakers: Breakers, seconds: Seconds
) -> None:
    for _ in range(10):
        assert fail(breakers, "a", n=2) is None
        breakers.record(MS, MODEL, "b", OK, 2)
        seconds.now += 1
    seconds.now += 10.5  # b quiet for longer than the window: a alone is still a's business
    assert fail(breakers, "a", n=2) is None
    assert fail(breakers, "b", n=2) is not None  # now both keys fail, nothing answers


def test_any_model_answering_counts_against_a_failure_breaker_only_its_own_against_a_throttle(
    breakers: Breakers, seconds: Seconds
) -> None:
    breakers.record(MS, OTHER_MODEL, "d", OK, 4)
    assert fail(breakers, "a", "b", "c", n=4) is None  # the provider answers: not down
    # OTHER_MODEL's success says nothing of a throttle on MODEL
    opened = fail(breakers, "a", "b", "c", outcome=T, n=4)
    assert opened == Open(MS, MODEL, Signature.THROTTLE, seconds.now + 15, 1, ("a", "b", "c"))
    breakers.record(MS, MODEL, "d", OK, 4)  # closes it; keeps it from opening for 10 s
    assert breakers.blocking(MS, MODEL) is None
    seconds.now += 5
    assert fail(breakers, "a", "b", "c", outcome=T, n=4) is None
    assert fail(breakers, "a", "b", "c", outcome=T, model=THIRD_MODEL, n=4) is not None


def test_a_success_arriving_after_it_opened_closes_it_and_keeps_it_closed(
    breakers: Breakers, seconds: Seconds
) -> None:
    # a burst after a quiet spell: three keys fail before the healthy key's first answer
    opened = fail(breakers, "a", "b", "c", n=4)
    assert opened is not None
    breakers.record(MS, MODEL, "d", OK, 4)  # the answer of a call sent before it opened
    assert breakers.blocking(MS, MODEL) is None
    for _ in range(9):
        seconds.now += 1
        assert fail(breakers, "a", "b", "c", n=4) is None
    assert breakers.blocking(MS, MODEL) is None


def test_the_successes_remembered_are_bounded(breakers: Breakers, seconds: Seconds) -> None:
    for i in range(MAX_CIRCUITS + 500):
        breakers.record(MS, f"model-{i}", "a", OK, 3)
    assert len(breakers._served) <= MAX_CIRCUITS
    # the provider's own success is never the one forgotten
    assert fail(breakers, "a", "b", "c") is None


def test_a_failure_when_half_open_reopens_it_for_twice_as_long_up_to_5_min(
    breakers: Breakers, seconds: Seconds
) -> None:
    opened = fail(breakers, "a", "b", "c")
    spans = [opened.until - seconds.now]
    for _ in range(7):
        seconds.now = opened.until + 0.5  # half-open: one failure is enough
        opened = fail(breakers, "b")
        assert opened is not None
        assert opened.keys == ()
        spans.append(opened.until - seconds.now)
    assert spans == [15, 30, 60, 120, 240, 300, 300, 300]
    assert opened.trips == 8


def test_half_open_ends_after_the_window_then_three_keys_are_needed_again(
    breakers: Breakers, seconds: Seconds
) -> None:
    opened = fail(breakers, "a", "b", "c")
    seconds.now = opened.until + 11  # past the half-open window: counting from scratch
    assert fail(breakers, "a") is None
    reopened = fail(breakers, "b", "c")
    assert (reopened.until - seconds.now, reopened.trips) == (30, 2)  # soon after: doubled
    # long after the last trip (more than 5 min): a new incident starts at 15 s again
    seconds.now = reopened.until + 301
    fresh = fail(breakers, "a", "b", "c")
    assert (fresh.until - seconds.now, fresh.trips) == (15, 1)


def test_answers_that_arrive_while_open_change_nothing(
    breakers: Breakers, seconds: Seconds
) -> None:
    opened = fail(breakers, "a", "b", "c")
    seconds.now += 5
    assert fail(breakers, "a", "b", "c") is None
    assert breakers.blocking(MS, MODEL) == Open(MS, None, Signature.FAILURE, opened.until, 1)


def test_throttles_across_keys_open_a_breaker_for_that_model_only(
    breakers: Breakers, seconds: Seconds
) -> None:
    opened = fail(breakers, "a", "b", "c", outcome=T)
    assert opened == Open(MS, MODEL, Signature.THROTTLE, seconds.now + 15, 1, ("a", "b", "c"))
    assert breakers.blocking(MS, MODEL) == Open(MS, MODEL, Signature.THROTTLE, opened.until, 1)
    assert breakers.blocking(MS, OTHER_MODEL) is None
    # a success on another model does not close this model's throttle breaker
    breakers.record(MS, OTHER_MODEL, "a", OK, 3)
    assert breakers.blocking(MS, MODEL) is not None
    breakers.record(MS, MODEL, "a", OK, 3)
    assert breakers.blocking(MS, MODEL) is None


def test_signatures_do_not_mix(breakers: Breakers) -> None:
    fail(breakers, "a", "b")
    assert fail(breakers, "c", outcome=T) is None
    assert fail(breakers, "a", "b", outcome=T) is not None  # three throttled keys


def test_the_longer_breaker_is_reported(breakers: Breakers, seconds: Seconds) -> None:
    fail(breakers, "a", "b", "c", outcome=T)
    seconds.now += 5
    failure = fail(breakers, "a", "b", "c")
    blocking = breakers.blocking(MS, MODEL)
    assert blocking is not None
    assert (blocking.signature, blocking.until) == (Signature.FAILURE, failure.until)


@pytest.mark.parametrize(
    "outcome",
    [o for o in Outcome if o not in (Outcome.OK, Outcome.UPSTREAM_FAILURE, Outcome.THROTTLED)],
)
def test_key_and_model_outcomes_neither_count_nor_close(
    breakers: Breakers, outcome: Outcome
) -> None:
    # exhausted, rejected, quota-throttled keys, unknown models, client errors: about a key
    # or a model, never the provider
    assert fail(breakers, "a", "b", "c", "d", outcome=outcome) is None
    assert breakers.blocking(MS, MODEL) is None
    fail(breakers, "a", "b", "c")
    fail(breakers, "d", outcome=outcome)
    assert breakers.blocking(MS, MODEL) is not None


def test_the_policy_is_adjustable(seconds: Seconds) -> None:
    b = Breakers(seconds, BreakerPolicy(trip_keys=2, window_s=1, open_s=4, max_open_s=5))
    assert fail(b, "a", "b").until == seconds.now + 4
    seconds.now += 4.5
    assert fail(b, "a").until == seconds.now + 5  # 8 s doubled, capped at 5


def test_the_number_of_circuits_is_bounded(breakers: Breakers, seconds: Seconds) -> None:
    for i in range(MAX_CIRCUITS + 500):
        breakers.record(MS, f"model-{i}", "a", T, 3)
    assert len(breakers._circuits) <= MAX_CIRCUITS


# -- end to end -----------------------------------------------------------------------------


async def states(gw: Gateway, clock: GatewayClock, index: int = 0) -> dict[str, KeyState]:
    return {u.key: u.state for u in await gw.snapshot(clock, index)}


async def test_an_outage_on_every_modelscope_token_opens_the_breaker_and_bailian_serves(
    gateway_clock: GatewayClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.failover")
    async with (
        make_sim(gateway_clock) as sim,
        in_process_gateway(sim, gateway_clock, config_of(sim)) as gw,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("status_503", count=-1, provider="modelscope")
        # the first request meets alice, bob and carol failing: the breaker opens
        served_by(await chat(http, gw.url), "bailian", "main")
        assert rejected(sim, "modelscope", "503") == 3
        # then straight to Bailian: no ModelScope attempt at all, streams too
        for stream in (False, True, False, True, False):
            reply = await chat(http, gw.url, stream=stream)
            served_by(reply, "bailian", "main")
            gateway_clock.advance(
                seconds=2
            )  # 10 s in all: still open, keys' own cooldowns long over
        assert rejected(sim, "modelscope", "503") == 3
        assert stats(sim, "modelscope")["calls"] == 0
        # no key disabled or spent; nothing is cooling any more either
        assert await states(gw, gateway_clock) == {n: KeyState.AVAILABLE for n, _ in TOKENS}
        assert (
            gw.registry.get_sample_value(
                "router_failovers_total",
                {"from_provider": "modelscope", "to_provider": "bailian", "reason": "breaker_open"},
            )
            == 5
        )
        # the breaker's time passes and the outage ends: ModelScope serves again
        sim.faults.clear()
        gateway_clock.advance(seconds=6)
        served_by(await chat(http, gw.url), "modelscope", "alice")
        served_by(await chat(http, gw.url), "modelscope", "alice")
    assert used(sim) == {"alice": 2, "bob": 0, "carol": 0}
    assert used(sim, "bailian") == {"main": 6}
    assert "KEY DISABLED" not in caplog.text
    opened = [r.getMessage() for r in caplog.records if "breaker open" in r.getMessage()]
    assert opened == [
        "provider breaker open: modelscope skipped for 15 s after upstream_failure on "
        "alice, bob, carol (trip 1)"
    ]


async def test_with_no_other_route_the_client_gets_503_with_retry_after_to_the_breakers_end(
    gateway_clock: GatewayClock,
) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        in_process_gateway(sim, gateway_clock, config_of(sim, bailian=None)) as gw,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("status_503", count=-1, provider="modelscope")
        first = await chat(http, gw.url)
        assert_unavailable(first, retry_after=15)
        gateway_clock.advance(seconds=5)
        assert_unavailable(await chat(http, gw.url, stream=True), retry_after=10)
        assert rejected(sim, "modelscope", "503") == 3  # the second never went upstream
        # half-open after 15 s: one try, still failing, opens it again for 30 s
        gateway_clock.advance(seconds=10.5)
        assert_unavailable(await chat(http, gw.url), retry_after=30)
        assert rejected(sim, "modelscope", "503") == 4
        assert all(s is not KeyState.DISABLED for s in (await states(gw, gateway_clock)).values())
        sim.faults.clear()
        gateway_clock.advance(seconds=30)
        served_by(await chat(http, gw.url), "modelscope", "alice")
    assert used(sim) == {"alice": 1, "bob": 0, "carol": 0}


def assert_unavailable(reply: Reply, retry_after: int) -> None:
    assert reply.status == 503, reply.body
    assert reply.headers["Retry-After"] == str(retry_after)
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "upstream_unavailable")
    assert "failing on several keys" in error["message"]
    assert "x-router-key" not in reply.headers


async def test_a_throttle_on_every_token_skips_that_model_only(gateway_clock: GatewayClock) -> None:
    async with make_sim(gateway_clock) as sim:
        config = config_of(sim)
        async with (
            in_process_gateway(sim, gateway_clock, config) as gw,
            aiohttp.ClientSession() as http,
        ):
            sim.faults.add("throttle", count=-1, model=MODEL, provider="modelscope")
            for _ in range(4):
                served_by(await chat(http, gw.url), "bailian", "main")
                gateway_clock.advance(
                    seconds=3
                )  # past the keys' own 2 s cooldowns, not the breaker's
            assert rejected(sim, "modelscope", "429") == 3
            # another model is not throttled: ModelScope serves it at once
            served_by(await chat(http, gw.url, OTHER_MODEL), "modelscope", "alice")
            assert all(
                s is not KeyState.DISABLED for s in (await states(gw, gateway_clock)).values()
            )
    # throttled calls are given back: nothing counted for them
    assert used(sim) == {"alice": 1, "bob": 0, "carol": 0}


async def test_a_throttle_breaker_with_no_other_route_is_a_429_with_retry_after(
    gateway_clock: GatewayClock,
) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        in_process_gateway(sim, gateway_clock, config_of(sim, bailian=None)) as gw,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("throttle", count=-1, provider="modelscope")
        reply = await chat(http, gw.url)
        assert reply.status == 429, reply.body
        assert reply.headers["Retry-After"] == "15"
        assert reply.json()["error"]["code"] == "rate_limited"
        gateway_clock.advance(seconds=3)  # the keys' own 2 s cooldowns are over; the breaker is not
        reply = await chat(http, gw.url)
        assert (reply.status, reply.headers["Retry-After"]) == (429, "12")
    assert rejected(sim, "modelscope", "429") == 3


# -- a WAF in front of the provider ---------------------------------------------------------

WAF_PAGE = (
    "<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>"
    "<h1>Access denied</h1><p>Your request was blocked by the web application firewall."
    "</p></body></html>"
)


@asynccontextmanager
async def waf(calls: list[str]) -> AsyncIterator[str]:
    """An upstream whose every call is refused with an HTML 403 page."""

    async def blocked(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization", ""))
        return web.Response(status=403, text=WAF_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", blocked)
    async with running(app) as url:
        yield url


async def test_an_html_403_on_every_token_disables_no_key(
    gateway_clock: GatewayClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    async with make_sim(gateway_clock) as sim, waf(calls) as blocked_url:
        config = config_of(sim)
        config["providers"][0]["base_url"] = f"{blocked_url}/v1"
        config["providers"][0]["models"] = [MODEL]
        async with (
            in_process_gateway(sim, gateway_clock, config) as gw,
            aiohttp.ClientSession() as http,
        ):
            for _ in range(5):
                served_by(await chat(http, gw.url), "bailian", "main")
                gateway_clock.advance(
                    seconds=2.5
                )  # past the keys' own cooldowns, not the breaker's
            assert len(calls) == 3  # one per key, then the breaker
            assert len(set(calls)) == 3
            assert await states(gw, gateway_clock) != {}
            assert all(
                s is not KeyState.DISABLED for s in (await states(gw, gateway_clock)).values()
            )
            errors = gw.registry.get_sample_value(
                "router_upstream_errors_total",
                {"provider": "modelscope", "key": "alice", "kind": "forbidden_not_json"},
            )
            assert errors == 1
    assert "KEY DISABLED" not in caplog.text
    assert used(sim, "bailian") == {"main": 5}
