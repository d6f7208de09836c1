"""reserve.lua and settle.lua make exactly the decisions of logic.py, on random day maps."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router.quota import keys as k
from router.quota import logic
from router.quota.redis_store import RedisStore
from router.quota.types import (
    Cooldown,
    KeySpec,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from tests.redis_server import RedisServer

PROVIDER = "modelscope"
DAY = "20991230"
MODELS = ("Qwen/Qwen3-8B", "deepseek-ai/DeepSeek-V3:free", "plain")
FINGERPRINTS = ("fpA", "fpB")
# Redis expires a day map by its own clock: keep the times near the real one.
NOW = int(time.time() * 1000)
EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class DayState:
    specs: tuple[KeySpec, ...]
    fields: dict[str, str]
    disabled: dict[str, str]


small = st.integers(0, 3)
maybe_small = st.none() | small
limits = st.none() | st.sampled_from([0, 2, 4, 6])
# Untils on and next to NOW, where "still cooling" flips, as well as spread around it.
untils = st.sampled_from([NOW - 1, NOW, NOW + 1]) | st.integers(NOW - 4000, NOW + 4000)
cooldowns = st.tuples(untils, st.integers(1, 5))
nows = st.just(NOW) | st.integers(NOW - 1000, NOW + 1000)
# Per key: 1 in N for each exhausted/ambiguous field, 1 in M for each cooldown (0 = never).
FLAG_ODDS = {"clean": (0, 0), "sparse": (6, 6), "dense": (2, 2), "cooling": (0, 2)}


def _put(fields: dict[str, str], field: str, value: object) -> None:
    if value is not None:
        fields[field] = value if isinstance(value, str) else str(value)


def _draw_key_fields(draw: st.DrawFn, name: str, fields: dict[str, str]) -> None:
    flag_odds, cooling_odds = FLAG_ODDS[draw(st.sampled_from(sorted(FLAG_ODDS)))]

    def sometimes(values: st.SearchStrategy[Any], odds: int = flag_odds) -> Any:
        return draw(values) if odds and draw(st.integers(1, odds)) == 1 else None

    def cooldown() -> str | None:
        cooling = sometimes(cooldowns, cooling_odds)
        return None if cooling is None else logic.format_cooldown(*cooling)

    _put(fields, k.used_field(name), draw(maybe_small))
    _put(fields, k.exhausted_field(name), sometimes(st.sampled_from(["429", "x"])))
    _put(fields, k.cooling_field(name), cooldown())
    _put(fields, k.ambiguous_field(name), sometimes(st.sampled_from(MODELS)))
    for model in MODELS:
        _put(fields, k.model_used_field(name, model), draw(maybe_small))
        _put(fields, k.model_exhausted_field(name, model), sometimes(st.just("429")))
        _put(fields, k.model_cooling_field(name, model), cooldown())


def _copy_key(fields: dict[str, str], source: str, name: str) -> None:
    """Give ``name`` the same fields as ``source``: twins make ties, which decide the order."""
    for field, value in list(fields.items()):
        parsed = k.parse_field(field)
        if parsed is not None and parsed.key == source:
            suffix = "" if parsed.model is None else f"{k.SEP}{parsed.model}"
            fields[f"{parsed.kind}{k.SEP}{name}{suffix}"] = value


@st.composite
def day_states(draw: st.DrawFn) -> DayState:
    specs: list[KeySpec] = []
    fields: dict[str, str] = {}
    disabled: dict[str, str] = {}
    for i in range(draw(st.integers(1, 6))):
        name = f"key-{i}.x_"
        fingerprint = draw(st.sampled_from(FINGERPRINTS))
        twin_of_previous = draw(st.booleans())
        if specs and twin_of_previous:
            twin = specs[-1]
            specs.append(KeySpec(name, fingerprint, twin.daily_limit, twin.model_limit))
            _copy_key(fields, twin.name, name)
        else:
            specs.append(KeySpec(name, fingerprint, draw(limits), draw(limits)))
            _draw_key_fields(draw, name, fields)
        if draw(st.integers(0, 5)) == 0:
            record = draw(st.sampled_from(FINGERPRINTS))
            disabled[name] = logic.disabled_record(record, "401")
    cursor = draw(st.integers(-1, 13))  # -1: no cursor yet
    _put(fields, k.CURSOR_FIELD, None if cursor < 0 else cursor)
    return DayState(tuple(specs), fields, disabled)


settlements = st.builds(
    Settlement,
    release=st.booleans(),
    remaining=st.none() | st.integers(-2, 8),
    model_remaining=st.none() | st.integers(-2, 8),
    exhaust=st.none() | st.sampled_from(["key", "model", "ambiguous"]),
    near_zero=st.integers(0, 3),
    cooldown=st.none()
    | st.builds(
        Cooldown,
        scope=st.sampled_from(["key", "model"]),
        base_ms=st.integers(0, 5000),
        max_ms=st.integers(0, 20_000),
        fixed=st.booleans(),
    ),
    disable_reason=st.none() | st.sampled_from(["401", "403 forbidden"]),
)


class Lua:
    """Runs the Redis store's scripts on a given day map, on its own event loop."""

    def __init__(self, server: RedisServer) -> None:
        self.prefix = f"parity-{uuid.uuid4().hex}"
        self.loop = asyncio.new_event_loop()
        self.store = RedisStore(server.url, prefix=self.prefix)
        self.admin = redis.Redis.from_url(server.url, decode_responses=True)
        self.day_key = k.day_key(self.prefix, PROVIDER, DAY)
        self.disabled_key = k.disabled_key(self.prefix, PROVIDER)

    def load(self, state: DayState) -> None:
        self.admin.delete(self.day_key, self.disabled_key)
        if state.fields:
            self.admin.hset(self.day_key, items=list(chain(*state.fields.items())))
        if state.disabled:
            self.admin.hset(self.disabled_key, items=list(chain(*state.disabled.items())))

    def run(self, call: Callable[[RedisStore], Any]) -> Any:
        return self.loop.run_until_complete(call(self.store))

    def maps(self) -> tuple[dict[str, str], dict[str, str]]:
        day = self.admin.hgetall(self.day_key)
        disabled = self.admin.hgetall(self.disabled_key)
        return {str(f): str(v) for f, v in day.items()}, {
            str(f): str(v) for f, v in disabled.items()
        }

    def close(self) -> None:
        self.admin.delete(self.day_key, self.disabled_key)
        self.admin.close()
        self.loop.run_until_complete(self.store.aclose())
        self.loop.close()


@pytest.fixture
def lua(redis_server: RedisServer) -> Iterator[Lua]:
    runner = Lua(redis_server)
    yield runner
    runner.close()


def _state(*fields: tuple[str, object], keys: int = 2) -> DayState:
    specs = tuple(KeySpec(f"k{i}", "fpA", None, None) for i in range(keys))
    return DayState(specs, {f: str(v) for f, v in fields}, {})


# Edges random maps reach only now and then: pinned so every run checks them.
RESERVE_EDGES = [
    _state(("c|k0", f"{NOW}:1")),  # a cooldown ending now is over
    # available at the later of key and model cooldown; retry_at the earliest such
    _state(
        ("c|k0", f"{NOW + 3000}:1"), ("c|k0|plain", f"{NOW + 1000}:1"), ("c|k1", f"{NOW + 2000}:1")
    ),
    _state(("u|k1", 1), ("rr", 1), keys=3),  # most_remaining tie after the cursor
]
SETTLE_EDGES = [
    (_state(("c|k0", f"{NOW + 500}:3")), Settlement(cooldown=Cooldown("key", 10, 10, fixed=True))),
    (_state(("a|k0", "plain")), Settlement(exhaust="ambiguous")),
    (_state(("a|k0", "other")), Settlement(exhaust="ambiguous", remaining=0)),
]


def test_reserve_lua_matches_reserve_on(lua: Lua) -> None:
    @EXAMPLES
    @given(
        state=day_states(),
        strategy=st.sampled_from(Strategy),
        model=st.sampled_from(MODELS),
        now=nows,
    )
    def check(state: DayState, strategy: Strategy, model: str, now: int) -> None:
        req = ReserveRequest(PROVIDER, model, state.specs, strategy, DAY, now, now + 3_600_000)
        expected, changed = logic.reserve_on(state.fields, state.disabled, req)
        lua.load(state)
        assert lua.run(lambda store: store.reserve(req)) == expected
        assert lua.maps() == ({**state.fields, **changed}, state.disabled)

    for state in RESERVE_EDGES:
        for strategy in Strategy:
            check = example(state=state, strategy=strategy, model="plain", now=NOW)(check)
    check()


def test_settle_lua_matches_settle_on(lua: Lua) -> None:
    @EXAMPLES
    @given(
        state=day_states(),
        pick=st.integers(0, 5),
        model=st.sampled_from(MODELS),
        fingerprint=st.sampled_from(FINGERPRINTS),
        key_limits=st.tuples(limits, limits),
        settlement=settlements,
        now=nows,
        day_end_in=st.integers(0, 30_000),
    )
    def check(
        state: DayState,
        pick: int,
        model: str,
        fingerprint: str,
        key_limits: tuple[int | None, int | None],
        settlement: Settlement,
        now: int,
        day_end_in: int,
    ) -> None:
        name = state.specs[pick % len(state.specs)].name
        res = Reservation(
            PROVIDER, name, fingerprint, model, DAY, now + day_end_in, *key_limits, None, None
        )
        expected, changed, changed_disabled = logic.settle_on(
            state.fields, state.disabled, res, settlement, now
        )
        lua.load(state)
        assert lua.run(lambda store: store.settle(res, settlement, now)) == expected
        assert lua.maps() == (
            {**state.fields, **changed},
            {**state.disabled, **changed_disabled},
        )

    for state, settlement in SETTLE_EDGES:
        check = example(
            state=state,
            pick=0,
            model="plain",
            fingerprint="fpA",
            key_limits=(10, None),
            settlement=settlement,
            now=NOW,
            day_end_in=30_000,
        )(check)
    check()
