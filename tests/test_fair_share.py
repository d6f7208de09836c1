"""The fair share of a free pool, on every QuotaStore (memory, SQLite, Redis).

A free provider with 3 keys x 10 calls: a pool of 30. With ``below=0.3`` the share-out
starts on the first call that sees fewer than 9 calls left: it snapshots what is left,
and from then on each client gets floor(left * its weight / the counted weights).
"""

from __future__ import annotations

import time
from dataclasses import replace

from router.quota import logic
from router.quota.selection import KeyView
from router.quota.store import QuotaStore
from router.quota.types import (
    ClientQuota,
    ClientUsage,
    FairShare,
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)

PROVIDER = "modelscope"
MODEL = "Qwen/Qwen3-8B"
DAY = "20991230"
NOW = int(time.time() * 1000)  # Redis expires a day map by its own clock: stay near it
DAY_END = NOW + 10 * 3_600_000
KEYS = tuple(KeySpec(f"k{i}", "fp", 10, None) for i in range(3))
EQUAL = FairShare(below=0.3, weights=(("a", 1.0), ("b", 1.0)), active_window_ms=None)


def req(client: str, fair: FairShare | None = EQUAL, *, now: int = NOW) -> ReserveRequest:
    quota = ClientQuota(client, None, fair)
    return ReserveRequest(PROVIDER, MODEL, KEYS, Strategy.MOST_REMAINING, DAY, now, DAY_END, quota)


async def hammer(
    store: QuotaStore, request: ReserveRequest
) -> tuple[list[Reservation], NoCapacity]:
    """Reserve until refused: the reservations, and the refusal."""
    got: list[Reservation] = []
    while isinstance(outcome := await store.reserve(request), Reservation):
        got.append(outcome)
        assert len(got) <= 30
    return got, outcome


def share_refusal(share: int) -> NoCapacity:
    return NoCapacity(PROVIDER, MODEL, None, Refusal.CLIENT_SHARE, share)


# Once the pool itself is spent, that is what a refusal says, whatever the client's share.
SPENT = NoCapacity(PROVIDER, MODEL, None, Refusal.KEYS)


async def pool_used(store: QuotaStore) -> int:
    return sum(u.used for u in await store.snapshot(PROVIDER, KEYS, DAY, NOW))


async def test_equal_weights_split_what_is_left(store: QuotaStore) -> None:
    got, refusal = await hammer(store, req("a"))
    # 22 calls leave 8 < 0.3 * 30: the 23rd starts the share-out, 8 // 2 = 4 each.
    assert [r.fair_counted for r in got] == [False] * 22 + [True] * 4
    assert refusal == share_refusal(4)
    got_b, refusal_b = await hammer(store, req("b"))
    assert [r.fair_counted for r in got_b] == [True] * 4
    assert refusal_b == SPENT
    assert await pool_used(store) == 30
    usage = await store.client_usage(DAY, ["a", "b"], {PROVIDER: EQUAL}, NOW)
    assert usage == [
        ClientUsage("a", 26, 26, ((PROVIDER, 4, 4),)),
        ClientUsage("b", 4, 4, ((PROVIDER, 4, 4),)),
    ]


async def test_the_share_out_is_taken_once_a_day(store: QuotaStore) -> None:
    await hammer(store, req("a"))
    # b's calls after the share-out do not shrink a's share (it is of the snapshot).
    await store.reserve(req("b"))
    assert await store.reserve(req("a")) == share_refusal(4)
    # A released call gives the client its share back.
    last_b = await store.reserve(req("b"))
    assert isinstance(last_b, Reservation)
    assert last_b.fair_counted
    await store.settle(last_b, Settlement(release=True), NOW)
    assert [u.shares for u in await store.client_usage(DAY, ["b"], {PROVIDER: EQUAL}, NOW)] == [
        ((PROVIDER, 4, 1),)
    ]


async def test_weights_3_to_1(store: QuotaStore) -> None:
    fair = replace(EQUAL, weights=(("a", 3.0), ("b", 1.0)))
    got, refusal = await hammer(store, req("a", fair))
    assert (sum(r.fair_counted for r in got), refusal) == (6, share_refusal(6))  # 8 * 3/4
    got_b, refusal_b = await hammer(store, req("b", fair))
    assert (len(got_b), refusal_b) == (2, SPENT)  # 8 * 1/4, the last of the pool
    assert await pool_used(store) == 30


async def test_active_mode_counts_only_clients_seen_recently(store: QuotaStore) -> None:
    active = replace(EQUAL, active_window_ms=60_000)
    # b was last seen 10 minutes ago: the share-out counts a alone, who gets all that is left.
    await store.reserve(req("b", active, now=NOW - 600_000))
    got, refusal = await hammer(store, req("a", active))
    assert (len(got), sum(r.fair_counted for r in got), refusal) == (29, 8, SPENT)
    usage = await store.client_usage(DAY, ["a", "b"], {PROVIDER: active}, NOW)
    assert [u.shares for u in usage] == [((PROVIDER, 8, 8),), ((PROVIDER, 4, 0),)]


async def test_active_mode_counts_a_client_seen_within_the_window(store: QuotaStore) -> None:
    active = replace(EQUAL, active_window_ms=60_000)
    await store.reserve(req("b", active, now=NOW - 30_000))
    got, refusal = await hammer(store, req("a", active))
    assert (sum(r.fair_counted for r in got), refusal) == (4, share_refusal(4))
    # Once b's last call is older than the window, a is alone again.
    later = NOW + 30_001
    more, refusal = await hammer(store, req("a", active, now=later))
    assert (len(more), refusal) == (4, SPENT)


async def test_a_paid_provider_is_never_capped_by_a_share(store: QuotaStore) -> None:
    got, refusal = await hammer(store, req("a", None))
    assert len(got) == 30
    assert not any(r.fair_counted or r.free for r in got)
    assert refusal == NoCapacity(PROVIDER, MODEL, None)  # Refusal.KEYS: the keys are spent
    usage = await store.client_usage(DAY, ["a"], {PROVIDER: EQUAL}, NOW)
    assert usage == [ClientUsage("a", 30, 0, ())]  # never shared out: no share to show


async def test_a_key_without_a_cap_turns_the_fair_share_off(store: QuotaStore) -> None:
    uncapped = replace(req("a"), keys=(*KEYS, KeySpec("k3", "fp", None, None)))
    got = [await store.reserve(uncapped) for _ in range(40)]
    assert all(isinstance(r, Reservation) and r.free and not r.fair_counted for r in got)


async def test_disabled_keys_are_not_in_the_pool(store: QuotaStore) -> None:
    assert await store.disable(PROVIDER, "k2", "fp", "401")
    # A pool of 20: 14 calls leave 6, not below 0.3 * 20; the 16th sees 5: 5 // 2 = 2 each.
    got, refusal = await hammer(store, req("a"))
    assert (len(got), sum(r.fair_counted for r in got), refusal) == (17, 2, share_refusal(2))


async def test_the_client_limit_comes_before_the_share(store: QuotaStore) -> None:
    limited = replace(req("a"), client=ClientQuota("a", 3, EQUAL))
    got, refusal = await hammer(store, limited)
    assert len(got) == 3
    assert refusal == NoCapacity(PROVIDER, MODEL, None, Refusal.CLIENT_LIMIT, 3)


# --- the pure rules (logic.py; reserve.lua mirrors them, see test_lua_parity) ---------------


def test_pool_of_counts_the_keys_not_disabled() -> None:
    views = [
        KeyView(used=3, limit=10),
        KeyView(used=12, limit=10),  # over its limit: nothing left, not less than nothing
        KeyView(used=1, limit=10, exhausted=True),  # exhausted by upstream: nothing left
        KeyView(used=0, limit=None, disabled=True),  # disabled: not in the pool at all
        KeyView(used=0, limit=7, model_exhausted=True),  # a model's exhaustion is not the key's
    ]
    assert logic.pool_of(views) == logic.Pool(limit=37, remaining=14)
    assert logic.pool_of([*views, KeyView(limit=None)]) is None
    assert logic.pool_of([]) == logic.Pool(0, 0)


def test_fair_share_rule() -> None:
    fair = FairShare(0.3, (("a", 1.0), ("b", 3.0), ("c", 1.0)), None)
    assert logic.fair_share({}, fair, "b", 10, NOW) == 6  # 10 * 3 / 5
    assert logic.fair_share({}, fair, "a", 10, NOW) == 2
    assert logic.fair_share({}, fair, "stranger", 10, NOW) == 1  # weight 1 of 6
    active = replace(fair, active_window_ms=1000)
    seen = {"s|b": str(NOW - 1000), "s|c": str(NOW - 1001)}
    assert logic.fair_share(seen, active, "a", 10, NOW) == 2  # a and b count: 10 * 1 / 4
    assert logic.fair_share(seen, active, "c", 10, NOW) == 2  # c itself always counts
    assert logic.fair_share({}, active, "a", 10, NOW) == 10  # alone
    assert logic.fair_share({}, replace(fair, weights=(("a", 0.0),)), "a", 10, NOW) == 0
