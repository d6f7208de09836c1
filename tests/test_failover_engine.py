"""The failover engine on its own: ``Failover.forward(call)`` against the simulator's HTTP, with no
gateway server in between. It returns what the HTTP layer would relay or render, and raises
nothing for a refusal."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from router.calls import Call, Trace, parse_call
from router.catalog import Catalog
from router.config import Settings
from router.endpoints import CHAT
from router.errors import PoolExhausted, RouterError
from router.failover import Failover, Served
from router.metrics import Metrics
from router.pool import KeyPool
from router.quota.days import to_ms
from router.quota.memory_store import MemoryStore
from router.routing import RouteTable
from router.simulator import Simulator
from router.upstream import Upstreams
from tests.conftest import MODEL, TOKENS, GatewayClock
from tests.support import gateway_config


@asynccontextmanager
async def engine(
    sim: Simulator, clock: GatewayClock, limit: int = 100, bailian_limit: int | None = None
) -> AsyncIterator[Failover]:
    """The engine of one configuration, built as router.runtime builds it."""
    config = gateway_config(
        sim.modelscope_url,
        sim.bailian_url,
        tokens=[(name, secret, limit) for name, secret in TOKENS],
        bailian=("main", "sk-test-bailian", bailian_limit),
    )
    settings = Settings.model_validate(config)
    store = MemoryStore(clock=lambda: to_ms(clock()))
    upstreams = Upstreams(settings.providers)
    await upstreams.open()
    try:
        yield Failover(
            settings,
            store,
            upstreams,
            KeyPool(settings),
            Catalog(settings),
            RouteTable(settings),
            Metrics(CollectorRegistry()),
            clock,
        )
    finally:
        await upstreams.aclose()
        await store.aclose()


def chat_call(stream: bool = False) -> Call:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    trace = Trace("engine-test", time.monotonic(), client="team")
    return parse_call(orjson.dumps(body), CHAT, trace)


def served(outcome: Served | RouterError) -> Served:
    assert isinstance(outcome, Served), outcome
    outcome.reply.close()
    return outcome


async def test_the_first_key_serves_and_the_trace_says_so(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with engine(sim, gateway_clock) as failover:
        call = chat_call()
        answer = served(await failover.forward(call))
    assert answer.reply.status == 200
    assert b"alice" in (answer.reply.body or b"")
    assert (answer.reservation.provider, answer.reservation.key) == ("modelscope", "alice")
    assert (call.trace.provider, call.trace.key, call.trace.attempts) == ("modelscope", "alice", 1)


async def test_a_throttled_key_fails_over_to_the_next(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    sim.faults.add("throttle", token="alice", count=1)
    async with engine(sim, gateway_clock) as failover:
        call = chat_call()
        answer = served(await failover.forward(call))
        failovers = failover.metrics.registry.get_sample_value(
            "router_failovers_total",
            {"from_provider": "modelscope", "to_provider": "modelscope", "reason": "throttled"},
        )
    assert answer.reservation.key == "bob"
    assert call.trace.attempts == 2
    assert failovers == 1


async def test_a_stream_comes_back_with_its_first_chunk_read(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with engine(sim, gateway_clock) as failover:
        answer = await failover.forward(chat_call(stream=True))
        assert isinstance(answer, Served)
        try:
            assert answer.reply.first_chunk
            rest = await answer.reply.response.content.read()
        finally:
            answer.reply.close()
    assert b"[DONE]" in answer.reply.first_chunk + rest


async def test_a_spent_pool_is_returned_as_a_refusal_not_raised(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with engine(sim, gateway_clock, limit=1, bailian_limit=1) as failover:
        keys = [served(await failover.forward(chat_call())).reservation.key for _ in range(4)]
        refusal = await failover.forward(chat_call())
    assert keys == ["alice", "bob", "carol", "main"]
    assert isinstance(refusal, PoolExhausted)
    assert refusal.code == "pool_exhausted"
    assert int(refusal.headers["Retry-After"]) > 0
