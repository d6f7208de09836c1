"""reserve.lua and settle.lua make exactly the decisions of logic.py, on random day maps."""

from __future__ import annotations

import asyncio
import dataclasses
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
from pydantic import BaseModel, ValidationError

from router.config import (
    MAX_ACTIVE_WINDOW_SECONDS,
    MAX_DAILY_LIMIT,
    MAX_SHARE,
    ClientConfig,
    FairShareSettings,
    KeyConfig,
    ProviderConfig,
)
from router.quota import keys as k
from router.quota import logic
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
from tests.redis_server import RedisServer

PROVIDER = "modelscope"
DAY = "20991230"
MODELS = ("Qwen/Qwen3-8B", "deepseek-ai/DeepSeek-V3:free", "plain")
FINGERPRINTS = ("fpA", "fpB")
CLIENTS = ("alice", "bob.b", "c-3")
STRANGER = "zed"  # a client missing from the weights
# Redis expires a day map by its own clock: keep the times near the real one.
NOW = int(time.time() * 1000)
EXAMPLES = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class DayState:
    specs: tuple[KeySpec, ...]
    fields: dict[str, str]
    disabled: dict[str, str]
    clients: dict[str, str]  # the clients day map
    rates: dict[str, str] = dataclasses.field(default_factory=dict)  # per-minute windows


# The values the config accepts (router/config.py), edges first: a limit is None (no cap) or
# 0..MAX_DAILY_LIMIT; a share is in (0, MAX_SHARE]; fair_share.below in [0, 1]; an active
# window is 0 (a window under 1 ms) to MAX_ACTIVE_WINDOW_SECONDS.
BIG = MAX_DAILY_LIMIT
small = st.integers(0, 3)
maybe_small = st.none() | small
limits = st.none() | st.sampled_from([0, 1, 2, 4, 6, BIG]) | st.integers(0, BIG)
capped_limits = st.sampled_from([0, 1, 4, 6, 8, 8, BIG])  # every key capped: fair share applies
# Untils on and next to NOW, where "still cooling" flips, as well as spread around it.
untils = st.sampled_from([NOW - 1, NOW, NOW + 1]) | st.integers(NOW - 4000, NOW + 4000)
cooldowns = st.tuples(untils, st.integers(1, 5))
nows = st.just(NOW) | st.integers(NOW - 1000, NOW + 1000)
# Per key: 1 in N for each exhausted/ambiguous field, 1 in M for each cooldown (0 = never).
FLAG_ODDS = {"clean": (0, 0), "sparse": (6, 6), "dense": (2, 2), "cooling": (0, 2)}


def _put(fields: dict[str, str], field: str, value: object) -> None:
    if value is not None:
        fields[field] = value if isinstance(value, str) else str(value)


def _counts(limit: int | None) -> st.SearchStrategy[int | None]:
    """A counter: absent, small, or on and next to ``limit`` (where "spent" flips)."""
    if limit is None:
        return maybe_small
    return maybe_small | st.sampled_from([max(limit - 1, 0), limit, limit + 1])


def _draw_key_fields(draw: st.DrawFn, spec: KeySpec, fields: dict[str, str]) -> None:
    name = spec.name
    flag_odds, cooling_odds = FLAG_ODDS[draw(st.sampled_from(sorted(FLAG_ODDS)))]

    def sometimes(values: st.SearchStrategy[Any], odds: int = flag_odds) -> Any:
        return draw(values) if odds and draw(st.integers(1, odds)) == 1 else None

    def cooldown() -> str | None:
        cooling = sometimes(cooldowns, cooling_odds)
        return None if cooling is None else logic.format_cooldown(*cooling)

    _put(fields, k.used_field(name), draw(_counts(spec.daily_limit)))
    _put(fields, k.exhausted_field(name), sometimes(st.sampled_from(["429", "x"])))
    _put(fields, k.cooling_field(name), cooldown())
    _put(fields, k.ambiguous_field(name), sometimes(st.sampled_from(MODELS)))
    for model in MODELS:
        _put(fields, k.model_used_field(name, model), draw(_counts(spec.model_limit)))
        _put(fields, k.model_exhausted_field(name, model), sometimes(st.just("429")))
        _put(fields, k.model_cooling_field(name, model), cooldown())


NOW_S = NOW // 1000
# A per-minute window: seconds on and next to its edges (now - 60 is in, now - 61 is out).
window_seconds = st.sampled_from([NOW_S - 61, NOW_S - 60, NOW_S - 59, NOW_S - 1, NOW_S, NOW_S + 1])
windows = st.lists(
    st.tuples(window_seconds | st.integers(NOW_S - 70, NOW_S + 2), st.integers(1, 4)),
    max_size=4,
).map(lambda buckets: ",".join(f"{s}:{n}" for s, n in buckets) or None)
key_rpms = st.none() | st.integers(1, 6)


def _copy_key(fields: dict[str, str], source: str, name: str) -> None:
    """Give ``name`` the same fields as ``source``: twins make ties, which decide the order."""
    for field, value in list(fields.items()):
        parsed = k.parse_field(field)
        if parsed is not None and parsed.key == source:
            suffix = "" if parsed.model is None else f"{k.SEP}{parsed.model}"
            fields[f"{parsed.kind}{k.SEP}{name}{suffix}"] = value


@st.composite
def day_states(draw: st.DrawFn, capped: bool = False) -> DayState:
    """Random maps; ``capped``: every key has a daily limit (so a fair share can apply)."""
    specs: list[KeySpec] = []
    fields: dict[str, str] = {}
    disabled: dict[str, str] = {}
    rates: dict[str, str] = {}
    key_limits = capped_limits if capped else draw(st.sampled_from([limits, capped_limits]))
    for i in range(draw(st.integers(1, 6))):
        name = f"key-{i}.x_"
        fingerprint = draw(st.sampled_from(FINGERPRINTS))
        twin_of_previous = draw(st.booleans())
        if specs and twin_of_previous:
            twin = specs[-1]
            specs.append(KeySpec(name, fingerprint, twin.daily_limit, twin.model_limit, twin.rpm))
            _copy_key(fields, twin.name, name)
            twin_rate = rates.get(k.key_rpm_field(PROVIDER, twin.name))
            _put(rates, k.key_rpm_field(PROVIDER, name), twin_rate)
        else:
            rpm = draw(key_rpms)
            specs.append(KeySpec(name, fingerprint, draw(key_limits), draw(limits), rpm))
            _draw_key_fields(draw, specs[-1], fields)
            _put(rates, k.key_rpm_field(PROVIDER, name), draw(windows))
        if draw(st.integers(0, 5)) == 0:
            record = draw(st.sampled_from(FINGERPRINTS))
            disabled[name] = logic.disabled_record(record, "401")
    cursor = draw(st.integers(-1, 13))  # -1: no cursor yet
    _put(fields, k.CURSOR_FIELD, None if cursor < 0 else cursor)
    clients: dict[str, str] = {}
    _draw_client_fields(draw, fields, clients)
    for name in (*CLIENTS, STRANGER):
        _put(rates, k.client_rpm_field(name), draw(windows))
        _put(rates, k.client_tpm_field(name), draw(windows))
    return DayState(tuple(specs), fields, disabled, clients, rates)


def _draw_client_fields(draw: st.DrawFn, fields: dict[str, str], clients: dict[str, str]) -> None:
    """Client counters, last-seen times around the active windows, and maybe a share-out."""
    # A share-out is at most the pool's remaining: up to six keys of BIG.
    share_out = st.none() | st.none() | st.integers(0, 12) | st.integers(0, 6 * BIG)
    _put(fields, k.SHARE_OUT_FIELD, draw(share_out))
    big_counts = st.sampled_from([BIG - 1, BIG, BIG + 1]) | st.integers(0, 6 * BIG)
    for name in (*CLIENTS, STRANGER):
        _put(fields, k.fair_used_field(name), draw(st.none() | st.integers(0, 6) | big_counts))
        _put(clients, k.client_used_field(name), draw(st.none() | st.integers(0, 6) | big_counts))
        _put(clients, k.client_free_used_field(name), draw(st.none() | st.integers(0, 6)))
        _put(clients, k.client_seen_field(name), draw(st.none() | seen_times))
        _put(clients, k.client_tokens_field(name), draw(st.none() | money))
        _put(clients, k.client_cost_field(name), draw(st.none() | money))
    _put(fields, k.COST_FIELD, draw(st.none() | money))


# Tokens and money (nanos): small, and on and next to the limits drawn below.
money = st.integers(0, 12) | st.sampled_from([10**12 - 1, 10**12, 10**12 + 1])
money_limits = st.none() | st.integers(0, 12) | st.just(10**12)


WIDEST_MS = MAX_ACTIVE_WINDOW_SECONDS * 1000
WINDOWS_MS = [0, 1, 1000, 3000, WIDEST_MS]  # the windows drawn below
# Last seen: on and next to the edges of those windows, as well as spread around them.
seen_times = (
    st.sampled_from([NOW - w - d for w in WINDOWS_MS for d in (1, 0)] + [NOW])
    | st.integers(NOW - 5000, NOW + 1000)
    | st.integers(NOW - WIDEST_MS - 1000, NOW)
)
TINY = float.fromhex("0x0.0000000000001p-1022")  # the smallest share above 0 (5e-324)
weights = (
    st.sampled_from([1.0, 3.0, 0.5, 1 / 3, 2.7, TINY, 1e-300, 1e-9, MAX_SHARE])
    | st.floats(0.01, 10.0)
    | st.floats(0.0, MAX_SHARE, exclude_min=True)
)
fair_shares = st.builds(
    FairShare,
    below=st.sampled_from([0.0, 0.3, 0.5, 1.0]) | st.floats(0.0, 1.0),
    weights=st.lists(
        st.tuples(st.sampled_from(CLIENTS), weights), max_size=3, unique_by=lambda w: w[0]
    ).map(tuple),
    active_window_ms=st.none() | st.sampled_from(WINDOWS_MS),
)
client_limits = st.none() | st.integers(0, 7) | st.sampled_from([BIG - 1, BIG])
per_minute = st.none() | st.integers(1, 8)
limits_of_clients: dict[str, Any] = {
    "daily_tokens": money_limits,
    "daily_budget": money_limits,
    "rpm": per_minute,
    "tpm": per_minute,
    "count_rate": st.booleans(),
}
free_clients = st.builds(
    ClientQuota,
    name=st.sampled_from((*CLIENTS, STRANGER)),
    daily_limit=st.none() | client_limits,
    fair_share=fair_shares,
    **limits_of_clients,
)
paid_clients = st.builds(
    ClientQuota,
    name=st.sampled_from((*CLIENTS, STRANGER)),
    daily_limit=client_limits,
    fair_share=st.none(),
    **limits_of_clients,
)
client_quotas = st.one_of(st.none(), paid_clients, free_clients)
# Half the cases: a free client on an all-capped pool, where the fair share decides most.
reserve_cases = st.tuples(day_states(), client_quotas) | st.tuples(
    day_states(capped=True), free_clients
)


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


def replace_count(client: ClientQuota) -> ClientQuota:
    """The same client on a later attempt of its request: rpm and tpm are not checked again."""
    return dataclasses.replace(client, count_rate=False)


class Lua:
    """Runs the Redis store's scripts on given maps, on its own event loop."""

    def __init__(self, server: RedisServer) -> None:
        self.prefix = f"parity-{uuid.uuid4().hex}"
        self.loop = asyncio.new_event_loop()
        self.store = RedisStore(server.url, prefix=self.prefix)
        self.admin = redis.Redis.from_url(server.url, decode_responses=True)
        self.keys = (
            k.day_key(self.prefix, PROVIDER, DAY),
            k.disabled_key(self.prefix, PROVIDER),
            k.clients_key(self.prefix, DAY),
            k.rates_key(self.prefix),
        )

    def load(self, state: DayState) -> None:
        """Put ``state`` in Redis behind the scripts' back, so bump the epoch as the stores'
        own changes do: reserve.lua rebuilds its index from the maps."""
        self.admin.delete(*self.keys)
        self.admin.incr(k.epoch_key(self.prefix, PROVIDER))
        for key, fields in zip(
            self.keys, (state.fields, state.disabled, state.clients, state.rates), strict=True
        ):
            if fields:
                self.admin.hset(key, items=list(chain(*fields.items())))

    def run(self, call: Callable[[RedisStore], Any]) -> Any:
        return self.loop.run_until_complete(call(self.store))

    def maps(self) -> tuple[dict[str, str], ...]:
        """The day map, the disabled map, the clients day map and the rates, as they are now."""
        return tuple(
            {str(f): str(v) for f, v in self.admin.hgetall(key).items()} for key in self.keys
        )

    def close(self) -> None:
        self.admin.delete(*self.keys)
        self.admin.close()
        self.loop.run_until_complete(self.store.aclose())
        self.loop.close()


@pytest.fixture
def lua(redis_server: RedisServer) -> Iterator[Lua]:
    runner = Lua(redis_server)
    yield runner
    runner.close()


def _state(
    *fields: tuple[str, object],
    keys: int = 2,
    limit: int | None = None,
    clients: tuple[tuple[str, object], ...] = (),
) -> DayState:
    specs = tuple(KeySpec(f"k{i}", "fpA", limit, None) for i in range(keys))
    return DayState(specs, {f: str(v) for f, v in fields}, {}, {f: str(v) for f, v in clients})


EQUAL = FairShare(0.3, (("alice", 1.0), ("bob.b", 1.0)), None)
ACTIVE = FairShare(0.3, (("alice", 1.0), ("bob.b", 3.0), ("c-3", 1.0)), 1000)
EXTREMES = FairShare(1.0, (("alice", TINY), ("bob.b", MAX_SHARE)), WIDEST_MS)
# Edges random maps reach only now and then: pinned so every run checks them.
RESERVE_EDGES = [
    (_state(("c|k0", f"{NOW}:1")), None),  # a cooldown ending now is over
    # available at the later of key and model cooldown; retry_at the earliest such
    (
        _state(
            ("c|k0", f"{NOW + 3000}:1"),
            ("c|k0|plain", f"{NOW + 1000}:1"),
            ("c|k1", f"{NOW + 2000}:1"),
        ),
        None,
    ),
    (_state(("u|k1", 1), ("rr", 1), keys=3), None),  # a tie after the cursor
    (_state(("u|k0", 2), ("u|k1", 1), ("rr", 1), keys=3), None),  # the most left, 2nd tie
    (_state(("u|k0", 5), ("rr", 7), keys=3, limit=9), None),  # a cursor past the last key
    # the client's daily limit: reached, and one call short of it
    (_state(clients=(("t|alice", 3),)), ClientQuota("alice", 3, None)),
    (_state(clients=(("t|alice", 2),)), ClientQuota("alice", 3, EQUAL)),
    # 20 - 14 = 6 left = 0.3 * 20: not below yet; 5 left: the share-out starts (share 2)
    (_state(("u|k0", 7), ("u|k1", 7), limit=10), ClientQuota("alice", None, EQUAL)),
    (_state(("u|k0", 8), ("u|k1", 7), limit=10), ClientQuota("alice", None, EQUAL)),
    (
        _state(("u|k0", 8), ("u|k1", 7), ("fu|alice", 2), limit=10),
        ClientQuota("alice", None, EQUAL),
    ),
    # shared out: the share is floor(fs * w / W); a key without a cap turns it off
    (_state(("fs", 5), ("fu|bob.b", 1), limit=10), ClientQuota("bob.b", None, EQUAL)),
    (_state(("fs", 5), ("fu|bob.b", 2)), ClientQuota("bob.b", None, EQUAL)),
    # active window: c-3 seen exactly at its edge counts, bob.b one ms before does not
    (
        _state(
            ("fs", 10),
            ("fu|alice", 5),  # the share is 5 with c-3 counted, 10 without
            limit=10,
            clients=(("s|c-3", NOW - 1000), ("s|bob.b", NOW - 1001)),
        ),
        ClientQuota("alice", None, ACTIVE),
    ),
    (_state(("fs", 3), limit=10), ClientQuota(STRANGER, 9, EQUAL)),  # not in the weights
    # the largest limits: a share of exactly BIG, used up and one call short of it
    (_state(("fs", 2 * BIG), ("fu|alice", BIG), limit=BIG), ClientQuota("alice", None, EQUAL)),
    (_state(("fs", 2 * BIG), ("fu|alice", BIG - 1), limit=BIG), ClientQuota("alice", BIG, EQUAL)),
    # the smallest and the largest shares side by side; bob.b seen at the widest window's edge
    (
        _state(("fs", BIG), limit=BIG, clients=(("s|bob.b", NOW - WIDEST_MS),)),
        ClientQuota("alice", None, EXTREMES),
    ),
    (_state(("fs", BIG), ("fu|bob.b", BIG - 1), limit=BIG), ClientQuota("bob.b", None, EXTREMES)),
]
W = f"{NOW_S - 60}:2,{NOW_S - 1}:1,{NOW_S}:1"  # a window of 4 calls, 2 of them leave first
LIMITED = ClientQuota("alice", None, None, daily_tokens=9, daily_budget=7, rpm=5, tpm=4)
# (state, client, provider budget): each limit reached and one short of it, in turn
LIMIT_EDGES = [
    (_state(("$", 5)), None, 5),
    (_state(("$", 4)), None, 5),
    (_state(clients=(("tk|alice", 9),)), LIMITED, None),
    (_state(clients=(("$|alice", 7),)), LIMITED, None),
    (_state(clients=(("$|alice", 6), ("tk|alice", 8))), LIMITED, None),
    (dataclasses.replace(_state(), rates={"r|alice": W + ",1:1"}), LIMITED, None),
    (dataclasses.replace(_state(), rates={"t|alice": W}), LIMITED, None),
    (dataclasses.replace(_state(), rates={"t|alice": W}), replace_count(LIMITED), None),
    (dataclasses.replace(_state(), rates={"r|alice": W}), LIMITED, None),
    (
        DayState(
            (KeySpec("k0", "fpA", None, None, 4), KeySpec("k1", "fpA", None, None, 5)),
            {},
            {},
            {},
            {"k|modelscope|k0": W, "k|modelscope|k1": W},
        ),
        None,
        None,
    ),
]
SETTLE_EDGES = [
    (_state(("c|k0", f"{NOW + 500}:3")), Settlement(cooldown=Cooldown("key", 10, 10, fixed=True))),
    (_state(("a|k0", "plain")), Settlement(exhaust="ambiguous")),
    (_state(("a|k0", "other")), Settlement(exhaust="ambiguous", remaining=0)),
]


def test_reserve_lua_matches_reserve_on(lua: Lua) -> None:
    @EXAMPLES
    @given(
        case=reserve_cases,
        strategy=st.sampled_from(Strategy),
        model=st.sampled_from(MODELS),
        now=nows,
        budget=money_limits,
    )
    def check(
        case: tuple[DayState, ClientQuota | None],
        strategy: Strategy,
        model: str,
        now: int,
        budget: int | None,
    ) -> None:
        state, client = case
        req = ReserveRequest(
            PROVIDER, model, state.specs, strategy, DAY, now, now + 3_600_000, client, budget
        )
        expected, changed, changed_clients, changed_rates = logic.reserve_on(
            state.fields, state.disabled, state.clients, req, state.rates
        )
        lua.load(state)
        assert lua.run(lambda store: store.reserve(req)) == expected
        assert lua.maps() == (
            {**state.fields, **changed},
            state.disabled,
            {**state.clients, **changed_clients},
            {**state.rates, **changed_rates},
        )

    for state, client in RESERVE_EDGES:
        for strategy in Strategy:
            check = example(
                case=(state, client), strategy=strategy, model="plain", now=NOW, budget=None
            )(check)
    for state, client, budget in LIMIT_EDGES:
        check = example(
            case=(state, client),
            strategy=Strategy.FILL_FIRST,
            model="plain",
            now=NOW,
            budget=budget,
        )(check)
    check()


reservation_clients = st.none() | st.tuples(
    st.sampled_from((*CLIENTS, STRANGER)), st.booleans(), st.booleans()
)


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
        client=reservation_clients,
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
        client: tuple[str, bool, bool] | None,
    ) -> None:
        name = state.specs[pick % len(state.specs)].name
        name_of, free, fair_counted = (None, False, False) if client is None else client
        res = Reservation(
            PROVIDER,
            name,
            fingerprint,
            model,
            DAY,
            now + day_end_in,
            *key_limits,
            None,
            None,
            client=name_of,
            fair_counted=fair_counted and free,
            free=free,
        )
        expected, changed, changed_disabled, changed_clients = logic.settle_on(
            state.fields, state.disabled, state.clients, res, settlement, now
        )
        lua.load(state)
        assert lua.run(lambda store: store.settle(res, settlement, now)) == expected
        assert lua.maps() == (
            {**state.fields, **changed},
            {**state.disabled, **changed_disabled},
            {**state.clients, **changed_clients},
            state.rates,  # a settle leaves the per-minute windows alone
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
            client=None,
        )(check)
    # A release gives the call back to the client too, never below zero.
    released = _state(("fu|alice", 1), clients=(("t|alice", 1),))
    for client in (("alice", True, True), ("alice", False, False), ("bob.b", True, True)):
        check = example(
            state=released,
            pick=0,
            model="plain",
            fingerprint="fpA",
            key_limits=(10, None),
            settlement=Settlement(release=True),
            now=NOW,
            day_end_in=30_000,
            client=client,
        )(check)
    check()


BASE_PROVIDER = {
    "name": "p",
    "type": "modelscope",
    "base_url": "http://127.0.0.1:1/v1",
    "keys": [{"name": "k", "secret": "s"}],
}


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        # A negative model limit was "no cap" in reserve.lua and "spent" in selection.py.
        (ProviderConfig, {**BASE_PROVIDER, "model_limits": {"plain": -1}}),
        (ProviderConfig, {**BASE_PROVIDER, "model_limits": {"plain": BIG + 1}}),
        (ProviderConfig, {**BASE_PROVIDER, "daily_limit": -1}),
        (ProviderConfig, {**BASE_PROVIDER, "model_daily_limit": BIG + 1}),
        (KeyConfig, {"name": "k", "secret": "s", "daily_limit": -1}),
        (KeyConfig, {"name": "k", "secret": "s", "model_daily_limit": BIG + 1}),
        (ClientConfig, {"name": "c", "key": "x", "daily_limit": -1}),
        (ClientConfig, {"name": "c", "key": "x", "daily_limit": BIG + 1}),
        (ClientConfig, {"name": "c", "key": "x", "share": 0}),
        (ClientConfig, {"name": "c", "key": "x", "share": MAX_SHARE * 2}),
        (ClientConfig, {"name": "c", "key": "x", "share": float("inf")}),
        (ClientConfig, {"name": "c", "key": "x", "share": float("nan")}),
        (FairShareSettings, {"below": -0.1}),
        (FairShareSettings, {"below": 1.1}),
        (FairShareSettings, {"below": float("nan")}),
        (FairShareSettings, {"active_window_seconds": MAX_ACTIVE_WINDOW_SECONDS + 1}),
        (FairShareSettings, {"active_window_seconds": float("inf")}),
    ],
)
def test_the_config_refuses_what_the_parity_checks_do_not_cover(
    model: type[BaseModel], fields: dict[str, Any]
) -> None:
    """The strategies above span every value the config accepts; it refuses the rest."""
    with pytest.raises(ValidationError):
        model.model_validate(fields)
