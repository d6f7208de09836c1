"""reserve.lua and settle.lua make exactly the decisions of logic.py, on random day maps."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
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
limits = st.none() | st.sampled_from([0, 1, 3, 5])
cooldowns = st.tuples(st.integers(NOW - 4000, NOW + 4000), st.integers(1, 5))


def _put(fields: dict[str, str], field: str, value: object) -> None:
    if value is not None:
        fields[field] = value if isinstance(value, str) else str(value)


def _sometimes(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> Any:
    """A value one time in six, else None: most keys stay eligible, so picks and ties occur."""
    return draw(values) if draw(st.integers(0, 5)) == 0 else None


def _cooldown(draw: st.DrawFn) -> str | None:
    cooling = _sometimes(draw, cooldowns)
    return None if cooling is None else logic.format_cooldown(*cooling)


def _draw_key_fields(draw: st.DrawFn, name: str, fields: dict[str, str]) -> None:
    _put(fields, k.used_field(name), draw(maybe_small))
    _put(fields, k.exhausted_field(name), _sometimes(draw, st.sampled_from(["429", "x"])))
    _put(fields, k.cooling_field(name), _cooldown(draw))
    _put(fields, k.ambiguous_field(name), _sometimes(draw, st.sampled_from(MODELS)))
    for model in MODELS:
        _put(fields, k.model_used_field(name, model), draw(maybe_small))
        _put(fields, k.model_exhausted_field(name, model), _sometimes(draw, st.just("429")))
        _put(fields, k.model_cooling_field(name, model), _cooldown(draw))


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
        if specs and draw(st.booleans()):
            twin = specs[-1]
            specs.append(KeySpec(name, fingerprint, twin.daily_limit, twin.model_limit))
            _copy_key(fields, twin.name, name)
        else:
            specs.append(KeySpec(name, fingerprint, draw(limits), draw(limits)))
            _draw_key_fields(draw, name, fields)
        record = _sometimes(draw, st.sampled_from(FINGERPRINTS))
        _put(disabled, name, record and logic.disabled_record(record, "401"))
    _put(fields, k.CURSOR_FIELD, draw(st.none() | st.integers(0, 13)))
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
            self.admin.hset(self.day_key, mapping=state.fields)
        if state.disabled:
            self.admin.hset(self.disabled_key, mapping=state.disabled)

    def run(self, call: Callable[[RedisStore], Any]) -> Any:
        return self.loop.run_until_complete(call(self.store))

    def maps(self) -> tuple[dict[str, str], dict[str, str]]:
        return self.admin.hgetall(self.day_key), self.admin.hgetall(self.disabled_key)

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


def test_reserve_lua_matches_reserve_on(lua: Lua) -> None:
    @EXAMPLES
    @given(
        state=day_states(),
        strategy=st.sampled_from(Strategy),
        model=st.sampled_from(MODELS),
        now=st.integers(NOW - 1000, NOW + 1000),
    )
    def check(state: DayState, strategy: Strategy, model: str, now: int) -> None:
        req = ReserveRequest(PROVIDER, model, state.specs, strategy, DAY, now, now + 3_600_000)
        expected, changed = logic.reserve_on(state.fields, state.disabled, req)
        lua.load(state)
        assert lua.run(lambda store: store.reserve(req)) == expected
        assert lua.maps() == ({**state.fields, **changed}, state.disabled)

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
        now=st.integers(NOW - 1000, NOW + 1000),
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

    check()
