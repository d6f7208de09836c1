"""The indexes of available keys decide as logic.py's scan does, over whole sequences.

test_lua_parity.py checks each script on a fresh state, where reserve.lua builds its index
from the maps. Here random sequences of reserves, settles (calls given back, header syncs,
exhaustions, cooldowns longer and shorter), disables, enables, resets and clock moves run
on the Redis store (reserve.lua), the SQLite store (sqlite_reserve.py) and the memory store
(which scans every key) side by side: every answer must be the same, so an index kept
between calls never picks another key, never misses one that can serve and never passes a
limit.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore
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


class Stores:
    """The memory store (the reference: it scans) and the indexed stores, Redis and SQLite,
    fed the same calls on one event loop."""

    def __init__(self, server: RedisServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = server
        self.dir = tempfile.TemporaryDirectory()
        self.indexed: list[QuotaStore] = []
        self.reference = MemoryStore()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _close(self) -> None:
        for store in self.indexed:
            self.run(store.aclose())

    def fresh(self) -> tuple[MemoryStore, list[QuotaStore]]:
        self._close()
        name = uuid.uuid4().hex
        self.indexed = [
            RedisStore(self.server.url, prefix=f"ix-{name}"),
            SqliteStore(Path(self.dir.name) / f"{name}.db"),
        ]
        return MemoryStore(clock=lambda: FIXED_NOW_MS), self.indexed

    def same(self, call: Any) -> Any:
        """``call(store)`` on every store; the answers must be equal. Returns the reference's."""
        memory, indexed = self.reference, self.indexed
        want = self.run(call(memory))
        for store in indexed:
            assert self.run(call(store)) == want, store
        return want

    def close(self) -> None:
        self._close()
        self.loop.close()
        self.dir.cleanup()


@pytest.fixture
def stores(redis_server: RedisServer) -> Iterator[Stores]:
    runner = Stores(redis_server)
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
# A key enabled again after the index dropped it as disabled.
@example(
    keys=(False, [(None, None, 1), (None, None, 1)]),
    steps=[
        ("disable", 0, "fpA"),
        ("reserve", "m/a", Strategy.FILL_FIRST, 0),
        ("enable", 0),
        ("reserve", "m/a", Strategy.FILL_FIRST, 0),
    ],
)
def test_the_index_decides_as_the_scan_over_any_sequence(
    stores: Stores, keys: tuple[bool, list[tuple[int | None, int | None, int]]], steps: list[Any]
) -> None:
    stores.reference, _ = stores.fresh()
    specs = _specs(*keys)
    now = FIXED_NOW_MS
    reserved: list[Reservation] = []
    for step in steps:
        kind = step[0]
        if kind == "reserve":
            _, model, strategy, who = step
            req = ReserveRequest(PROVIDER, model, specs, strategy, DAY, now, DAY_END, CLIENTS[who])
            got = stores.same(lambda s, req=req: s.reserve(req))
            if isinstance(got, Reservation):
                reserved.append(got)
        elif kind == "settle" and reserved:
            res, settlement = reserved[step[1] % len(reserved)], step[2]
            stores.same(lambda s, res=res, st=settlement, now=now: s.settle(res, st, now))
        elif kind in ("disable", "enable", "reset"):
            name = specs[step[1] % len(specs)].name
            if kind == "disable":
                stores.same(lambda s, name=name, fp=step[2]: s.disable(PROVIDER, name, fp, "x"))
            elif kind == "enable":
                stores.same(lambda s, name=name: s.enable(PROVIDER, name))
            else:
                stores.same(lambda s, name=name: s.reset_key(PROVIDER, name, DAY))
        elif kind == "advance":
            now += step[1]
    stores.same(lambda s: s.snapshot(PROVIDER, specs, DAY, now))


def test_a_pool_is_used_to_its_last_call_in_any_order(stores: Stores) -> None:
    """Hundreds of keys with a few calls each, spent through the indexes: every call of the
    pool is served, in the scan's order, and the next one is refused."""
    specs = tuple(KeySpec(f"k{i}", "fpA", 1 + i % 3, None) for i in range(300))
    total = sum(s.daily_limit or 0 for s in specs)
    for strategy in Strategy:
        stores.reference, _ = stores.fresh()
        req = ReserveRequest(PROVIDER, "m/a", specs, strategy, DAY, FIXED_NOW_MS, DAY_END)
        served = 0
        while isinstance(stores.same(lambda s, req=req: s.reserve(req)), Reservation):
            served += 1
        assert served == total, strategy
