"""Usage, cost, budgets and per-minute limits through the gateway: the simulator over real HTTP
(it reports usage: a token per word), the gateway in this process, the official SDKs.

- a Bailian budget stops paid traffic at the budget, the next call is refused, and the reset
  opens it again; with calls in flight it overshoots by at most their cost;
- a client's rpm holds across two replicas on one Redis, in any minute;
- a client's tpm and a key's rpm;
- the store holds the same tokens for streams with and without include_usage, and Anthropic's.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import time
from typing import Any
from zoneinfo import ZoneInfo

import anthropic as anthropic_sdk
import openai
import pytest

from router.ledger import Ledger
from router.quota.days import quota_day
from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.store import ForwardingStore, QuotaStore
from router.quota.types import (
    NoCapacity,
    Reservation,
    ReserveRequest,
    UsageRecord,
    UsageRow,
)
from router.simulator import Simulator
from router.state import LEDGER
from tests.conftest import MODEL, GatewayClock, sim_config
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, gateway_app, gateway_config, recorded
from tests.test_metrics import parse, scrape

SECRET = "ms-test-alice"
HELLO: Any = [{"role": "user", "content": "hello there general"}]
BAILIAN_MODEL = "qwen3-32b"  # what Bailian calls MODEL
# Per million tokens: an input token costs 1,000,000 nanos (0.001 CNY), an output one 3,000,000.
PRICES = {BAILIAN_MODEL: {"input": 1000.0, "output": 3000.0}}
BUDGET = 0.1  # CNY: a handful of calls


def cost_of(usage: Any) -> int:
    """A chat answer's cost in nanos at PRICES, worked out here from the answer itself."""
    return int(usage.prompt_tokens) * 1_000_000 + int(usage.completion_tokens) * 3_000_000


def day_of(clock: GatewayClock) -> str:
    return quota_day(clock(), ZoneInfo("Asia/Shanghai"), time(0, 0))


_OPEN: list[openai.AsyncOpenAI | anthropic_sdk.AsyncAnthropic] = []


def openai_to(url: str) -> openai.AsyncOpenAI:
    """An SDK client, closed after the test (``closing``)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
    _OPEN.append(client)
    return client


@pytest.fixture(autouse=True)
async def closing() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


@asynccontextmanager
async def paid_only(
    clock: GatewayClock, store: QuotaStore, **bailian: Any
) -> AsyncIterator[tuple[Simulator, str, Any]]:
    """ModelScope's one key spent for the day in the config, so every call goes to Bailian,
    which has PRICES and ``bailian``'s settings."""
    async with Simulator(sim_config(100, 1000), clock=clock.seconds) as sim:
        config = gateway_config(sim.modelscope_url, sim.bailian_url, tokens=[("alice", SECRET, 0)])
        config["providers"][1] |= {"prices": PRICES, **bailian}
        async with gateway_app(config, clock, store) as (url, app):
            yield sim, url, app


async def test_a_bailian_budget_stops_paid_traffic_and_the_next_call_is_refused(
    gateway_clock: GatewayClock,
) -> None:
    store = MemoryStore()
    async with paid_only(gateway_clock, store, daily_budget=BUDGET) as (sim, url, app):
        client = openai_to(url)
        costs = []
        for _ in range(100):
            try:
                answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
            except openai.RateLimitError as exc:
                refused = exc
                break
            costs.append(cost_of(answer.usage))
        else:
            pytest.fail("the budget never stopped the calls")
        budget = round(BUDGET * 10**9)
        # Stopped at the first call after the budget was reached, not one before or after.
        assert sum(costs[:-1]) < budget <= sum(costs)
        assert sim.state.stats("bailian")["calls"] == len(costs)
        assert refused.status_code == 429
        body = refused.body
        assert isinstance(body, dict)
        assert body["code"] == "provider_budget_exhausted"
        assert "'bailian' has spent its daily budget of 0.10 CNY" in body["message"]
        # 14:00 in Shanghai: the budget resets at midnight, in 10 hours
        assert refused.response.headers["Retry-After"] == "36000"
        assert refused.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.RateLimitError):  # and the next one too
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert sim.state.stats("bailian")["calls"] == len(costs)

        await recorded(app)
        rows = await store.usage(day_of(gateway_clock))
        assert [(r.client, r.provider, r.key, r.model) for r in rows] == [
            ("team", "bailian", "main", BAILIAN_MODEL)
        ]
        assert rows[0].cost == sum(costs)
        assert rows[0].answers == len(costs)
        status, text = await scrape(url)
        assert status == 200
        cost_metric = parse(text)[
            (
                "router_cost_total",
                (("client", "team"), ("currency", "CNY"), ("provider", "bailian")),
            )
        ]
        assert cost_metric == pytest.approx(sum(costs) / 10**9)

        gateway_clock.advance(hours=10)  # the reset: a new budget
        answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert answer.usage is not None


async def test_calls_in_flight_overshoot_a_budget_by_at_most_their_cost(
    gateway_clock: GatewayClock,
) -> None:
    """Eight clients at once: each call reserved while the budget had room may still finish,
    and nothing more."""
    store = MemoryStore()
    async with paid_only(gateway_clock, store, daily_budget=BUDGET) as (_, url, app):
        client = openai_to(url)

        async def one() -> int | None:
            try:
                answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
            except openai.RateLimitError:
                return None
            return cost_of(answer.usage)

        costs: list[int] = []
        for _ in range(20):
            wave = await asyncio.gather(*(one() for _ in range(8)))
            costs += [c for c in wave if c is not None]
            if all(c is None for c in wave):
                break
        else:
            pytest.fail("the budget never stopped the calls")
        await recorded(app)
        budget = round(BUDGET * 10**9)
        spent = sum(r.cost for r in await store.usage(day_of(gateway_clock)))
        assert spent == sum(costs)
        assert budget <= spent < budget + 8 * max(costs)


class LateWrites(ForwardingStore):
    """A store whose usage writes land only once a reservation is under way: either one
    waiting for them (the gateway's order) or one already reserving without them."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.ledger: Ledger | None = None
        self.reserving = False
        self.reserved_ahead_of_writes = 0
        self.writing = False

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        self.writing = True
        async with asyncio.timeout(10):
            # Yields, not a wait for time, until one of the two (the ledger has no event).
            while not self.reserving and (self.ledger is None or not self.ledger.waiting):  # noqa: ASYNC110
                await asyncio.sleep(0)
        await super().record_usage(token, records)
        self.writing = False

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        if req.budget is None:  # ModelScope's spent key, tried first: no budget to check
            return await super().reserve(req)
        self.reserving = True
        if self.writing:
            self.reserved_ahead_of_writes += 1
        try:
            return await super().reserve(req)
        finally:
            self.reserving = False


async def test_a_budget_check_waits_for_the_answers_that_ended_before_it(
    gateway_clock: GatewayClock,
) -> None:
    """One call spends the budget; its usage reaches the store late. The next call waits for
    it, and is refused: one client calling in turn never overshoots by more than one call."""
    store = LateWrites()
    async with paid_only(gateway_clock, store, daily_budget=0.001) as (sim, url, app):
        store.ledger = app[LEDGER]
        client = openai_to(url)
        answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert cost_of(answer.usage) >= 10**6  # the 0.001 CNY spent
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert store.reserved_ahead_of_writes == 0
        assert sim.state.stats("bailian")["calls"] == 1


async def test_a_client_budget_stops_its_paid_calls_only(gateway_clock: GatewayClock) -> None:
    store = MemoryStore()
    async with Simulator(sim_config(100, 1000), clock=gateway_clock.seconds) as sim:
        config = gateway_config(sim.modelscope_url, sim.bailian_url, tokens=[("alice", SECRET, 1)])
        config["providers"][1] |= {"prices": PRICES}
        config["clients"][0] |= {"daily_budget": 0.01}
        async with gateway_app(config, gateway_clock, store) as (url, app):
            client = openai_to(url)
            free = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO
            )
            assert free.headers["x-router-provider"] == "modelscope"  # alice's one call
            answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
            assert cost_of(answer.usage) >= 10**7  # one paid call spends the 0.01 CNY
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model=MODEL, messages=HELLO)
            body = caught.value.body
            assert isinstance(body, dict)
            assert body["code"] == "client_budget_exhausted"
            assert "The client 'team' has spent its daily budget of 0.01 CNY" in body["message"]
            # Free calls cost nothing: the budget does not stop them (alice given a new day).
            await store.reset_key("modelscope", "alice", day_of(gateway_clock))
            free = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO
            )
            assert free.headers["x-router-provider"] == "modelscope"
            await recorded(app)
            rows = await store.usage(day_of(gateway_clock))
            assert [(r.provider, r.answers, r.cost) for r in rows] == [
                ("bailian", 1, cost_of(answer.usage)),
                ("modelscope", 2, 0),
            ]


@asynccontextmanager
async def two_replicas(
    clock: GatewayClock, redis_server: RedisServer, sim: Simulator, **team: Any
) -> AsyncIterator[tuple[str, str]]:
    """Two gateways on one Redis (one prefix), each with its own store client, as replicas."""
    prefix = f"rpm-{uuid.uuid4().hex}"
    config = gateway_config(
        sim.modelscope_url,
        sim.bailian_url,
        tokens=[("alice", SECRET, 1000)],
        store_url=redis_server.url,
        prefix=prefix,
    )
    config["clients"][0] |= team
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
    try:
        async with (
            gateway_app(config, clock, stores[0]) as (a, _),
            gateway_app(config, clock, stores[1]) as (b, _),
        ):
            yield a, b
    finally:
        for store in stores:
            await store.aclose()


async def _refusal_of(client: openai.AsyncOpenAI) -> tuple[str, str, int] | None:
    """One call: None when served, else the 429's code, message and Retry-After."""
    try:
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    except openai.RateLimitError as exc:
        body = exc.body
        assert isinstance(body, dict)
        return body["code"], body["message"], int(exc.response.headers["Retry-After"])
    return None


async def test_a_client_rpm_holds_across_two_replicas_in_any_minute(
    gateway_clock: GatewayClock, redis_server: RedisServer
) -> None:
    rpm = 3
    schedule = random.Random(13)
    async with (
        Simulator(sim_config(1000, 1000), clock=gateway_clock.seconds) as sim,
        two_replicas(gateway_clock, redis_server, sim, rpm=rpm) as replicas,
    ):
        clients = [openai_to(url) for url in replicas]
        taken: list[float] = []
        refused: list[float] = []
        by_replica = [0, 0]
        for _ in range(40):
            gateway_clock.advance(seconds=schedule.choice([0, 0, 1, 5, 10, 20, 30]))
            at = gateway_clock.seconds()
            which = schedule.randrange(2)
            refusal = await _refusal_of(clients[which])
            if refusal is not None:
                code, message, retry_after = refusal
                assert code == "rate_limited"
                assert f"over its limit of {rpm} requests per minute" in message
                assert 1 <= retry_after <= 61
                refused.append(at)
                continue
            taken.append(at)
            by_replica[which] += 1
    assert sim.state.stats("modelscope")["calls"] == len(taken)
    for t in taken:  # never more than rpm in any 60 s
        assert sum(1 for u in taken if t - 60 < u <= t) <= rpm
    for t in refused:  # and refused only with rpm taken in the 61 s before
        assert sum(1 for u in taken if t - 61 < u <= t) >= rpm
    assert refused  # the schedule reached the limit ...
    assert min(by_replica) > 0  # ... through both replicas


async def test_a_client_tpm_refuses_once_the_last_minute_used_it(
    gateway_clock: GatewayClock,
) -> None:
    async with Simulator(sim_config(100, 100), clock=gateway_clock.seconds) as sim:
        config = gateway_config(
            sim.modelscope_url, sim.bailian_url, tokens=[("alice", SECRET, 100)]
        )
        config["clients"][0] |= {"tpm": 20}
        async with gateway_app(config, gateway_clock, MemoryStore()) as (url, _):
            client = openai_to(url)
            used = 0
            while used < 20:
                answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
                used += answer.usage.total_tokens  # type: ignore[union-attr]
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model=MODEL, messages=HELLO)
            body = caught.value.body
            assert isinstance(body, dict)
            assert "over its limit of 20 tokens per minute" in body["message"]
            gateway_clock.advance(seconds=61)
            await client.chat.completions.create(model=MODEL, messages=HELLO)


async def test_a_key_at_its_rpm_is_skipped_without_a_call_upstream(
    gateway_clock: GatewayClock,
) -> None:
    """ModelScope's keys at one call a minute each: the fourth call within the minute goes to
    Bailian, and ModelScope never sees a call a key has no room for."""
    async with Simulator(sim_config(100, 100), clock=gateway_clock.seconds) as sim:
        tokens = [
            ("alice", SECRET, 100),
            ("bob", "ms-test-bob", 100),
            ("carol", "ms-test-carol", 100),
        ]
        config = gateway_config(sim.modelscope_url, sim.bailian_url, tokens=tokens)
        config["providers"][0] |= {"rpm": 1}
        async with gateway_app(config, gateway_clock, MemoryStore()) as (url, _):
            client = openai_to(url)
            served = []
            for _ in range(4):
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=HELLO
                )
                served.append((raw.headers["x-router-provider"], raw.headers["x-router-key"]))
            assert served[:3] == [("modelscope", k) for k in ("alice", "bob", "carol")]
            assert served[3] == ("bailian", "main")
            assert sim.state.stats("modelscope")["calls"] == 3
            gateway_clock.advance(seconds=61)
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO
            )
            assert raw.headers["x-router-provider"] == "modelscope"


async def test_the_store_counts_the_same_tokens_for_every_shape_of_stream(
    gateway_clock: GatewayClock,
) -> None:
    """A stream without include_usage (the gateway asks for it and takes it out again), one
    with it, and the same call not streamed: three equal rows' worth of tokens; and Anthropic's
    /v1/messages, streamed and not, with its own counts."""
    store = MemoryStore()
    async with Simulator(sim_config(100, 100), clock=gateway_clock.seconds) as sim:
        config = gateway_config(
            sim.modelscope_url, sim.bailian_url, tokens=[("alice", SECRET, 100)]
        )
        async with gateway_app(config, gateway_clock, store) as (url, app):
            client = openai_to(url)
            day = day_of(gateway_clock)
            rows: list[list[UsageRow]] = []
            plain = await client.chat.completions.create(model=MODEL, messages=HELLO)
            await recorded(app)
            rows.append(await store.usage(day))
            stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
            chunks = [chunk async for chunk in stream]
            assert all(chunk.usage is None for chunk in chunks)  # the shape it asked for
            await recorded(app)
            rows.append(await store.usage(day))
            stream = await client.chat.completions.create(
                model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
            )
            asked = [chunk async for chunk in stream]
            assert asked[-1].usage is not None
            await recorded(app)
            rows.append(await store.usage(day))
            assert plain.usage is not None
            one = plain.usage.total_tokens
            assert [r[0].total for r in rows] == [one, 2 * one, 3 * one]
            assert [r[0].answers for r in rows] == [1, 2, 3]
            assert rows[-1][0].prompt == 3 * plain.usage.prompt_tokens

            messages = anthropic_sdk.AsyncAnthropic(base_url=url, api_key=CLIENT_KEY)
            _OPEN.append(messages)
            message = await messages.messages.create(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi there"}]
            )
            async with messages.messages.stream(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi there"}]
            ) as streamed:
                final = await streamed.get_final_message()
            await recorded(app)
            after = await store.usage(day)
            added = after[0].total - rows[-1][0].total
            expected = sum(
                m.usage.input_tokens
                + m.usage.output_tokens
                + (m.usage.cache_creation_input_tokens or 0)
                + (m.usage.cache_read_input_tokens or 0)
                for m in (message, final)
            )
            assert added == expected > 0
            assert after[0].answers == 5
