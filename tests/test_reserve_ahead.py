"""Reserve ahead (router.quota.ahead): every store, then the gateway end to end on Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from router.app import LIVE, create_app
from router.config import Settings
from router.demo import running
from router.pool import KeyPool
from router.quota.ahead import ReserveAhead
from router.quota.days import quota_day, to_ms
from router.quota.redis_store import RedisStore
from router.quota.store import ForwardingStore, QuotaStore, StoreError
from router.quota.types import (
    ClientQuota,
    Cooldown,
    KeySpec,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from router.simulator import Simulator
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, gateway_config
from tests.support import FakeClock as WallClock
from tests.test_gateway import MODEL, TOKENS, sim_config
from tests.test_store import DAY, NEXT_DAY, NOW, PROVIDER, _eval_calls, key, request, usage

KEYS = (key("a", 1000), key("b", 1000))


class Gate(ForwardingStore):
    """A real store whose next reserve can be held back, or made to fail, once it has run."""

    def __init__(self, store: QuotaStore) -> None:
        super().__init__(store)
        self.calls = 0
        self._held: asyncio.Event | None = None
        self._fail = False
        self._waiting: dict[int, asyncio.Event] = {}

    async def until_calls(self, n: int) -> None:
        """Until ``n`` reserves have started."""
        if self.calls < n:
            await self._waiting.setdefault(n, asyncio.Event()).wait()

    def hold_next(self) -> asyncio.Event:
        self._held = asyncio.Event()
        return self._held

    def fail_next(self) -> None:
        self._fail = True

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        self.calls += 1
        if (reached := self._waiting.pop(self.calls, None)) is not None:
            reached.set()
        held, self._held = self._held, None
        if self._fail:
            self._fail = False
            raise StoreError("injected")
        got = await self.inner.reserve(req)  # counted in the store now
        if held is not None:
            await held.wait()  # ... and answered only once let go
        return got


def gated(store: QuotaStore, **kw: int) -> tuple[Gate, ReserveAhead]:
    gate = Gate(store)
    return gate, ReserveAhead(gate, **kw)


def at_once(coro: Coroutine[Any, Any, Reservation | NoCapacity]) -> Reservation | NoCapacity:
    """The coroutine's answer if it returns without waiting on anything (else it fails)."""
    with pytest.raises(StopIteration) as returned:
        coro.send(None)
    value: Reservation | NoCapacity = returned.value.value
    return value


async def used(store: QuotaStore, keys: tuple[KeySpec, ...] = KEYS, **kw: Any) -> dict[str, int]:
    return {name: u.used for name, u in (await usage(store, keys, **kw)).items()}


async def test_one_reservation_is_held_ahead_and_given_back_at_the_end(store: QuotaStore) -> None:
    gate, ahead = gated(store)
    req = request(KEYS)
    served = [await ahead.reserve(req) for _ in range(10)]
    await ahead.settled()
    assert all(isinstance(r, Reservation) for r in served)
    assert gate.calls == 11  # one per call, and the one held for the next
    assert sum(ahead.held().values()) == 1
    assert sum((await used(store)).values()) == 11
    await ahead.release_all()
    assert sum((await used(store)).values()) == 10  # exactly the calls served
    assert not ahead.held()
    late = await ahead.reserve(req)  # a request still running after the stop
    await ahead.settled()
    assert isinstance(late, Reservation)
    assert not ahead.held()  # nothing held once released: nothing left behind
    assert sum((await used(store)).values()) == 11


async def test_a_held_reservation_is_served_without_waiting_on_the_store(
    store: QuotaStore,
) -> None:
    gate, ahead = gated(store)
    req = request(KEYS)
    first = await ahead.reserve(req)
    await ahead.settled()
    let_go = gate.hold_next()  # the store now takes its time with the next reservation
    second = at_once(ahead.reserve(req))
    assert isinstance(first, Reservation)
    assert isinstance(second, Reservation)
    assert second != first
    await gate.until_calls(3)  # the next one is launched, and waits
    let_go.set()
    await ahead.release_all()
    assert sum((await used(store)).values()) == 2


async def test_a_refusal_waits_for_the_reservation_being_made(store: QuotaStore) -> None:
    gate, ahead = gated(store, min_remaining=0)
    keys = (key("a", 2),)
    req = request(keys)
    first = await ahead.reserve(req)
    assert isinstance(first, Reservation)
    let_go = gate.hold_next()  # the reservation ahead, launched on the loop's next turn
    second = asyncio.ensure_future(ahead.reserve(req))
    # The second finds the held one still being made, asks the store itself, is refused (the
    # key's two calls are counted), and takes the one being made instead of a refusal.
    await gate.until_calls(3)
    assert not second.done()
    let_go.set()
    got = await second
    assert isinstance(got, Reservation)
    assert (await used(store, keys)) == {"a": 2}
    refused = await ahead.reserve(req)
    assert isinstance(refused, NoCapacity)
    await ahead.release_all()
    assert (await used(store, keys)) == {"a": 2}


async def test_a_held_reservation_of_another_day_or_too_old_is_given_back(
    store: QuotaStore,
) -> None:
    ahead = ReserveAhead(store, max_age_ms=1000)
    await ahead.reserve(request(KEYS))
    await ahead.settled()
    assert sum((await used(store)).values()) == 2
    tomorrow = await ahead.reserve(request(KEYS, day=NEXT_DAY))
    await ahead.settled()
    assert isinstance(tomorrow, Reservation)
    assert tomorrow.day == NEXT_DAY
    assert sum((await used(store)).values()) == 1  # yesterday's held one given back
    later = await ahead.reserve(request(KEYS, day=NEXT_DAY, now=NOW + 1001))
    await ahead.settled()
    assert isinstance(later, Reservation)
    # the one held at NOW was too old at NOW + 1001: given back, a fresh one made and held
    assert sum((await used(store, day=NEXT_DAY)).values()) == 3
    await ahead.release_all()
    assert sum((await used(store, day=NEXT_DAY)).values()) == 2


async def test_sweep_gives_back_what_no_request_came_for(store: QuotaStore) -> None:
    ahead = ReserveAhead(store, max_age_ms=1000)
    await ahead.reserve(request(KEYS))
    await ahead.settled()
    ahead.sweep(NOW + 1000)
    assert sum(ahead.held().values()) == 1  # not older than max_age yet
    ahead.sweep(NOW + 1001)
    await ahead.settled()
    assert not ahead.held()
    assert sum((await used(store)).values()) == 1


async def test_a_cooled_down_key_gives_its_held_reservation_back(store: QuotaStore) -> None:
    ahead = ReserveAhead(store)
    req = request(KEYS, Strategy.FILL_FIRST)
    first = await ahead.reserve(req)
    await ahead.settled()
    assert isinstance(first, Reservation)
    assert first.key == "a"
    assert ahead.held() == {(PROVIDER, "a"): 1}
    cooldown = Settlement(release=True, cooldown=Cooldown("key", 60_000, 60_000))
    await ahead.settle(first, cooldown, NOW)
    await ahead.settled()
    assert (await used(store)) == {"a": 0, "b": 0}  # the call and the held one, both back
    nxt = await ahead.reserve(req)
    assert isinstance(nxt, Reservation)
    assert nxt.key == "b"
    await ahead.release_all()


async def test_disable_gives_back_and_reset_forgets(store: QuotaStore) -> None:
    ahead = ReserveAhead(store)
    req = request(KEYS, Strategy.FILL_FIRST)
    await ahead.reserve(req)
    await ahead.settled()
    await ahead.disable(PROVIDER, "a", "fp1", "401")
    await ahead.settled()
    assert not ahead.held()
    assert (await used(store))["a"] == 1  # the call made; the held one given back
    await ahead.enable(PROVIDER, "a")
    await ahead.reserve(req)
    await ahead.settled()
    assert (await used(store))["a"] == 3
    await ahead.reset_key(PROVIDER, "a", DAY)
    await ahead.settled()
    assert not ahead.held()
    assert (await used(store))["a"] == 0  # forgotten with the reset, never given back below 0
    await ahead.release_all()
    assert (await used(store))["a"] == 0


async def test_nothing_is_held_near_the_end_or_for_a_client_with_a_limit(
    store: QuotaStore,
) -> None:
    ahead = ReserveAhead(store)  # holds only while 100 calls remain
    few = (key("a", 100),)
    await ahead.reserve(request(few))
    await ahead.settled()
    assert not ahead.held()
    limited = ClientQuota("alice", daily_limit=1000, fair_share=None)
    req = ReserveRequest(PROVIDER, "m", KEYS, Strategy.MOST_REMAINING, DAY, NOW, NOW + 1, limited)
    await ahead.reserve(req)
    await ahead.settled()
    assert not ahead.held()
    unlimited = ClientQuota("bob", daily_limit=None, fair_share=None)
    req = ReserveRequest(PROVIDER, "m", KEYS, Strategy.MOST_REMAINING, DAY, NOW, NOW + 1, unlimited)
    await ahead.reserve(req)
    await ahead.settled()
    assert sum(ahead.held().values()) == 1
    await ahead.release_all()


async def test_a_failed_reservation_ahead_is_not_the_next_request_s_error(
    store: QuotaStore,
) -> None:
    gate, ahead = gated(store)
    req = request(KEYS)
    gate.fail_next()  # the first call's own reserve; the held one is made
    with pytest.raises(StoreError):
        await ahead.reserve(req)
    first = await ahead.reserve(req)
    gate.fail_next()  # ... the one made ahead after it fails
    await ahead.settled()
    second = await ahead.reserve(req)  # asks the store itself
    await ahead.settled()
    assert isinstance(first, Reservation)
    assert isinstance(second, Reservation)
    await ahead.release_all()
    assert sum((await used(store)).values()) == 2


async def after_queued_callbacks() -> None:
    """Return once every callback already queued on the loop has run."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


async def test_a_slot_not_yet_launched_at_the_stop_is_never_made(store: QuotaStore) -> None:
    gate, ahead = gated(store)
    first = await ahead.reserve(request(KEYS))  # its successor's launch is queued, not run
    assert isinstance(first, Reservation)
    await ahead.release_all()
    await after_queued_callbacks()  # the queued launch has had its turn
    await ahead.settled()
    assert gate.calls == 1  # nothing reserved at the stop only to be given back
    assert sum((await used(store)).values()) == 1


async def test_release_all_waits_for_a_reservation_being_made(store: QuotaStore) -> None:
    gate, ahead = gated(store)
    await ahead.reserve(request(KEYS))
    let_go = gate.hold_next()
    await gate.until_calls(2)
    closing = asyncio.ensure_future(ahead.release_all())
    await asyncio.wait((closing,), timeout=0)
    assert not closing.done()
    let_go.set()
    await closing
    assert sum((await used(store)).values()) == 1


# -- the gateway, on Redis ----------------------------------------------------------------


async def test_the_gateway_counts_every_call_once_with_one_round_trip_each(
    redis_server: RedisServer,
) -> None:
    clock = WallClock()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    async with Simulator(sim_config(1000, None), clock=clock.seconds) as sim:
        config = gateway_config(
            sim.modelscope_url,
            sim.bailian_url,
            tokens=[(n, s, 1000) for n, s in TOKENS],
            model_daily_limit=1000,  # as the simulator's: its headers then never look lower
            store_url=redis_server.url,
            prefix=prefix,
        )
        settings = Settings.model_validate(config)
        store = RedisStore(redis_server.url, prefix=prefix)
        admin = Redis.from_url(redis_server.url, decode_responses=True)
        app = create_app(settings, clock=clock, store=store, fetch_catalog=False)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        try:
            async with running(app) as url, aiohttp.ClientSession() as http:

                async def ask() -> None:
                    async with http.post(
                        f"{url}/v1/chat/completions", json=body, headers=auth
                    ) as response:
                        assert response.status == 200, await response.text()

                await ask()  # warm: the script loaded, the first reservation held
                ahead = app[LIVE].runtime.ahead
                assert ahead is not None
                await ahead.settled()
                before = await _eval_calls(admin)
                for _ in range(20):
                    await ask()
                    await ahead.settled()
                assert await _eval_calls(admin) - before == 20  # one round trip per request
                counted = await _used_on(store, settings, clock)
                assert sum(counted.values()) == 22  # 21 served and one held for the next
            # stopped: the held reservation was given back
            counted = await _used_on(store, settings, clock)
            served = sim.state.stats("modelscope")["by_token"]
            assert counted == {n: t["used"] for n, t in served.items()}  # type: ignore[attr-defined]
            assert sum(counted.values()) == 21
        finally:
            await admin.aclose()
            await store.aclose()


async def _used_on(store: QuotaStore, settings: Settings, clock: WallClock) -> dict[str, int]:
    provider = settings.providers[0]
    now = clock()
    day = quota_day(now, settings.quota.tz, settings.quota.reset_time)
    specs = KeyPool(settings).default_specs(provider)
    return {u.key: u.used for u in await store.snapshot(provider.name, specs, day, to_ms(now))}
