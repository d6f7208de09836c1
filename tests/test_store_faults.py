"""Redis faults under load: killed, hung, restarted; fail_closed, fail_open, AOF, day rollover.

Every test runs against this module's own redis-server (it gets killed), with AOF on so a
restart keeps what was written. Waits are bounded polls of a condition, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from router.app import STORE, create_app
from router.config import Settings, StoreSettings
from router.demo import running
from router.quota import keys as k
from router.quota.redis_store import SOCKET_TIMEOUT_S, DayDeltas, RedisStore
from router.quota.resilient_store import LocalReservation, ResilientStore
from router.quota.store import StoreError
from router.quota.types import (
    KeySpec,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from router.simulator import Simulator
from router.simulator.state import ProviderState
from router.simulator.state import quota_day as sim_quota_day
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, FakeClock, free_port, gateway_config
from tests.test_gateway import TOKENS, config_for, sim_config
from tests.test_store import _RoundTrips

MODEL = "Qwen/Qwen3-32B"
DEADLINE_S = 8.0  # no request may take longer, whatever Redis does
POLL_S = 0.02


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """This module's private redis-server (AOF on): the tests kill and restart it."""
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def redis_server(module_redis: RedisServer) -> Iterator[RedisServer]:
    """The module's server, running at the start and at the end of every test."""
    module_redis.resume()
    if not module_redis.running:
        module_redis.start()
    yield module_redis
    module_redis.resume()
    if not module_redis.running:
        module_redis.start()


def prefix() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


async def poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait (bounded) until ``condition()`` holds; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


@asynccontextmanager
async def serving(
    config: dict[str, Any], clock: Callable[[], datetime] | None = None
) -> AsyncIterator[tuple[str, web.Application]]:
    """The gateway in this process: (base URL, app), so a test can reach app[STORE]."""
    settings = Settings.model_validate(config)
    kwargs: dict[str, Any] = {"registry": CollectorRegistry()}
    if clock is not None:
        kwargs["clock"] = clock
    app = create_app(settings, **kwargs)
    async with running(app) as url:
        yield url, app


@dataclass(frozen=True)
class Result:
    started: float  # time.monotonic() when sent
    elapsed: float
    status: int  # -1: no answer within DEADLINE_S; -2: connection error
    code: str | None  # the error code of a refusal
    retry_after: str | None
    key: str | None  # x-router-key of a 200


class Load:
    """Workers calling the gateways in turn, back to back, until the block ends."""

    def __init__(self, urls: list[str], workers: int) -> None:
        self.urls = urls
        self.workers = workers
        self.results: list[Result] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0

    async def __aenter__(self) -> Load:
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._http.close()

    async def _worker(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
        while not self._stop.is_set():
            url = self.urls[self._sent % len(self.urls)] + "/v1/chat/completions"
            self._sent += 1
            started = time.monotonic()
            try:
                async with self._http.post(
                    url, json=body, headers=headers, timeout=timeout
                ) as response:
                    payload = await response.json(content_type=None)
                    code = None
                    if response.status != 200:
                        code = payload["error"]["code"]
                    self.results.append(
                        Result(
                            started,
                            time.monotonic() - started,
                            response.status,
                            code,
                            response.headers.get("Retry-After"),
                            response.headers.get("x-router-key"),
                        )
                    )
            except TimeoutError:
                self.results.append(Result(started, DEADLINE_S, -1, None, None, None))
            except aiohttp.ClientError as exc:
                self.results.append(Result(started, 0.0, -2, repr(exc), None, None))

    def since(self, started: float) -> list[Result]:
        return [r for r in self.results if r.started >= started]

    def count(self, status: int, started: float = 0.0) -> int:
        return sum(1 for r in self.since(started) if r.status == status)


async def get_status(url: str) -> tuple[int, dict[str, Any], str | None]:
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(url) as response,
    ):
        return response.status, await response.json(), response.headers.get("Retry-After")


async def chat(urls: list[str], n: int) -> list[Result]:
    """``n`` chat calls at once, spread over ``urls``."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        timeout = aiohttp.ClientTimeout(total=DEADLINE_S)

        async def one(i: int) -> Result:
            started = time.monotonic()
            url = urls[i % len(urls)] + "/v1/chat/completions"
            async with http.post(url, json=body, headers=headers, timeout=timeout) as response:
                payload = await response.json(content_type=None)
                return Result(
                    started,
                    time.monotonic() - started,
                    response.status,
                    None if response.status == 200 else payload["error"]["code"],
                    response.headers.get("Retry-After"),
                    response.headers.get("x-router-key"),
                )

        return await asyncio.gather(*(one(i) for i in range(n)))


def key_specs(limit: int | None, model_limit: int | None = 100_000) -> tuple[KeySpec, ...]:
    return tuple(KeySpec(name, "", limit, model_limit) for name, _ in TOKENS)


async def used_in_redis(
    server: RedisServer, prefix: str, provider: str, day: str, limit: int | None
) -> dict[str, tuple[int, dict[str, int]]]:
    """key -> (used, {model: used}) in Redis, read by a fresh client."""
    store = RedisStore(server.url, prefix=prefix)
    try:
        specs = (
            key_specs(limit) if provider == "modelscope" else (KeySpec("main", "", limit, None),)
        )
        usages = await store.snapshot(provider, specs, day, int(time.time() * 1000))
    finally:
        await store.aclose()
    return {u.key: (u.used, {m.model: m.used for m in u.models}) for u in usages}


def sim_used(sim: Simulator) -> dict[str, tuple[int, dict[str, int]]]:
    by_token = sim.state.stats("modelscope")["by_token"]
    return {name: (u["used"], u["models"]) for name, u in by_token.items()}


def quota_day_of(moment: datetime) -> str:
    return sim_quota_day(moment.timestamp()).strftime("%Y%m%d")


# -- fail_closed ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_fail_closed_answers_503_while_redis_is_killed_and_recovers_by_itself(
    redis_server: RedisServer,
) -> None:
    async with Simulator(sim_config(10_000, None)) as sim:
        config = config_for(sim, limit=10_000, store_url=redis_server.url, prefix=prefix())
        async with serving(config) as (url, _), Load([url], workers=8) as load:
            await poll(lambda: load.count(200) >= 30, 10, "traffic before the kill")
            kill_sent = time.monotonic()
            await asyncio.to_thread(redis_server.kill)
            dead = time.monotonic()
            to_first_503 = await poll(lambda: load.count(503, kill_sent) >= 1, 5, "a 503")
            killed = kill_sent
            await poll(lambda: load.count(503, killed) >= 50, 5, "503s while Redis is away")
            ready, body, retry_after = await get_status(url + "/readyz")
            assert (ready, body["error"]["code"], retry_after) == (503, "store_unavailable", "5")
            restarted = time.monotonic()
            await asyncio.to_thread(redis_server.start)
            up = time.monotonic()
            to_first_200 = await poll(lambda: load.count(200, restarted) >= 1, 10, "a 200")
            await poll(lambda: load.count(200, restarted) >= 30, 10, "traffic after restart")
            assert (await get_status(url + "/readyz"))[0] == 200
    results = load.results
    statuses = Counter(r.status for r in results)
    assert set(statuses) <= {200, 503}, statuses  # never a 500, a hang or a dropped connection
    refusals = [r for r in results if r.status == 503]
    assert {r.code for r in refusals} == {"store_unavailable"}
    assert {r.retry_after for r in refusals} == {"5"}
    slowest_503 = max(r.elapsed for r in refusals)
    assert slowest_503 < SOCKET_TIMEOUT_S  # a killed Redis refuses at once: no timeout waited
    # Between the kill and the restart nothing is served that Redis did not count first.
    outage = [r for r in results if dead <= r.started < restarted]
    assert outage
    assert all(r.status == 503 for r in outage)
    print(
        f"\nfail_closed kill: {dict(statuses)}; first 503 {to_first_503 * 1000:.0f} ms after "
        f"the kill, slowest 503 {slowest_503 * 1000:.1f} ms, {len(outage)} requests while "
        f"down all 503; first 200 {to_first_200 * 1000:.0f} ms after the restart began "
        f"(redis-server answered PING after {(up - restarted) * 1000:.0f} ms)"
    )


async def test_readyz_is_503_while_redis_answers_ping_but_refuses_every_reservation(
    redis_server: RedisServer,
) -> None:
    """A Redis turned into a replica (of a master that is not there) answers PING and refuses
    every write with READONLY: /readyz says what requests see, and recovers with them."""
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    async with Simulator(sim_config(10_000, None)) as sim:
        config = config_for(sim, limit=10_000, store_url=redis_server.url, prefix=prefix())
        try:
            async with serving(config) as (url, _):
                assert (await get_status(url + "/readyz"))[0] == 200
                await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
                assert await admin.ping()
                request = await chat([url], 1)
                assert (request[0].status, request[0].code) == (503, "store_unavailable")
                status, body, _ = await get_status(url + "/readyz")
                assert (status, body["error"]["code"]) == (503, "store_unavailable")
                await admin.execute_command("REPLICAOF", "NO", "ONE")
                assert (await get_status(url + "/readyz"))[0] == 200
                assert (await chat([url], 1))[0].status == 200
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await admin.aclose()


@pytest.mark.slow
async def test_fail_closed_bounds_a_hung_redis_by_the_socket_timeout(
    redis_server: RedisServer,
) -> None:
    async with Simulator(sim_config(10_000, None)) as sim:
        config = config_for(sim, limit=10_000, store_url=redis_server.url, prefix=prefix())
        async with serving(config) as (url, _), Load([url], workers=4) as load:
            await poll(lambda: load.count(200) >= 20, 10, "traffic before the hang")
            hung = time.monotonic()
            redis_server.pause()
            try:
                to_first_503, (ready, _, _) = await asyncio.gather(
                    poll(lambda: load.count(503) >= 1, DEADLINE_S, "a 503 while hung"),
                    get_status(url + "/readyz"),
                )
                assert ready == 503
                await poll(lambda: load.count(503) >= 8, DEADLINE_S, "503s while hung")
            finally:
                redis_server.resume()
            resumed = time.monotonic()
            to_first_200 = await poll(lambda: load.count(200, resumed) >= 1, 10, "a 200")
            await poll(lambda: load.count(200, resumed) >= 20, 10, "traffic after the hang")
    statuses = Counter(r.status for r in load.results)
    assert set(statuses) <= {200, 503}, statuses
    refusals = [r for r in load.results if r.status == 503]
    assert {r.code for r in refusals} == {"store_unavailable"}
    slowest = max(r.elapsed for r in load.results)
    # RedisStore's socket timeout is 2 s: a reply that never comes fails the reserve then
    # (a request waiting for a pooled connection may wait up to one more timeout).
    assert 1.5 < max(r.elapsed for r in refusals) < 2 * 2.0 + 0.5
    print(
        f"\nfail_closed hang: {dict(statuses)}; first 503 {to_first_503:.2f} s after SIGSTOP, "
        f"503s took {min(r.elapsed for r in refusals):.2f}-{max(r.elapsed for r in refusals):.2f}"
        f" s, hung for {resumed - hung:.2f} s, first 200 {to_first_200 * 1000:.0f} ms after "
        f"SIGCONT; slowest answer {slowest:.2f} s"
    )


# -- fail_open --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_fail_open_serves_the_last_known_remaining_and_writes_it_back(
    redis_server: RedisServer,
) -> None:
    limit = 40
    pfx = prefix()
    async with Simulator(sim_config(limit, None)) as sim:
        config = gateway_config(
            sim.modelscope_url,
            sim.bailian_url,
            tokens=[(n, s, limit) for n, s in TOKENS],
            bailian=None,
            model_daily_limit=limit,  # as upstream counts it: its headers agree with ours
            store_url=redis_server.url,
            prefix=pfx,
        )
        config["store"]["on_error"] = "fail_open"
        async with serving(config) as (url, app):
            store = app[STORE]
            assert isinstance(store, ResilientStore)
            await poll(lambda: store.live_gateways == 1, 10, "the first heartbeat")
            before = await chat([url], 30)
            assert Counter(r.status for r in before) == {200: 30}
            day = quota_day_of(datetime.now(UTC))
            in_redis = await used_in_redis(redis_server, pfx, "modelscope", day, limit)
            left = {name: limit - used for name, (used, _) in in_redis.items()}

            redis_server.kill()
            during = await chat([url], 150)
            assert store.degraded
            statuses = Counter(r.status for r in during)
            served = Counter(r.key for r in during if r.status == 200)
            # One live gateway: the allowance is exactly what was left at the kill.
            assert served == left, (served, left)
            assert statuses == {200: sum(left.values()), 429: 150 - sum(left.values())}
            refused = [r for r in during if r.status == 429]
            assert {r.code for r in refused} == {"rate_limited"}  # try again soon, not at reset
            assert {r.retry_after for r in refused} == {"5"}
            unsynced = Counter[str]()
            for entry in store.unsynced():
                unsynced.update(entry.deltas)
            assert unsynced[k.client_used_field("team")] == sum(left.values())

            restarted = time.monotonic()
            await asyncio.to_thread(redis_server.start)
            back_in = await poll(lambda: not store.degraded, 10, "the write-back")
            after = await chat([url], 5)  # Redis now knows the pool is spent
            assert {(r.status, r.code) for r in after} == {(429, "pool_exhausted")}

    in_redis = await used_in_redis(redis_server, pfx, "modelscope", day, limit)
    assert in_redis == sim_used(sim)  # keys and (key, model): exactly what upstream counted
    assert all(used <= limit for used, _ in in_redis.values())
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        clients = await admin.hgetall(k.clients_key(pfx, day))
    finally:
        await admin.aclose()
    assert clients[k.client_used_field("team")] == str(30 + sum(left.values()))
    print(
        f"\nfail_open: before the kill {len(before)} x 200; during {dict(statuses)} "
        f"(allowance {left}); written back {back_in * 1000:.0f} ms after the restart "
        f"({time.monotonic() - restarted:.2f} s with the checks)"
    )


def _request(keys: tuple[KeySpec, ...], day: str, model: str = MODEL) -> ReserveRequest:
    now = int(time.time() * 1000)
    return ReserveRequest(
        "modelscope", model, keys, Strategy.MOST_REMAINING, day, now, now + 3_600_000
    )


async def _drain(store: ResilientStore, req: ReserveRequest) -> Counter[str]:
    """Reserve until the store refuses; the calls per key."""
    served: Counter[str] = Counter()
    for _ in range(1000):
        outcome = await store.reserve(req)
        if isinstance(outcome, NoCapacity):
            return served
        served[outcome.key] += 1
    raise AssertionError("the allowance never ran out")


async def test_fail_open_allowance_divides_by_live_gateways_and_unknown_keys_get_none(
    redis_server: RedisServer,
) -> None:
    pfx = prefix()
    day = "20991230"
    store = ResilientStore(RedisStore(redis_server.url, prefix=pfx), probe_s=0.05)
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        seconds, micros = await admin.time()
        await admin.hset(k.replicas_key(pfx), "other-replica", seconds * 1000 + micros // 1000)
        await admin.hset(k.replicas_key(pfx), "long-gone", seconds * 1000 - 3_600_000 * 2)
        assert await store.heartbeat() == 2  # this one and "other-replica"
        assert await admin.hexists(k.replicas_key(pfx), "long-gone") is False
        seen = (KeySpec("a", "fp", 21, 100), KeySpec("b", "fp", 100, 11))
        unseen = KeySpec("c", "fp", 100, 100)
        for _ in range(2):
            for spec in seen:
                res = await store.reserve(_request((spec,), day))
                assert isinstance(res, Reservation)
                assert not isinstance(res, LocalReservation)
        # a: 21 - 2 = 19 left -> 9 each; b: model 11 - 2 = 9 left -> 4 each; c: never seen
        released = await store.reserve(_request((seen[0],), day))  # a: 18 left
        assert isinstance(released, Reservation)
        redis_server.kill()
        assert await _drain(store, _request(seen[:1], day)) == {"a": 9}
        assert store.degraded
        # A call counted in Redis, given back during the outage: written back as -1.
        await store.settle(released, Settlement(release=True), int(time.time() * 1000))
        assert await _drain(store, _request(seen[1:], day)) == {"b": 4}
        assert await _drain(store, _request((unseen,), day)) == {}
        # A quota day that began during the outage starts from the full limit per gateway.
        assert await _drain(store, _request((unseen,), "20991231")) == {"c": 50}
        redis_server.start()
        await poll(lambda: not store.degraded, 10, "the write-back")
        snap = await store.snapshot("modelscope", (*seen, unseen), day, 0)
        # 2 + 1 reserved in Redis, 1 of them given back during the outage, 9 local
        assert [u.used for u in snap] == [2 + 1 - 1 + 9, 2 + 4, 0]
        next_day = await store.snapshot("modelscope", (unseen,), "20991231", 0)
        assert next_day[0].used == 50
    finally:
        await admin.aclose()
        await store.aclose()


async def test_fail_open_settles_a_local_call_on_redis_after_the_write_back(
    redis_server: RedisServer,
) -> None:
    pfx = prefix()
    day = "20991230"
    store = ResilientStore(RedisStore(redis_server.url, prefix=pfx), probe_s=0.05)
    try:
        await store.heartbeat()
        spec = KeySpec("a", "fp", 10, 10)
        await store.reserve(_request((spec,), day))
        redis_server.kill()
        local = await store.reserve(_request((spec,), day))
        assert isinstance(local, LocalReservation)
        redis_server.start()
        await poll(lambda: not store.degraded, 10, "the write-back")
        assert (await store.snapshot("modelscope", (spec,), day, 0))[0].used == 2
        await store.settle(local, Settlement(release=True), int(time.time() * 1000))
        assert (await store.snapshot("modelscope", (spec,), day, 0))[0].used == 1
    finally:
        await store.aclose()


async def test_fail_open_steady_state_is_one_round_trip_per_reserve_and_settle(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResilientStore(RedisStore(redis_server.url, prefix=prefix()))
    try:
        keys = key_specs(1000)
        for _ in range(2):  # load the scripts (NOSCRIPT) and open a connection first
            res = await store.reserve(_request(keys, "20991230"))
            await store.settle(res, Settlement(release=True), int(time.time() * 1000))
        trips = _RoundTrips(monkeypatch)
        for _ in range(10):
            res = await store.reserve(_request(keys, "20991230"))
        assert trips.take() == 10
        await store.settle(res, Settlement(remaining=3), int(time.time() * 1000))
        assert trips.take() == 1
    finally:
        await store.aclose()


async def test_fail_open_heartbeat_learns_what_other_replicas_spent(
    redis_server: RedisServer,
) -> None:
    pfx = prefix()
    day = "20991230"
    store = ResilientStore(RedisStore(redis_server.url, prefix=pfx), probe_s=0.05)
    other = RedisStore(redis_server.url, prefix=pfx)  # another replica, fail_closed
    try:
        spec = KeySpec("a", "fp", 100, 50)
        await store.reserve(_request((spec,), day))  # known: 99 left, model 49
        for _ in range(30):
            await other.reserve(_request((spec,), day))
        assert await store.heartbeat() == 1  # `other` sends no heartbeat: it is not counted
        redis_server.kill()
        # Redis counts 31: the key has 69 left, the model 19: the model bounds it.
        assert await _drain(store, _request((spec,), day)) == {"a": 19}
    finally:
        await other.aclose()
        await store.aclose()


async def test_fail_open_second_outage_starts_from_what_the_first_left(
    redis_server: RedisServer,
) -> None:
    pfx = prefix()
    day = "20991230"
    store = ResilientStore(RedisStore(redis_server.url, prefix=pfx), probe_s=0.05)
    try:
        await store.heartbeat()
        spec = KeySpec("a", "fp", 10, 10)
        await store.reserve(_request((spec,), day))  # 9 left
        for outage, allowance in ((1, 9), (2, 0)):
            redis_server.kill()
            assert await _drain(store, _request((spec,), day)) == (
                {"a": allowance} if allowance else {}
            ), outage
            redis_server.start()
            await poll(lambda: not store.degraded, 10, "the write-back")
        assert (await store.snapshot("modelscope", (spec,), day, 0))[0].used == 10
    finally:
        await store.aclose()


async def test_write_back_applies_a_batch_once(redis_server: RedisServer) -> None:
    pfx = prefix()
    store = RedisStore(redis_server.url, prefix=pfx)
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    batch = [
        DayDeltas("modelscope", "20991230", {"u|a": 3, "m|a|x": 3, "u|b": -1}),
        DayDeltas(None, "20991230", {"t|team": 3}),
    ]
    try:
        assert await store.write_back("token-1", batch) is True
        assert await store.write_back("token-1", batch) is False  # a retry after a lost reply
        day_map = k.day_key(pfx, "modelscope", "20991230")
        assert await admin.hgetall(day_map) == {"u|a": "3", "m|a|x": "3", "u|b": "0"}
        assert await admin.hgetall(k.clients_key(pfx, "20991230")) == {"t|team": "3"}
        ttl = await admin.pttl(day_map)
        # two days from the write-back, by no clock but Redis's own count of time passing
        assert 2 * 86_400_000 - 60_000 < ttl <= 2 * 86_400_000
    finally:
        await admin.aclose()
        await store.aclose()


async def test_fail_open_is_opened_by_the_config_and_fail_closed_is_the_default() -> None:
    from router.quota.factory import open_store

    closed = open_store("redis://127.0.0.1:1/0")
    opened = open_store("redis://127.0.0.1:1/0", on_error="fail_open")
    try:
        assert isinstance(closed, RedisStore)
        assert isinstance(opened, ResilientStore)
        assert StoreSettings().on_error == "fail_closed"
        with pytest.raises(StoreError):
            await opened.ping()  # readiness tells the truth while the local allowance serves
    finally:
        await closed.aclose()
        await opened.aclose()


# -- AOF --------------------------------------------------------------------------------------


async def test_aof_keeps_every_count_across_a_sigkill(redis_server: RedisServer) -> None:
    assert redis_server.appendonly
    pfx = prefix()
    limit = 1000
    async with Simulator(sim_config(limit, None)) as sim:
        config = config_for(
            sim, limit=limit, model_daily_limit=limit, store_url=redis_server.url, prefix=pfx
        )
        async with serving(config) as (url, _):
            results = await chat([url], 120)
        assert Counter(r.status for r in results) == {200: 120}
        day = quota_day_of(datetime.now(UTC))
        redis_server.kill()
        redis_server.start()
        assert await used_in_redis(redis_server, pfx, "modelscope", day, limit) == sim_used(sim)
        assert sum(used for used, _ in sim_used(sim).values()) == 120


# -- day rollover -----------------------------------------------------------------------------


def _next_shanghai_midnight() -> datetime:
    """The next 16:00 UTC (00:00 Asia/Shanghai) after now, so Redis expiries stay ahead."""
    now = datetime.now(UTC)
    boundary = now.replace(hour=16, minute=0, second=0, microsecond=0)
    return boundary if boundary > now else boundary + timedelta(days=1)


def _count_by_day(
    monkeypatch: pytest.MonkeyPatch, sim: Simulator, on_record: Callable[[int], None]
) -> Counter[tuple[str, str, str]]:
    """(provider, quota day, key) -> calls the simulator accepted, by its own clock.

    ``on_record`` gets the running total after each call.
    """
    counted: Counter[tuple[str, str, str]] = Counter()

    def tap(state: ProviderState) -> None:
        original = state.record

        def record(name: str, model: str) -> None:
            day = sim_quota_day(sim.state.now()).strftime("%Y%m%d")
            counted[(state.provider, day, name)] += 1
            original(name, model)
            on_record(sum(counted.values()))

        monkeypatch.setattr(state, "record", record)

    tap(sim.state.modelscope)
    tap(sim.state.bailian)
    return counted


@pytest.mark.slow
async def test_three_gateways_cross_midnight_under_load_without_overspending(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit, bailian_limit = 20, 10
    pool = 3 * limit + bailian_limit
    midnight = _next_shanghai_midnight()
    clock = FakeClock(midnight - timedelta(seconds=2))
    before_day, after_day = quota_day_of(clock.now), quota_day_of(midnight)
    assert before_day != after_day
    pfx = prefix()
    crossed: list[float] = []

    def cross_midnight(total: int) -> None:
        if total == pool // 2:  # half of the day's pool accepted upstream; others in flight
            crossed.append(time.monotonic())
            clock.advance(seconds=4)  # 00:00:02 in Shanghai

    async with Simulator(sim_config(limit, bailian_limit), clock=clock.seconds) as sim:
        counted = _count_by_day(monkeypatch, sim, cross_midnight)
        config = config_for(
            sim, limit=limit, bailian_limit=bailian_limit, store_url=redis_server.url, prefix=pfx
        )
        async with (
            serving(config, clock) as (url_a, _),
            serving(config, clock) as (url_b, _),
            serving(config, clock) as (url_c, _),
            Load([url_a, url_b, url_c], workers=12) as load,
        ):
            await poll(lambda: bool(crossed), 10, "half the pool before midnight")
            await poll(lambda: load.count(429) >= 30, 15, "the new day's pool spent")
    statuses = Counter((r.status, r.code) for r in load.results)
    assert set(statuses) <= {(200, None), (429, "pool_exhausted")}, statuses
    assert all(r.started >= crossed[0] for r in load.results if r.status == 429)
    ok = statuses[(200, None)]
    assert ok == sum(counted.values())  # every 200 is one call the upstream accepted
    for day in (before_day, after_day):
        ms = await used_in_redis(redis_server, pfx, "modelscope", day, limit)
        bl = await used_in_redis(redis_server, pfx, "bailian", day, bailian_limit)
        assert all(used <= limit for used, _ in ms.values()), (day, ms)
        assert all(used <= bailian_limit for used, _ in bl.values()), (day, bl)
        for name, _ in TOKENS:
            assert counted[("modelscope", day, name)] <= limit
        assert counted[("bailian", day, "main")] <= bailian_limit
    # The new day's pool was spent to the last call, by the simulator's count too.
    assert sum(n for (_, day, _), n in counted.items() if day == after_day) == pool
    served_before = sum(n for (_, day, _), n in counted.items() if day == before_day)
    assert served_before == pool // 2  # the simulator's clock crossed right after that call
    print(
        f"\nrollover: {dict(Counter(r.status for r in load.results))}; "
        f"{before_day}: {served_before} calls, {after_day}: {pool} calls; "
        f"by day and key: {dict(counted)}"
    )
