"""A partly failing provider keeps serving on its healthy keys (issue #11), end to end.

The gateway runs in this process against the simulator over real HTTP on loopback. ModelScope
has five tokens: four fail, each its own way (a 503, a connection reset, a hang until the read
timeout, an HTML page), while dave answers. Under a burst of concurrent requests each failing
key cools down alone and dave serves everything: no 503, nothing sent to the paid fallback
(Bailian), and the provider breaker never opens, since dave's successes say the provider is
up. Once every key fails and no success is left in the breaker's window, it still opens and
Bailian serves.

ModelScope serves a few requests before its keys start failing, as a provider in use does; dave
then answers 100 ms after the others fail, so within a burst three distinct keys fail before
any success comes back (what opened the breaker before issue #11). The gateway and the
simulator share a GatewayClock that no test moves during a burst, so every answer of a burst falls
within the breaker's window: the outcome does not depend on how the burst's answers interleave.
Wall-clock time only delays answers (dave's latency, the hanging key's read timeout); no test
sleeps to wait for something.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from router.breaker import Breakers
from router.quota.types import KeyState
from router.simulator import ModelScopeToken, Simulator
from router.state import LIVE
from tests.conftest import MODEL, GatewayClock
from tests.support import gateway_config
from tests.test_disconnects import Gateway, in_process_gateway
from tests.test_failover import Reply, chat, make_sim, stats, used
from tests.test_gateway import rejected

MS = "modelscope"
FAILING = {  # key -> how it fails (router.simulator.faults)
    "alice": "status_503",
    "bob": "reset",
    "carol": "hang",  # a read timeout, after READ_TIMEOUT_S
    "erin": "html_200",
}
HEALTHY = "dave"
HEALTHY_LATENCY = "latency:100"  # dave answers well, but later than the others fail
KEYS = [(name, f"ms-po-{name}") for name in ("alice", "bob", "carol", HEALTHY, "erin")]
BURST = 50
READ_TIMEOUT_S = 0.5


def five_key_sim(clock: GatewayClock) -> Simulator:
    tokens = [
        ModelScopeToken(secret=s, name=n, daily_limit=10_000, model_daily_limit=10_000)
        for n, s in KEYS
    ]
    return make_sim(clock, tokens=tokens)


def config_for(sim: Simulator) -> dict[str, Any]:
    """ModelScope's five keys, spread round robin, then the paid Bailian as the fallback."""
    config = gateway_config(
        sim.modelscope_url,
        sim.bailian_url,
        tokens=[(n, s, 10_000) for n, s in KEYS],
        max_attempts=len(KEYS),  # room for a request to meet every failing key first
    )
    modelscope = config["providers"][0]
    modelscope["strategy"] = "round_robin"
    modelscope["timeout_seconds"] = READ_TIMEOUT_S
    return config


def breakers(gw: Gateway) -> Breakers:
    found: Breakers = gw.app[LIVE].runtime.failover.breakers
    return found


async def burst(http: aiohttp.ClientSession, url: str, n: int = BURST) -> list[Reply]:
    """``n`` concurrent chat requests, every other one streamed."""
    return await asyncio.gather(*(chat(http, url, stream=i % 2 == 1) for i in range(n)))


def failovers(gw: Gateway, reason: str) -> float:
    value = gw.registry.get_sample_value(
        "router_failovers_total",
        {"from_provider": MS, "to_provider": "bailian", "reason": reason},
    )
    return value or 0.0


async def states(gw: Gateway, clock: GatewayClock) -> dict[str, KeyState]:
    return {u.key: u.state for u in await gw.snapshot(clock)}


def assert_served_by(replies: list[Reply], provider: str, key: str) -> None:
    wrong = [(r.status, r.served, r.body[:200]) for r in replies if r.status != 200]
    wrong += [(r.status, r.served, b"") for r in replies if r.served != (provider, key)]
    assert wrong == []


def breaker_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "breaker open" in r.getMessage()]


async def serving(http: aiohttp.ClientSession, url: str) -> None:
    """ModelScope serving normally (one request per key) before some of its keys fail."""
    for _ in KEYS:
        reply = await chat(http, url)
        assert (reply.status, reply.served[0]) == (200, MS)


def failures(sim: Simulator) -> int:
    """The failures ModelScope's simulator answered (or hung up on) so far."""
    fired: dict[str, int] = stats(sim, MS)["faults_fired"]
    return sum(n for kind, n in fired.items() if kind != HEALTHY_LATENCY)


def failing_but(sim: Simulator, healthy: str) -> None:
    """Every key but ``healthy`` fails, each its own way, from now on."""
    for name, kind in FAILING.items():
        sim.faults.add(kind, count=-1, token=name, provider=MS)
    sim.faults.add(HEALTHY_LATENCY, count=-1, token=healthy, provider=MS)


async def test_keys_failing_four_ways_leave_the_healthy_key_serving_a_burst(
    gateway_clock: GatewayClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.failover")
    async with (
        five_key_sim(gateway_clock) as sim,
        in_process_gateway(sim, gateway_clock, config_for(sim)) as gw,
        aiohttp.ClientSession() as http,
    ):
        await serving(http, gw.url)
        served_before = used(sim)[HEALTHY]
        failing_but(sim, HEALTHY)

        replies = await burst(http, gw.url)

        assert_served_by(replies, MS, HEALTHY)
        assert breakers(gw).blocking(MS, MODEL) is None
        assert breaker_logs(caplog) == []
        assert failovers(gw, "breaker_open") == 0
        # every failing key was really tried under the burst, and cools down alone
        fired = stats(sim, MS)["faults_fired"]
        assert {kind: fired.get(kind, 0) > 0 for kind in FAILING.values()} == {
            kind: True for kind in FAILING.values()
        }
        assert await states(gw, gateway_clock) == {
            name: KeyState.AVAILABLE if name == HEALTHY else KeyState.COOLING for name, _ in KEYS
        }
        # a second burst, the failing keys still cooling: dave alone, not a single failure
        tried = failures(sim)
        assert_served_by(await burst(http, gw.url), MS, HEALTHY)
        assert failures(sim) == tried
        assert breakers(gw).blocking(MS, MODEL) is None
        assert used(sim)[HEALTHY] == served_before + 2 * BURST
    assert stats(sim, "bailian")["calls"] == 0
    assert used(sim, "bailian") == {"main": 0}
    assert "KEY DISABLED" not in caplog.text


async def test_once_the_healthy_key_fails_too_the_breaker_opens_and_bailian_serves(
    gateway_clock: GatewayClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.failover")
    async with (
        five_key_sim(gateway_clock) as sim,
        in_process_gateway(sim, gateway_clock, config_for(sim)) as gw,
        aiohttp.ClientSession() as http,
    ):
        await serving(http, gw.url)
        failing_but(sim, HEALTHY)
        assert_served_by(await burst(http, gw.url), MS, HEALTHY)
        served = used(sim)[HEALTHY]
        assert breakers(gw).blocking(MS, MODEL) is None

        # the whole provider goes down; dave's last success leaves the window
        sim.faults.clear(MS)
        sim.faults.add("status_503", count=-1, provider=MS)
        gateway_clock.advance(seconds=31)  # past the window, and every key's own cooldown (<= 30 s)
        assert_served_by(await burst(http, gw.url), "bailian", "main")
        opened = breakers(gw).blocking(MS, MODEL)
        assert opened is not None
        assert (opened.trips, opened.until - gateway_clock.seconds()) == (1, 15)
        assert len(breaker_logs(caplog)) == 1
        # open: the next burst goes straight to Bailian, no ModelScope attempt at all
        tried = failures(sim)
        skipped = failovers(gw, "breaker_open")
        assert_served_by(await burst(http, gw.url), "bailian", "main")
        assert failures(sim) == tried
        assert failovers(gw, "breaker_open") == skipped + BURST
        # no key disabled by the outage
        assert KeyState.DISABLED not in (await states(gw, gateway_clock)).values()
    assert used(sim)[HEALTHY] == served
    assert used(sim, "bailian") == {"main": 2 * BURST}
    assert "KEY DISABLED" not in caplog.text


async def test_every_key_failing_under_a_burst_opens_the_breaker_at_once(
    gateway_clock: GatewayClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.failover")
    async with (
        five_key_sim(gateway_clock) as sim,
        in_process_gateway(sim, gateway_clock, config_for(sim)) as gw,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("status_503", count=-1, provider=MS)
        assert_served_by(await burst(http, gw.url), "bailian", "main")
        assert breakers(gw).blocking(MS, MODEL) is not None
        assert len(breaker_logs(caplog)) == 1
        # open: the next burst goes straight to Bailian, no ModelScope attempt at all
        tried = rejected(sim, MS, "503")
        # no request met more than three failing keys: the third distinct one opened it
        assert 3 <= tried <= 3 * BURST
        assert_served_by(await burst(http, gw.url), "bailian", "main")
        assert rejected(sim, MS, "503") == tried
        assert KeyState.DISABLED not in (await states(gw, gateway_clock)).values()
    assert used(sim) == {name: 0 for name, _ in KEYS}
