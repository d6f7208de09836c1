"""One behaviour suite run against every QuotaStore (memory, SQLite, and Redis as one server,
a Cluster and a Sentinel service)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection as AsyncConnection
from redis.crc import key_slot

from router.quota import keys as k
from router.quota.factory import open_store
from router.quota.keysets import keyset
from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore, StoreError
from router.quota.types import (
    ClientQuota,
    ClientUsage,
    Cooldown,
    FairShare,
    KeySpec,
    KeyState,
    KeyUsage,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from tests.conftest import FIXED_NOW_MS, FakeClock
from tests.redis_server import RedisServer

PROVIDER = "modelscope"
MODEL = "Qwen/Qwen3-235B-A22B:free"  # model names may hold '/' and ':'
OTHER_MODEL = "deepseek-ai/DeepSeek-V3"
DAY = "20991230"
NEXT_DAY = "20991231"
NOW = FIXED_NOW_MS  # 2099-12-30 02:00 UTC: no store may compare it with its server's clock
DAY_END = NOW + 10 * 3_600_000


def key(
    name: str, limit: int | None = None, model_limit: int | None = None, fp: str = "fp1"
) -> KeySpec:
    return KeySpec(name, fp, limit, model_limit)


def request(
    keys: tuple[KeySpec, ...],
    strategy: Strategy = Strategy.MOST_REMAINING,
    *,
    model: str = MODEL,
    day: str = DAY,
    now: int = NOW,
    day_end: int = DAY_END,
) -> ReserveRequest:
    return ReserveRequest(PROVIDER, model, keys, strategy, day, now, day_end)


async def reserve(store: QuotaStore, req: ReserveRequest) -> Reservation:
    outcome = await store.reserve(req)
    assert isinstance(outcome, Reservation), outcome
    return outcome


async def no_capacity(store: QuotaStore, req: ReserveRequest) -> NoCapacity:
    outcome = await store.reserve(req)
    assert isinstance(outcome, NoCapacity), outcome
    return outcome


async def picks(store: QuotaStore, req: ReserveRequest, count: int) -> list[str]:
    return [(await reserve(store, req)).key for _ in range(count)]


async def usage(store: QuotaStore, keys: tuple[KeySpec, ...], **kw: object) -> dict[str, KeyUsage]:
    day = str(kw.get("day", DAY))
    now = int(str(kw.get("now", NOW)))
    return {u.key: u for u in await store.snapshot(PROVIDER, keys, day, now)}


# --- counting -------------------------------------------------------------------------


async def test_reserve_counts_and_never_exceeds_key_limits(store: QuotaStore) -> None:
    keys = (key("a", limit=3), key("b", limit=2))
    req = request(keys)
    got = [await store.reserve(req) for _ in range(7)]
    reservations = [r for r in got if isinstance(r, Reservation)]
    assert Counter(r.key for r in reservations) == {"a": 3, "b": 2}
    assert got[5:] == [NoCapacity(PROVIDER, MODEL, None)] * 2
    assert sorted(r.remaining or 0 for r in reservations if r.key == "a") == [0, 1, 2]
    snap = await usage(store, keys)
    assert (snap["a"].used, snap["a"].remaining, snap["a"].state) == (3, 0, KeyState.EXHAUSTED)
    assert snap["a"].reason == "limit"
    assert snap["b"].used == 2


async def test_model_limit_caps_the_model_not_the_key(store: QuotaStore) -> None:
    keys = (key("a", limit=10, model_limit=2),)
    first = await reserve(store, request(keys))
    assert (first.remaining, first.model_remaining) == (9, 1)
    await reserve(store, request(keys))
    await no_capacity(store, request(keys))
    other = await reserve(store, request(keys, model=OTHER_MODEL))
    assert (other.remaining, other.model_remaining) == (7, 1)
    snap = await usage(store, keys)
    assert snap["a"].used == 3
    assert [(m.model, m.used, m.state) for m in snap["a"].models] == [
        (MODEL, 2, KeyState.EXHAUSTED),
        (OTHER_MODEL, 1, KeyState.AVAILABLE),
    ]


# --- strategies ------------------------------------------------------------------------


async def test_most_remaining_takes_turns_on_ties(store: QuotaStore) -> None:
    keys = (key("a", 10), key("b", 10), key("c", 10))
    assert await picks(store, request(keys), 7) == ["a", "b", "c", "a", "b", "c", "a"]


async def test_most_remaining_prefers_the_key_with_most_left(store: QuotaStore) -> None:
    keys = (key("a", 5), key("b", 10))
    # b until it ties with a; then turns, starting after b (the last pick).
    assert await picks(store, request(keys), 9) == ["b"] * 5 + ["a", "b", "a", "b"]


async def test_most_remaining_counts_the_model_limit(store: QuotaStore) -> None:
    keys = (key("a", 100, model_limit=1), key("b", 10))
    assert await picks(store, request(keys), 2) == ["b", "b"]


async def test_round_robin_rotates_and_skips_exhausted(store: QuotaStore) -> None:
    keys = (key("a"), key("b", limit=1), key("c"))
    req = request(keys, Strategy.ROUND_ROBIN)
    assert await picks(store, req, 7) == ["a", "b", "c", "a", "c", "a", "c"]


async def test_fill_first_uses_keys_in_config_order(store: QuotaStore) -> None:
    keys = (key("a", 2), key("b", 2), key("c", 2))
    req = request(keys, Strategy.FILL_FIRST)
    assert await picks(store, req, 5) == ["a", "a", "b", "b", "c"]


# --- no capacity ---------------------------------------------------------------------------


async def test_no_capacity_retry_at_is_the_earliest_cooldown(store: QuotaStore) -> None:
    keys = (key("a"), key("b"), key("c", limit=1))
    res_a, res_b, res_c = [await reserve(store, request((k,))) for k in keys]
    await store.settle(res_a, Settlement(cooldown=Cooldown("key", 5000, 60_000)), NOW)
    await store.settle(res_b, Settlement(cooldown=Cooldown("model", 2000, 60_000)), NOW)
    assert res_c.remaining == 0  # exhausted: never contributes to retry_at
    assert (await no_capacity(store, request(keys))).retry_at_ms == NOW + 2000
    # b's model cooldown is over at NOW + 2000; another model never waited for it.
    assert (await reserve(store, request(keys, now=NOW + 2000))).key == "b"
    assert (await reserve(store, request(keys, model=OTHER_MODEL))).key == "b"


async def test_no_capacity_waits_for_the_later_of_key_and_model_cooldowns(
    store: QuotaStore,
) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys))
    await store.settle(res, Settlement(cooldown=Cooldown("key", 1000, 60_000)), NOW)
    await store.settle(res, Settlement(cooldown=Cooldown("model", 3000, 60_000)), NOW)
    assert (await no_capacity(store, request(keys))).retry_at_ms == NOW + 3000


async def test_no_capacity_without_retry_at_when_all_exhausted_or_disabled(
    store: QuotaStore,
) -> None:
    keys = (key("a", limit=1), key("b"))
    await reserve(store, request(keys[:1]))
    res_b = await reserve(store, request(keys[1:]))
    await store.settle(res_b, Settlement(disable_reason="401"), NOW)
    assert await no_capacity(store, request(keys)) == NoCapacity(PROVIDER, MODEL, None)


# --- settle ----------------------------------------------------------------------------------


async def test_release_gives_the_call_back_and_never_goes_below_zero(store: QuotaStore) -> None:
    keys = (key("a", limit=1, model_limit=1),)
    res = await reserve(store, request(keys))
    await no_capacity(store, request(keys))
    assert (await store.settle(res, Settlement(release=True), NOW)).exhausted is None
    again = await reserve(store, request(keys))
    assert (again.remaining, again.model_remaining) == (0, 0)
    await store.settle(again, Settlement(release=True), NOW)
    await store.settle(again, Settlement(release=True), NOW)
    snap = await usage(store, keys)
    assert snap["a"].used == 0
    assert [(m.model, m.used) for m in snap["a"].models] == [(MODEL, 0)]


async def test_header_sync_raises_the_count_never_lowers_it(store: QuotaStore) -> None:
    keys = (key("a", limit=100),)
    res = await reserve(store, request(keys))
    assert (await store.settle(res, Settlement(remaining=10), NOW)).exhausted is None
    assert (await reserve(store, request(keys))).remaining == 9
    await store.settle(res, Settlement(remaining=95), NOW)  # upstream lags: keep our count
    assert (await usage(store, keys))["a"].used == 91


async def test_header_remaining_zero_exhausts_the_key(store: QuotaStore) -> None:
    keys = (key("a", limit=100), key("b", limit=100))
    res = await reserve(store, request(keys))
    result = await store.settle(res, Settlement(remaining=0, model_remaining=0), NOW)
    assert result.exhausted == "key"
    snap = await usage(store, keys)
    assert (snap[res.key].used, snap[res.key].state) == (100, KeyState.EXHAUSTED)
    assert snap[res.key].reason == "upstream-remaining-0"
    other = "b" if res.key == "a" else "a"
    assert await picks(store, request(keys), 2) == [other, other]


async def test_header_model_remaining_zero_exhausts_only_the_model(store: QuotaStore) -> None:
    keys = (key("a", model_limit=20),)
    res = await reserve(store, request(keys))
    result = await store.settle(res, Settlement(remaining=50, model_remaining=0), NOW)
    assert result.exhausted == "model"
    await no_capacity(store, request(keys))
    assert (await reserve(store, request(keys, model=OTHER_MODEL))).key == "a"
    model = (await usage(store, keys))["a"].models[0]
    assert (model.model, model.used, model.state) == (MODEL, 20, KeyState.EXHAUSTED)


async def test_exhaust_key_and_model(store: QuotaStore) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys))
    assert (await store.settle(res, Settlement(exhaust="model"), NOW)).exhausted == "model"
    await no_capacity(store, request(keys))
    other = await reserve(store, request(keys, model=OTHER_MODEL))
    assert (await store.settle(other, Settlement(exhaust="key"), NOW)).exhausted == "key"
    await no_capacity(store, request(keys, model=OTHER_MODEL))
    snap = await usage(store, keys)
    assert (snap["a"].state, snap["a"].reason) == (KeyState.EXHAUSTED, "429")


async def test_ambiguous_near_zero_means_the_key(store: QuotaStore) -> None:
    keys = (key("a", limit=3),)
    await reserve(store, request(keys))
    res = await reserve(store, request(keys))  # 1 left
    ambiguous = Settlement(exhaust="ambiguous", near_zero=1)
    assert (await store.settle(res, ambiguous, NOW)).exhausted == "key"
    await no_capacity(store, request(keys, model=OTHER_MODEL))


async def test_ambiguous_first_model_then_second_model_means_the_key(store: QuotaStore) -> None:
    keys = (key("a", limit=100),)
    ambiguous = Settlement(exhaust="ambiguous", near_zero=5)
    res = await reserve(store, request(keys))
    assert (await store.settle(res, ambiguous, NOW)).exhausted == "model"
    assert (await store.settle(res, ambiguous, NOW)).exhausted == "model"  # same model again
    await no_capacity(store, request(keys))
    other = await reserve(store, request(keys, model=OTHER_MODEL))
    assert (await store.settle(other, ambiguous, NOW)).exhausted == "key"
    await no_capacity(store, request(keys, model="third/model"))


async def test_cooldown_doubles_on_repeats_up_to_max(store: QuotaStore) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys))
    backoff = Settlement(cooldown=Cooldown("key", 1000, 8000))
    now, untils = NOW, []
    for _ in range(6):
        until = (await store.settle(res, backoff, now)).cooldown_until_ms
        assert until is not None
        untils.append(until - now)
        now = until
    assert untils == [1000, 2000, 4000, 8000, 8000, 8000]
    # A quiet spell of max_ms or more starts over.
    assert (await store.settle(res, backoff, now + 8000)).cooldown_until_ms == now + 9000


async def test_cooldown_never_passes_the_day_end(store: QuotaStore) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys, day_end=NOW + 1500))
    settled = await store.settle(res, Settlement(cooldown=Cooldown("model", 5000, 60_000)), NOW)
    assert settled.cooldown_until_ms == NOW + 1500


async def test_fixed_cooldown_is_exactly_base(store: QuotaStore) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys))
    retry_after = Settlement(cooldown=Cooldown("key", 30_000, 1000, fixed=True))
    assert (await store.settle(res, retry_after, NOW)).cooldown_until_ms == NOW + 30_000
    assert (await store.settle(res, retry_after, NOW + 1)).cooldown_until_ms == NOW + 30_001
    snap = await usage(store, keys)
    assert (snap["a"].state, snap["a"].until_ms) == (KeyState.COOLING, NOW + 30_001)


async def test_disable_holds_only_for_the_same_secret(store: QuotaStore) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys))
    assert (await store.settle(res, Settlement(disable_reason="401"), NOW)).newly_disabled
    assert not (await store.settle(res, Settlement(disable_reason="401"), NOW)).newly_disabled
    await no_capacity(store, request(keys))
    snap = await usage(store, keys)
    assert (snap["a"].state, snap["a"].reason) == (KeyState.DISABLED, "401")
    rotated = (key("a", fp="fp2"),)  # a new secret under the same name
    res2 = await reserve(store, request(rotated))
    assert (await usage(store, rotated))["a"].state == KeyState.AVAILABLE
    assert (await store.settle(res2, Settlement(disable_reason="403"), NOW)).newly_disabled


async def test_enable_forgets_the_disable(store: QuotaStore) -> None:
    keys = (key("a"),)
    res = await reserve(store, request(keys))
    await store.settle(res, Settlement(disable_reason="401"), NOW)
    await no_capacity(store, request(keys))
    await store.enable(PROVIDER, "a")
    await store.enable(PROVIDER, "never-disabled")
    assert (await reserve(store, request(keys))).key == "a"


async def test_a_new_day_starts_from_zero(store: QuotaStore) -> None:
    keys = (key("a", limit=1), key("b"))
    await reserve(store, request(keys[:1]))
    res_b = await reserve(store, request(keys[1:]))
    await store.settle(res_b, Settlement(exhaust="key"), NOW)
    await store.settle(res_b, Settlement(cooldown=Cooldown("model", 60_000, 60_000)), NOW)
    await no_capacity(store, request(keys))
    tomorrow = request(keys, Strategy.FILL_FIRST, day=NEXT_DAY, day_end=DAY_END + 86_400_000)
    assert await picks(store, tomorrow, 2) == ["a", "b"]
    snap = await usage(store, keys, day=NEXT_DAY)
    assert [(u.used, u.state) for u in snap.values()] == [(1, KeyState.EXHAUSTED), (1, "available")]
    assert (await usage(store, keys))["a"].used == 1  # yesterday still readable


async def test_snapshot_states(store: QuotaStore) -> None:
    keys = (key("dis"), key("exh"), key("cool"), key("full", limit=1), key("ok", limit=5))
    res = {k.name: await reserve(store, request((k,))) for k in keys}
    await store.settle(res["dis"], Settlement(disable_reason="401", exhaust="key"), NOW)
    await store.settle(res["exh"], Settlement(exhaust="key", cooldown=Cooldown("key", 9, 9)), NOW)
    await store.settle(res["cool"], Settlement(cooldown=Cooldown("key", 1000, 1000)), NOW)
    await store.settle(res["ok"], Settlement(cooldown=Cooldown("model", 1000, 1000)), NOW)
    await store.settle(res["ok"], Settlement(exhaust="model"), NOW)
    snapshot = await store.snapshot(PROVIDER, keys, DAY, NOW, {MODEL: 1})
    assert [(u.key, u.state, u.reason, u.until_ms) for u in snapshot] == [
        ("dis", KeyState.DISABLED, "401", None),
        ("exh", KeyState.EXHAUSTED, "429", None),
        ("cool", KeyState.COOLING, None, NOW + 1000),
        ("full", KeyState.EXHAUSTED, "limit", None),
        ("ok", KeyState.AVAILABLE, None, None),
    ]
    ok = snapshot[-1]
    assert (ok.used, ok.limit, ok.remaining) == (1, 5, 4)
    assert [(m.model, m.used, m.state) for m in ok.models] == [(MODEL, 1, KeyState.EXHAUSTED)]
    # model_limits[MODEL] = 1 makes "cool"'s one call on MODEL exhaust that model.
    assert snapshot[2].models[0].state == KeyState.EXHAUSTED
    later = await store.snapshot(PROVIDER, keys, DAY, NOW + 1000)
    assert later[2].state == KeyState.AVAILABLE
    assert later[4].models[0].state == KeyState.EXHAUSTED  # x|ok|model stays all day


async def test_snapshot_of_an_unknown_provider_is_all_available(store: QuotaStore) -> None:
    snapshot = await store.snapshot("nobody", (key("a", 3),), DAY, NOW)
    assert snapshot == [KeyUsage("nobody", "a", 0, 3, KeyState.AVAILABLE, None, None, ())]


async def test_ping(store: QuotaStore) -> None:
    await store.ping()


# --- concurrency -------------------------------------------------------------------------------


async def test_concurrent_reserves_are_exact(store: QuotaStore) -> None:
    keys = (key("a", 50), key("b", 50), key("c", 50))
    outcomes = await asyncio.gather(*(store.reserve(request(keys)) for _ in range(200)))
    reservations = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(reservations) == 150
    assert sum(isinstance(o, NoCapacity) for o in outcomes) == 50
    assert Counter(r.key for r in reservations) == {"a": 50, "b": 50, "c": 50}
    # Every remaining value was handed out exactly once per key.
    for name in "abc":
        assert sorted(r.remaining or 0 for r in reservations if r.key == name) == list(range(50))
    assert [u.used for u in (await usage(store, keys)).values()] == [50, 50, 50]


# --- clients -------------------------------------------------------------------------------------

FREE = FairShare(below=0.3, weights=(("alice", 1.0), ("bob", 1.0)), active_window_ms=None)


def client(
    name: str = "alice", limit: int | None = None, fair: FairShare | None = None
) -> ClientQuota:
    return ClientQuota(name, limit, fair)


def for_client(keys: tuple[KeySpec, ...], who: ClientQuota, **kw: Any) -> ReserveRequest:
    return replace(request(keys, **kw), client=who)


async def client_usage(store: QuotaStore, *names: str, **kw: Any) -> dict[str, ClientUsage]:
    return {u.client: u for u in await store.client_usage(DAY, names, **kw)}


async def test_client_daily_limit_is_exact_under_concurrency(store: QuotaStore) -> None:
    keys = (key("a", 100), key("b", 100))
    req = for_client(keys, client("alice", limit=37))
    outcomes = await asyncio.gather(*(store.reserve(req) for _ in range(100)))
    reservations = [o for o in outcomes if isinstance(o, Reservation)]
    refusals = [o for o in outcomes if isinstance(o, NoCapacity)]
    assert len(reservations) == 37
    assert {r.client for r in reservations} == {"alice"}
    assert set(refusals) == {NoCapacity(PROVIDER, MODEL, None, Refusal.CLIENT_LIMIT, 37)}
    # A refusal touches no key: exactly the 37 calls are counted.
    assert sum(u.used for u in (await usage(store, keys)).values()) == 37
    assert (await client_usage(store, "alice"))["alice"] == ClientUsage("alice", 37, 0, ())
    # The limit is the client's own: another client still gets keys.
    assert (await reserve(store, for_client(keys, client("bob", limit=1)))).client == "bob"


async def test_client_limit_counts_every_provider_and_day(store: QuotaStore) -> None:
    keys = (key("a"),)
    alice = client("alice", limit=2)
    await reserve(store, for_client(keys, alice))
    other = replace(for_client(keys, alice), provider="other")
    await reserve(store, other)
    refused = await no_capacity(store, other)
    assert (refused.reason, refused.client_limit, refused.retry_at_ms) == (
        Refusal.CLIENT_LIMIT,
        2,
        None,
    )
    tomorrow = for_client(keys, alice, day=NEXT_DAY, day_end=DAY_END + 86_400_000)
    assert (await reserve(store, tomorrow)).client == "alice"


async def test_a_zero_daily_limit_refuses_at_once(store: QuotaStore) -> None:
    refused = await no_capacity(store, for_client((key("a"),), client(limit=0)))
    assert (refused.reason, refused.client_limit) == (Refusal.CLIENT_LIMIT, 0)
    assert (await usage(store, (key("a"),)))["a"].used == 0


async def test_release_gives_the_client_its_calls_back(store: QuotaStore) -> None:
    keys = (key("a", 100),)
    paid = await reserve(store, for_client(keys, client(limit=2)))
    free = await reserve(store, for_client(keys, client(limit=2, fair=FREE)))
    assert (paid.free, free.free, free.fair_counted) == (False, True, False)
    await no_capacity(store, for_client(keys, client(limit=2)))
    assert (await client_usage(store, "alice"))["alice"] == ClientUsage("alice", 2, 1, ())
    await store.settle(free, Settlement(release=True), NOW)
    assert (await client_usage(store, "alice"))["alice"] == ClientUsage("alice", 1, 0, ())
    for _ in range(2):  # never below zero
        await store.settle(paid, Settlement(release=True), NOW)
        await store.settle(free, Settlement(release=True), NOW)
    assert (await client_usage(store, "alice"))["alice"] == ClientUsage("alice", 0, 0, ())
    assert (await reserve(store, for_client(keys, client(limit=2)))).remaining == 99


async def test_settle_without_release_leaves_the_client_count(store: QuotaStore) -> None:
    keys = (key("a", 100),)
    res = await reserve(store, for_client(keys, client()))
    await store.settle(res, Settlement(remaining=50, cooldown=Cooldown("key", 1, 1)), NOW)
    assert (await client_usage(store, "alice"))["alice"].used == 1


async def test_client_usage_of_unknown_clients_is_zero_in_the_given_order(
    store: QuotaStore,
) -> None:
    await reserve(store, for_client((key("a"),), client("bob")))
    got = await store.client_usage(DAY, ["nobody", "bob", "alice"], {PROVIDER: FREE}, NOW)
    assert got == [
        ClientUsage("nobody", 0, 0, ()),
        ClientUsage("bob", 1, 0, ()),
        ClientUsage("alice", 0, 0, ()),
    ]
    assert await store.client_usage(NEXT_DAY, ["bob"]) == [ClientUsage("bob", 0, 0, ())]


async def test_client_usage_shows_shares_of_shared_out_pools_only(store: QuotaStore) -> None:
    keys = (key("a", 10),)
    await reserve(store, replace(request(keys), provider="quiet"))  # free, never shared out
    for _ in range(8):  # 2 left < 0.3 * 10 on the next call: shared out, 1 each
        await reserve(store, for_client(keys, client("bob", fair=FREE)))
    alice = await reserve(store, for_client(keys, client("alice", fair=FREE)))
    assert alice.fair_counted
    free = {"quiet": FREE, PROVIDER: FREE}
    got = await client_usage(store, "alice", "bob", free=free, now_ms=NOW)
    assert got["alice"] == ClientUsage("alice", 1, 1, ((PROVIDER, 1, 1),))
    assert got["bob"] == ClientUsage("bob", 8, 8, ((PROVIDER, 1, 0),))
    # Without the providers' parameters no share can be computed: totals only.
    assert (await client_usage(store, "alice"))["alice"] == ClientUsage("alice", 1, 1, ())


# --- disable, reset ---------------------------------------------------------------------------


async def test_disable_and_enable(store: QuotaStore) -> None:
    keys = (key("a"), key("b"))
    assert await store.disable(PROVIDER, "a", "fp1", "revoked")
    assert not await store.disable(PROVIDER, "a", "fp1", "still revoked")
    snap = await usage(store, keys)
    assert (snap["a"].state, snap["a"].reason) == (KeyState.DISABLED, "still revoked")
    assert await picks(store, request(keys), 2) == ["b", "b"]
    # Only for that secret: a new one under the same name is usable, and disabling it is new.
    assert (await reserve(store, request((key("a", fp="fp2"),)))).key == "a"
    assert await store.disable(PROVIDER, "a", "fp2", "revoked too")
    await store.enable(PROVIDER, "a")
    assert (await usage(store, keys))["a"].state == KeyState.AVAILABLE
    assert await store.disable(PROVIDER, "a", "fp1", "again")
    # settle sees a disable made by hand as already made
    res = await reserve(store, request(keys[1:]))
    assert await store.disable(PROVIDER, "b", "fp1", "by hand")
    assert not (await store.settle(res, Settlement(disable_reason="401"), NOW)).newly_disabled


async def test_reset_key_forgets_one_key_of_one_day(store: QuotaStore) -> None:
    keys = (key("a", 3), key("b", 3))
    res_a = await reserve(store, request(keys[:1]))
    await reserve(store, request(keys[:1], model=OTHER_MODEL))
    await store.settle(res_a, Settlement(exhaust="ambiguous", near_zero=0), NOW)  # a|a, x|a|m
    await store.settle(res_a, Settlement(cooldown=Cooldown("key", 60_000, 60_000)), NOW)
    await store.settle(res_a, Settlement(cooldown=Cooldown("model", 60_000, 60_000)), NOW)
    await store.settle(res_a, Settlement(exhaust="key"), NOW)
    res_b = await reserve(store, request(keys[1:]))
    await store.settle(res_b, Settlement(cooldown=Cooldown("key", 60_000, 60_000)), NOW)
    tomorrow = request(keys[:1], day=NEXT_DAY, day_end=DAY_END + 86_400_000)
    await reserve(store, tomorrow)
    assert await store.disable(PROVIDER, "a", "fp1", "401")

    await store.reset_key(PROVIDER, "a", DAY)
    await store.reset_key(PROVIDER, "never-used", DAY)
    await store.reset_key("nobody", "a", DAY)

    snap = await usage(store, keys)
    assert (snap["a"].used, snap["a"].models) == (0, ())
    assert (snap["a"].state, snap["a"].reason) == (KeyState.DISABLED, "401")  # not reset_key's
    assert (snap["b"].used, snap["b"].state) == (1, KeyState.COOLING)
    assert (await usage(store, keys, day=NEXT_DAY))["a"].used == 1
    await store.enable(PROVIDER, "a")
    assert (await usage(store, keys))["a"].state == KeyState.AVAILABLE
    # The ambiguous note is gone too: the first model refused again means that model only.
    res = await reserve(store, request(keys[:1], model=OTHER_MODEL))
    ambiguous = Settlement(exhaust="ambiguous", near_zero=0)
    assert (await store.settle(res, ambiguous, NOW)).exhausted == "model"


# --- tasks ------------------------------------------------------------------------------------


async def test_tasks_remember_and_recall(store: QuotaStore) -> None:
    assert await store.recall_task("unknown") is None
    await store.remember_task("task-1", "modelscope/a", ttl_ms=60_000)
    await store.remember_task("task-2", "modelscope/b", ttl_ms=60_000)
    assert await store.recall_task("task-1") == "modelscope/a"
    await store.remember_task("task-1", "modelscope/c", ttl_ms=60_000)
    assert [await store.recall_task(t) for t in ("task-1", "task-2")] == [
        "modelscope/c",
        "modelscope/b",
    ]
    with pytest.raises(ValueError, match="ttl_ms"):
        await store.remember_task("task-3", "x", ttl_ms=0)


async def test_tasks_expire_after_their_ttl(store: QuotaStore, clock: FakeClock) -> None:
    if isinstance(store, RedisStore):
        pytest.skip("Redis expires by its own clock: test_redis_task_keys_get_the_ttl")
    await store.remember_task("task-1", "modelscope/a", ttl_ms=1000)
    await store.remember_task("task-2", "modelscope/b", ttl_ms=5)
    clock.advance(999)
    assert [await store.recall_task(t) for t in ("task-1", "task-2")] == ["modelscope/a", None]
    clock.advance(1)
    assert await store.recall_task("task-1") is None
    # Remembered again (the expired ones pruned on the way): a fresh ttl from now.
    await store.remember_task("task-1", "modelscope/c", ttl_ms=1)
    assert await store.recall_task("task-1") == "modelscope/c"
    clock.advance(1)
    assert await store.recall_task("task-1") is None


# --- store-specific ------------------------------------------------------------------------------


async def test_sqlite_restart_keeps_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "quota.db"
    keys = (key("a", 5),)
    first = SqliteStore(path)
    res = await reserve(first, request(keys))
    await first.settle(res, Settlement(cooldown=Cooldown("model", 1000, 1000)), NOW)
    await reserve(first, request(keys, model=OTHER_MODEL))
    await first.aclose()
    second = SqliteStore(path)
    try:
        assert (await usage(second, keys))["a"].used == 2
        assert (await reserve(second, request(keys, model=OTHER_MODEL))).remaining == 2
    finally:
        await second.aclose()


async def test_sqlite_restart_purges_by_the_newest_day_not_by_the_machine_clock(
    tmp_path: Path,
) -> None:
    """Days far from today (the quota day comes from the gateway's clock) survive a restart;
    only days more than three before the newest one on record go."""
    path = tmp_path / "quota.db"
    keys = (key("a", 5),)
    first = SqliteStore(path)
    for day in ("20000101", "20000105", "20000108"):
        await reserve(first, request(keys, day=day))
    await first.aclose()
    second = SqliteStore(path)
    try:
        used = {d: (await usage(second, keys, day=d))["a"].used for d in ("20000101", "20000105")}
        assert used == {"20000101": 0, "20000105": 1}
        assert (await usage(second, keys, day="20000108"))["a"].used == 1
    finally:
        await second.aclose()


async def test_sqlite_two_stores_on_one_file_stay_exact(tmp_path: Path) -> None:
    keys = (key("a", 30), key("b", 30))
    stores = [SqliteStore(tmp_path / "shared.db") for _ in range(2)]
    try:
        outcomes = await asyncio.gather(*(stores[i % 2].reserve(request(keys)) for i in range(80)))
    finally:
        for s in stores:
            await s.aclose()
    assert sum(isinstance(o, Reservation) for o in outcomes) == 60


async def test_memory_drops_days_before_yesterday() -> None:
    store = MemoryStore()
    keys = (key("a"),)
    for day in ("20991228", "20991229", "20991230"):
        await reserve(store, request(keys, day=day))
    used = {day: (await usage(store, keys, day=day))["a"].used for day in ("20991228", "20991229")}
    assert used == {"20991228": 0, "20991229": 1}


async def test_redis_day_map_lives_a_day_past_the_reset_whatever_redis_clock_says(
    redis_server: RedisServer,
) -> None:
    """The time to live is a duration from the caller's now (here 2099, far from Redis's own
    clock): an instant would be read on Redis's clock, and one it thinks past deletes the map."""
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisStore(redis_server.url, prefix=prefix)
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    lives = DAY_END + 86_400_000 - NOW
    try:
        res = await reserve(store, request((key("a"),)))
        day_map = f"{{{prefix}}}:p:{PROVIDER}:day:{DAY}"
        assert await admin.exists(day_map) == 1
        assert lives - 60_000 < await admin.pttl(day_map) <= lives
        await admin.persist(day_map)
        await store.settle(res, Settlement(release=True), NOW)  # settle restores the expiry
        assert lives - 60_000 < await admin.pttl(day_map) <= lives
        # a caller far in the past of Redis's clock: its counts stay
        past = replace(request((key("a"),)), day="20000101", now_ms=946_684_800_000)
        past = replace(past, day_end_ms=past.now_ms + 3_600_000)
        await reserve(store, past)
        assert (await usage(store, (key("a"),), day="20000101"))["a"].used == 1
    finally:
        await admin.aclose()
        await store.aclose()


async def _eval_calls(admin: Redis) -> int:
    stats = await admin.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))


async def test_redis_reserve_and_settle_are_one_round_trip_each(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex}")
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    keys = (key("a", 100), key("b", 100))
    try:
        await reserve(store, request(keys))  # the first call may load the script (NOSCRIPT)
        res = await reserve(store, request(keys))
        await store.settle(res, Settlement(release=True), NOW)
        before = await _eval_calls(admin)
        for _ in range(5):
            res = await reserve(store, request(keys))
        assert await _eval_calls(admin) - before == 5
        await store.settle(res, Settlement(remaining=3, cooldown=Cooldown("key", 1, 2)), NOW)
        assert await _eval_calls(admin) - before == 6
    finally:
        await admin.aclose()
        await store.aclose()


async def test_redis_down_raises_store_error() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, prefix="down")
        try:
            keys = (key("a"),)
            res = await reserve(store, request(keys))
            server.kill()
            for call in (
                store.reserve(request(keys)),
                store.settle(res, Settlement(release=True), NOW),
                store.snapshot(PROVIDER, keys, DAY, NOW),
                store.enable(PROVIDER, "a"),
                store.disable(PROVIDER, "a", "fp1", "401"),
                store.reset_key(PROVIDER, "a", DAY),
                store.client_usage(DAY, ["alice"], {PROVIDER: FREE}, NOW),
                store.remember_task("t", "v", 1000),
                store.recall_task("t"),
                store.ping(),
            ):
                with pytest.raises(StoreError) as caught:
                    await call
                assert caught.value.__cause__ is not None
        finally:
            await store.aclose()


async def test_redis_task_keys_get_the_ttl(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisStore(redis_server.url, prefix=prefix)
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await store.remember_task("task/1", "modelscope/a", ttl_ms=1500)
        assert 0 < await admin.pttl(f"{{{prefix}}}:task:task/1") <= 1500
    finally:
        await admin.aclose()
        await store.aclose()


async def _exercise_every_key(store: QuotaStore, provider: str) -> None:
    """Write every kind of key: day maps of two days, disabled map, clients maps, a task."""
    keys = (key("a", 10),)
    for day in (DAY, NEXT_DAY):
        req = replace(for_client(keys, client(fair=FREE), day=day), provider=provider)
        res = await reserve(store, req)
        await store.settle(res, Settlement(disable_reason="401"), NOW)
        await store.enable(provider, "a")
    await store.remember_task("t-1", "x", ttl_ms=60_000)


async def test_redis_every_key_of_a_deployment_shares_one_hash_tag(
    redis_server: RedisServer,
) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisStore(redis_server.url, prefix=prefix)
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await _exercise_every_key(store, PROVIDER)
        await store.disable(PROVIDER, "a", "fp1", "401")
        await _exercise_every_key(store, "clients")  # a provider named like the clients map
        names = sorted([name async for name in admin.scan_iter(match=f"*{prefix}*")])
    finally:
        await admin.aclose()
        await store.aclose()
    tag = f"{{{prefix}}}"
    digest = keyset((key("a", 10),), Strategy.MOST_REMAINING).digest
    index = [
        f"{tag}:keyset:{digest}",
        *(
            f"{tag}:p:{provider}:{kind}:{day}{rest}"
            for provider in (PROVIDER, "clients")
            for day in (DAY, NEXT_DAY)
            for kind, rest in (("ix", f":{digest}:{MODEL}"), ("pool", ""))
        ),
        f"{tag}:p:{PROVIDER}:epoch",
        f"{tag}:p:clients:epoch",
    ]
    assert names == sorted(
        [
            *index,
            f"{tag}:p:{PROVIDER}:day:{DAY}",
            f"{tag}:p:{PROVIDER}:day:{NEXT_DAY}",
            f"{tag}:p:{PROVIDER}:disabled",
            f"{tag}:p:clients:day:{DAY}",
            f"{tag}:p:clients:day:{NEXT_DAY}",
            f"{tag}:clients:day:{DAY}",
            f"{tag}:clients:day:{NEXT_DAY}",
            f"{tag}:task:t-1",
        ]
    )
    # Cluster hashes only what is inside the first {...}: one slot for the whole deployment.
    assert {name[name.index("{") + 1 : name.index("}")] for name in names} == {prefix}
    assert len({key_slot(name.encode()) for name in names}) == 1


async def test_redis_stores_a_key_set_once_then_reserves_in_one_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first reserve with a key set Redis does not hold stores it (two more round trips);
    every later one, from any replica, is one EVALSHA whatever the pool size."""
    prefix = f"test-{uuid.uuid4().hex}"
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(2)]
    warm = (key("w", 10),)
    try:
        for store in stores:  # load the script and open a connection
            await reserve(store, request(warm))
        trips = _RoundTrips(monkeypatch)
        for size in (3, 500):
            keys = tuple(key(f"k{i}", 10) for i in range(size))
            await reserve(stores[0], request(keys))
            assert trips.take() == 3, size  # EVALSHA (key set unknown), HSET, EVALSHA
            for store in stores:
                for _ in range(3):
                    await reserve(store, request(keys))
                assert trips.take() == 3, size
    finally:
        for store in stores:
            await store.aclose()


def test_key_names_of_the_default_prefix() -> None:
    assert k.day_key(k.DEFAULT_PREFIX, "modelscope", "20261129") == (
        "{modelscope-router}:p:modelscope:day:20261129"
    )
    assert k.clients_key(k.DEFAULT_PREFIX, "20261129") == "{modelscope-router}:clients:day:20261129"
    assert k.day_key(k.DEFAULT_PREFIX, "clients", "1") != k.clients_key(k.DEFAULT_PREFIX, "1")


class _RoundTrips:
    """Counts what redis-py's connections (standalone, Cluster nodes, Sentinel-managed) write to
    their sockets: one write per round trip."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        send = AsyncConnection.send_packed_command

        async def counting(conn: AsyncConnection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await send(conn, command, check_health)

        monkeypatch.setattr(AsyncConnection, "send_packed_command", counting)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


async def test_redis_every_call_is_one_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex}")
    keys = (key("a", 10), key("b", 10))
    free = for_client(keys, client("alice", limit=100, fair=FREE))
    try:
        for _ in range(2):  # load the scripts (NOSCRIPT) and open a connection first
            res = await reserve(store, free)
            await store.settle(res, Settlement(release=True), NOW)
            await store.reset_key(PROVIDER, "zzz", DAY)
            await store.snapshot(PROVIDER, keys, DAY, NOW)
            await store.disable(PROVIDER, "zzz", "fp1", "401")
            await store.enable(PROVIDER, "zzz")
            await store.client_usage(DAY, ["alice"], {PROVIDER: FREE}, NOW)
        trips = _RoundTrips(monkeypatch)
        for _ in range(16):  # into the share-out: 20 - 15 < 0.3 * 20 on the 16th call
            res = await reserve(store, free)
        assert trips.take() == 16
        assert res.fair_counted
        calls = [
            store.settle(res, Settlement(release=True), NOW),
            store.disable(PROVIDER, "a", "fp1", "401"),
            store.enable(PROVIDER, "a"),
            store.reset_key(PROVIDER, "a", DAY),
            store.client_usage(DAY, ["alice", "bob"], {PROVIDER: FREE, "other": FREE}, NOW),
            store.remember_task("t", "v", 1000),
            store.recall_task("t"),
            store.snapshot(PROVIDER, keys, DAY, NOW),
        ]
        for call in calls:
            await call
            assert trips.take() == 1, call
    finally:
        await store.aclose()


def test_redis_repr_hides_the_password() -> None:
    store = RedisStore("redis://router:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(store)
    assert "***:***@127.0.0.1:1" in repr(store)  # user and password
    unix = RedisStore("unix:///run/redis.sock?db=1&password=s3cret")
    assert "s3cret" not in str(unix)


@pytest.mark.parametrize(
    "url", ["postgres://localhost/x", "localhost:6379", "sqlite://relative.db", "sqlite:///"]
)
def test_open_store_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite|scheme"):
        open_store(url)


async def test_open_store_relative_sqlite_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///rel.db")
    try:
        await store.ping()
    finally:
        await store.aclose()
    assert (tmp_path / "rel.db").exists()
