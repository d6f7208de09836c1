"""reserve.lua's index of available keys decides as logic.py's scan does, over whole sequences.

test_lua_parity.py checks each script on a fresh state, where reserve.lua builds its index
from the maps. Here random sequences of reserves, settles (calls given back, header syncs,
exhaustions, cooldowns longer and shorter), disables, enables, resets and clock moves run
on the Redis store and on the memory store (which scans every key) side by side: every
answer must be the same, so the index kept between calls never picks another key, never
misses one that can serve and never passes a limit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.types import (
    ClientQuota,
    Cooldown,
    FairShare,
    KeySpec,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from tests.conftest import FIXED_NOW_MS
from tests.redis_server import RedisServer

PROVIDER = "modelscope"
DAY = "20991230"
DAY_END = FIXED_NOW_MS + 3_600_000
MODELS = ("m/a", "m/b")
FAIR = FairShare(0.6, (("alice", 1.0), ("bob", 2.0)), None)
CLIENTS = (None, ClientQuota("alice", None, FAIR), ClientQuota("bob", 9, FAIR))

limits = st.sampled_from([None, 0, 1, 2, 3, 5])
capped = st.sampled_from([1, 2, 3, 5])
key_sets = st.integers(2, 7).flatmap(
    lambda n: st.tuples(
        st.booleans(), st.lists(st.tuples(limits, limits, capped), min_size=n, max_size=n)
    )
)
settlements = st.builds(
    Settlement,
    release=st.booleans(),
    remaining=st.none() | st.none() | st.integers(0, 4),
    model_remaining=st.none() | st.none() | st.integers(0, 4),
    exhaust=st.none() | st.none() | st.none() | st.sampled_from(["key", "model", "ambiguous"]),
    near_zero=st.integers(0, 2),
    cooldown=st.none()
    | st.builds(
        Cooldown,
        scope=st.sampled_from(["key", "model"]),
        base_ms=st.integers(1, 4000),
        max_ms=st.integers(1, 9000),
        fixed=st.booleans(),
    ),
    disable_reason=st.none() | st.none() | st.none() | st.none() | st.just("401"),
)
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("reserve"),
            st.sampled_from(MODELS),
            st.sampled_from(Strategy),
            st.integers(0, len(CLIENTS) - 1),
        ),
        st.tuples(
            st.just("reserve"),
            st.sampled_from(MODELS),
            st.sampled_from(Strategy),
            st.integers(0, len(CLIENTS) - 1),
        ),
        st.tuples(st.just("settle"), st.integers(0, 50), settlements),
        st.tuples(st.just("disable"), st.integers(0, 6), st.sampled_from(["fpA", "fpB"])),
        st.tuples(st.just("enable"), st.integers(0, 6)),
        st.tuples(st.just("reset"), st.integers(0, 6)),
        st.tuples(st.just("advance"), st.integers(1, 3000)),
    ),
    min_size=5,
    max_size=60,
)


class Pair:
    """The Redis store and the memory store, fed the same calls on one event loop."""

    def __init__(self, server: RedisServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = server
        self.redis: RedisStore | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def fresh(self) -> tuple[RedisStore, MemoryStore]:
        if self.redis is not None:
            self.run(self.redis.aclose())
        self.redis = RedisStore(self.server.url, prefix=f"ix-{uuid.uuid4().hex}")
        return self.redis, MemoryStore(clock=lambda: FIXED_NOW_MS)

    def close(self) -> None:
        if self.redis is not None:
            self.run(self.redis.aclose())
        self.loop.close()


@pytest.fixture
def pair(redis_server: RedisServer) -> Iterator[Pair]:
    runner = Pair(redis_server)
    yield runner
    runner.close()


def _specs(
    all_capped: bool, drawn: list[tuple[int | None, int | None, int]]
) -> tuple[KeySpec, ...]:
    return tuple(
        KeySpec(f"k{i}", "fpA", cap if all_capped else limit, model_limit)
        for i, (limit, model_limit, cap) in enumerate(drawn)
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(keys=key_sets, steps=ops)
# A cooldown made shorter after the index set the key aside until the longer one ended.
@example(
    keys=(False, [(None, None, 1), (None, None, 1)]),
    steps=[
        ("reserve", "m/a", Strategy.FILL_FIRST, 0),
        ("settle", 0, Settlement(cooldown=Cooldown("key", 4000, 9000))),
        ("reserve", "m/a", Strategy.FILL_FIRST, 0),
        ("settle", 0, Settlement(cooldown=Cooldown("key", 10, 10, fixed=True))),
        ("advance", 20),
        ("reserve", "m/a", Strategy.FILL_FIRST, 0),
    ],
)
def test_the_index_decides_as_the_scan_over_any_sequence(
    pair: Pair, keys: tuple[bool, list[tuple[int | None, int | None, int]]], steps: list[Any]
) -> None:
    redis, memory = pair.fresh()
    specs = _specs(*keys)
    now = FIXED_NOW_MS
    reserved: list[Reservation] = []
    for step in steps:
        kind = step[0]
        if kind == "reserve":
            _, model, strategy, who = step
            req = ReserveRequest(PROVIDER, model, specs, strategy, DAY, now, DAY_END, CLIENTS[who])
            got, want = pair.run(redis.reserve(req)), pair.run(memory.reserve(req))
            assert got == want, step
            if isinstance(want, Reservation):
                reserved.append(want)
        elif kind == "settle" and reserved:
            res = reserved[step[1] % len(reserved)]
            got = pair.run(redis.settle(res, step[2], now))
            assert got == pair.run(memory.settle(res, step[2], now)), step
        elif kind in ("disable", "enable", "reset"):
            name = specs[step[1] % len(specs)].name
            if kind == "disable":
                got = pair.run(redis.disable(PROVIDER, name, step[2], "admin"))
                assert got == pair.run(memory.disable(PROVIDER, name, step[2], "admin")), step
            elif kind == "enable":
                pair.run(redis.enable(PROVIDER, name))
                pair.run(memory.enable(PROVIDER, name))
            else:
                pair.run(redis.reset_key(PROVIDER, name, DAY))
                pair.run(memory.reset_key(PROVIDER, name, DAY))
        elif kind == "advance":
            now += step[1]
    for model in MODELS:
        model_specs = tuple(s for s in specs)
        got = pair.run(redis.snapshot(PROVIDER, model_specs, DAY, now))
        assert got == pair.run(memory.snapshot(PROVIDER, model_specs, DAY, now)), model


def test_a_pool_is_used_to_its_last_call_in_any_order(pair: Pair) -> None:
    """Hundreds of keys with a few calls each, spent through the index: every call of the pool
    is served, in the scan's order, and the next one is refused."""
    redis, memory = pair.fresh()
    specs = tuple(KeySpec(f"k{i}", "fpA", 1 + i % 3, None) for i in range(300))
    total = sum(s.daily_limit or 0 for s in specs)
    for strategy in Strategy:
        redis, memory = pair.fresh()
        served = 0
        while True:
            req = ReserveRequest(PROVIDER, "m/a", specs, strategy, DAY, FIXED_NOW_MS, DAY_END)
            got = pair.run(redis.reserve(req))
            assert got == pair.run(memory.reserve(req))
            if not isinstance(got, Reservation):
                break
            served += 1
        assert served == total, strategy
