"""Redis through redis-py on every topology the store URL names: one server, a Cluster, Sentinel.

Against real servers started from Debian's packages (tests/redis_server.py): the session's
Cluster (3 masters, 1 replica each) and Sentinel service (a master, a replica, 3 sentinels)
from tests/conftest.py, and private one-server deployments for kills, hangs, passwords, a
unix socket and TLS. The behaviour suite (tests/test_store.py) runs on all three topologies;
this module has what is particular to each: the URL forms, a Cluster seed that does not own
the deployment's slot, failovers under load, and the one-server faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection

from router.config import StoreSettings
from router.quota import keys as k
from router.quota.factory import open_store
from router.quota.redis_store import (
    CALL_TIMEOUTS,
    SOCKET_TIMEOUT_S,
    DayDeltas,
    RedisStore,
    connect,
)
from router.quota.resilient_store import ResilientStore
from router.quota.store import StoreError, probe_reservation
from router.quota.types import (
    ClientQuota,
    FairShare,
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from router.quota.urls import (
    REDIS_SCHEMES,
    STORE_SCHEMES,
    RedisUrl,
    mask_url,
    parse_redis_url,
    store_url_problem,
)
from router.simulator import Simulator
from tests.conftest import TOKENS, sim_config
from tests.redis_server import LocalCluster, LocalSentinel, RedisServer, RedisTls
from tests.test_gateway import config_for
from tests.test_store import _RoundTrips
from tests.test_store_faults import (
    DEADLINE_S,
    Load,
    chat,
    get_status,
    poll,
    quota_day_of,
    serving,
    sim_used,
)

PROVIDER = "modelscope"
MODEL = "Qwen/Qwen3-235B-A22B:free"
DAY = "20991230"
NOW = int(time.time() * 1000)  # Redis expires by its own clock: stay near the real time
DAY_END = NOW + 10 * 3_600_000
FAIR = FairShare(0.3, (("alice", 1.0), ("bob", 2.5), ("ç客", 0.1)), 600_000)
LIMIT = 100_000  # per key: the failover tests never run out


def prefix() -> str:
    return f"topo-{uuid.uuid4().hex[:12]}"


def request(
    keys: tuple[KeySpec, ...],
    client: ClientQuota | None = None,
    *,
    day: str = DAY,
    now: int = NOW,
) -> ReserveRequest:
    return ReserveRequest(PROVIDER, MODEL, keys, Strategy.MOST_REMAINING, day, now, DAY_END, client)


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's Cluster, whole again after the test (a killed node restarted, rejoined)."""
    yield redis_cluster
    for node in redis_cluster.nodes:
        redis_cluster.restart(node)
    redis_cluster.wait_healthy()


@pytest.fixture
def sentinel(redis_sentinel: LocalSentinel) -> Iterator[LocalSentinel]:
    """The session's Sentinel service, whole again after the test (a killed node back as a
    replica of whichever master the sentinels name)."""
    yield redis_sentinel
    for node in redis_sentinel.nodes:
        redis_sentinel.restart(node)
    redis_sentinel.wait_healthy()


# -- URL forms --------------------------------------------------------------------------------


def test_cluster_urls_read() -> None:
    url = parse_redis_url(
        "REDIS+CLUSTER://router:p%40ss%2Fw@10.0.0.1:7000,redis-b:7001,[::1]:7002,redis-c/"
        "?client_name=gw"
    )
    assert url == RedisUrl(
        topology="cluster",
        tls=False,
        hosts=(("10.0.0.1", 7000), ("redis-b", 7001), ("::1", 7002), ("redis-c", 6379)),
        username="router",
        password="p@ss/w",
        options={"client_name": "gw"},
    )
    tls = parse_redis_url(
        "rediss+cluster://:pw@h:1/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
        "&ssl_check_hostname=no"
    )
    assert (tls.tls, tls.username, tls.password, tls.db) == (True, None, "pw", 0)
    assert tls.options == {
        "ssl_ca_certs": "/ca.pem",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
    }
    # As redis-py reads redis://: ?password= wins over the userinfo.
    assert parse_redis_url("redis+cluster://:a@h:1?password=b").password == "b"
    # The userinfo ends at the last '@': an unencoded '/' or '@' in a password still reads.
    assert parse_redis_url("redis+sentinel://:p/w@d@s:1/svc").password == "p/w@d"


def test_sentinel_urls_read_with_the_userinfo_for_the_data_nodes() -> None:
    url = parse_redis_url(
        "redis+sentinel://app:data-pw@s1:26380,s2,s3:5000/my%20service/3"
        "?sentinel_password=sent-pw&sentinel_username=watcher"
    )
    assert url == RedisUrl(
        topology="sentinel",
        tls=False,
        hosts=(("s1", 26380), ("s2", 26379), ("s3", 5000)),
        username="app",  # the data nodes' (master and replicas) user and password
        password="data-pw",
        service="my service",
        db=3,
        options={"sentinel_password": "sent-pw", "sentinel_username": "watcher"},
    )
    assert parse_redis_url("redis+sentinel://s:1/svc").db == 0
    assert parse_redis_url("redis+sentinel://s:1/svc/?db=2").db == 2
    assert parse_redis_url("rediss+sentinel://s:1/svc").tls


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://", "no host"),
        ("redis+cluster://:CANARY@", "no host"),
        ("redis+cluster://h:0", "port 1-65535"),
        ("redis+cluster://h:65536", "port 1-65535"),
        ("redis+cluster://h:x", "host or port"),
        ("redis+cluster://h:1,,h:2", "host cannot be read"),
        ("redis+cluster://:CANARY#x@h:1", "'#'"),
        ("redis+cluster://h:1/2", "only db 0"),
        ("redis+cluster://h:1?db=0", "unknown query parameter 'db'"),
        ("redis+cluster://h:1?socket_timout=3", "unknown query parameter 'socket_timout'"),
        ("redis+cluster://h:1?Hunter2", "unknown query parameter;"),  # not a name: not quoted
        ("redis+cluster://h:1?ssl_ca_certs=/ca.pem", "rediss+cluster://"),
        ("rediss+cluster://h:1?ssl_check_hostname=maybe", "yes or no"),
        ("rediss+cluster://h:1?ssl_cert_reqs=strict", "none, optional or required"),
        ("redis+sentinel://:CANARY@s:1", "name the Sentinel service"),
        ("redis+sentinel://s:1/", "name the Sentinel service"),
        ("redis+sentinel://s:1/svc/x", "the db is a number"),
        ("redis+sentinel://s:1/svc/1/2", "/service or /service/db"),
        ("redis+sentinel://s:1/svc?sentinel_pasword=CANARY", "unknown query parameter"),
    ],
)
def test_bad_cluster_and_sentinel_urls_are_refused_without_quoting_them(
    url: str, problem: str
) -> None:
    said = store_url_problem(url)
    assert said is not None
    assert problem in said, said
    assert "CANARY" not in said
    assert "Hunter2" not in said
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_redis_url(url)
    with pytest.raises(ValueError, match="quota store URL") as refused:
        open_store(url)
    assert "CANARY" not in str(refused.value)


def test_the_config_accepts_every_redis_topology() -> None:
    for url in (
        "REDIS+CLUSTER://:pw@h1:7000,h2:7001",
        "rediss+cluster://h1:7000?ssl_ca_certs=/ca.pem",
        "Redis+Sentinel://:pw@s1:26379,s2:26379/mymaster/1?sentinel_password=x",
        "rediss+sentinel://s1/mymaster",
    ):
        stored = StoreSettings.model_validate({"url": url}).url
        scheme, rest = url.split("://", 1)
        assert stored == f"{scheme.lower()}://{rest}"
    assert {"redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"} <= set(
        STORE_SCHEMES
    )
    assert set(REDIS_SCHEMES) < set(STORE_SCHEMES)


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("redis+cluster://:CANARY@h1:7000,h2:7001", ":***@h1:7000,h2:7001"),
        ("rediss+cluster://CANARY-user:CANARY@h1:7000/?client_name=x", "***:***@h1:7000/?client"),
        ("redis+cluster://h1:7000?password=CANARY", "h1:7000?password=***"),
        (
            "redis+sentinel://:CANARY@s1:26379,s2:26379/mymaster/0?sentinel_password=CANARY",
            ":***@s1:26379,s2:26379/mymaster/0?sentinel_password=***",
        ),
        (
            "rediss+sentinel://s1/mymaster?sentinel_username=CANARY-u&sentinel_password=CANARY",
            "?sentinel_username=CANARY-u&sentinel_password=***",  # a user name is no secret
        ),
    ],
)
def test_mask_url_hides_the_credentials_of_every_topology(url: str, kept: str) -> None:
    masked = mask_url(url)
    assert "CANARY" not in masked.replace("CANARY-u&", "")
    assert kept in masked
    assert repr(RedisStore(url)).count("CANARY") == masked.count("CANARY")


async def test_each_url_form_makes_the_client_of_its_topology() -> None:
    """Nothing connects before the first command: each client is built and closed here."""
    cluster, none = connect(
        "rediss+cluster://u:pw@127.0.0.1:1,127.0.0.1:2?ssl_ca_certs=/ca.pem&client_name=gw",
        timeout=1.5,
        max_connections=8,
    )
    assert none is None
    assert isinstance(cluster, RedisCluster)
    kwargs = cluster.nodes_manager.connection_kwargs
    assert kwargs["connection_class"] is SSLConnection
    assert (kwargs["ssl_ca_certs"], kwargs["client_name"]) == ("/ca.pem", "gw")
    assert (kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == ("u", "pw", 1.5)
    assert sorted(cluster.nodes_manager.startup_nodes) == ["127.0.0.1:1", "127.0.0.1:2"]
    await cluster.aclose()

    master, sentinel = connect(
        "redis+sentinel://:data-pw@127.0.0.1:1,127.0.0.1:2/svc/4?sentinel_password=s-pw",
        timeout=1.5,
        max_connections=8,
    )
    assert sentinel is not None
    assert isinstance(master, Redis)
    pool = master.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"]) == ("svc", 4)  # type: ignore[attr-defined]
    assert pool.connection_kwargs["password"] == "data-pw"
    watchers = [s.connection_pool.connection_kwargs for s in sentinel.sentinels]
    assert [(w["port"], w["password"]) for w in watchers] == [(1, "s-pw"), (2, "s-pw")]
    await master.aclose()
    for client in sentinel.sentinels:
        await client.aclose()

    one, none = connect("redis://127.0.0.1:1/2", timeout=1.5, max_connections=8)
    assert none is None
    assert isinstance(one, Redis)
    assert one.connection_pool.connection_class is Connection
    await one.aclose()


# -- the scripts: every key they touch is one passed in KEYS (a Cluster requirement) ----------

_CALL = re.compile(r"redis\.call\(\s*'(?P<cmd>[A-Z]+)'\s*(?:,\s*(?P<key>[^,)]+))?")
_FROM_KEYS = re.compile(r"local\s+(?P<names>[\w\s,]+?)\s*=\s*(?P<values>KEYS\[[^\n]*)")
_FUNCTION = re.compile(r"local\s+function\s+(?P<name>\w+)\((?P<params>[^)]*)\)")


def _args(text: str, start: int) -> list[str]:
    """The arguments of the call whose '(' is at ``start`` (top-level commas only)."""
    depth, current, args = 0, "", []
    for char in text[start + 1 :]:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return [*args, current.strip()]
            depth -= 1
        if char == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += char
    raise AssertionError("unbalanced call")


def _undeclared_keys(source: str) -> list[str]:
    """Key arguments of redis.call that do not come from KEYS, directly, through a local
    assigned from KEYS, or through a helper's parameter that every caller fills so."""
    code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())
    from_keys: set[str] = set()
    for match in _FROM_KEYS.finditer(code):
        names = [n.strip() for n in match["names"].split(",")]
        values = [v.strip() for v in match["values"].split(",")]
        from_keys |= {n for n, v in zip(names, values, strict=False) if v.startswith("KEYS[")}
    params: dict[str, tuple[str, int]] = {}  # parameter -> (its function, its position)
    for match in _FUNCTION.finditer(code):
        for position, param in enumerate(p.strip() for p in match["params"].split(",")):
            params[param] = (match["name"], position)
    wrong = []
    for match in _CALL.finditer(code):
        cmd, key = match["cmd"], (match["key"] or "").strip()
        if cmd == "TIME" or key.startswith("KEYS[") or key in from_keys:
            continue
        if key in params:
            function, position = params[key]
            calls = [m.end() - 1 for m in re.finditer(rf"(?<!function ){function}\(", code)]
            passed = [_args(code, at)[position] for at in calls]
            if passed and all(p in from_keys or p.startswith("KEYS[") for p in passed):
                continue
        wrong.append(f"{cmd} {key}")
    return wrong


def test_every_script_touches_only_keys_passed_in_keys() -> None:
    scripts = [
        f for f in (resources.files("router.quota") / "lua").iterdir() if f.name.endswith(".lua")
    ]
    assert len(scripts) == 10
    for script in scripts:
        assert _undeclared_keys(script.read_text(encoding="utf-8")) == [], script.name
    # The check itself sees a key that does not come from KEYS.
    assert _undeclared_keys("local m = KEYS[1]\nredis.call('HGET', 'x:' .. ARGV[1], 'f')") == [
        "HGET 'x:' .. ARGV[1]"
    ]
    assert _undeclared_keys(
        "local m = KEYS[1]\nlocal function f(map) redis.call('DEL', map) end\nf(m)\nf(ARGV[1])"
    ) == ["DEL map"]


# -- Cluster ----------------------------------------------------------------------------------


async def test_a_cluster_seed_that_does_not_own_the_slot_serves(cluster: LocalCluster) -> None:
    """The gateway given only a node that does not own the deployment's slot: 200s and /readyz
    200 through redis+cluster://. Through redis:// (one server) the same node answers MOVED:
    every reservation, and so /readyz, is 503 with a hint to write redis+cluster://."""
    pfx = prefix()
    owner = cluster.owner(k.replicas_key(pfx))
    seed = next(n for n in cluster.masters() if n is not owner)
    async with Simulator(sim_config(LIMIT, None)) as sim:
        config = config_for(sim, limit=LIMIT, store_url=cluster.url(seed), prefix=pfx)
        async with serving(config) as (url, _):
            assert (await get_status(url + "/readyz"))[0] == 200
            results = await chat([url], 20)
            assert Counter(r.status for r in results) == {200: 20}
        one_server = f"redis://:{cluster.password}@{seed.address}/0"
        config = config_for(sim, limit=LIMIT, store_url=one_server, prefix=pfx)
        async with serving(config) as (url, _):
            status, body, _ = await get_status(url + "/readyz")
            assert (status, body["error"]["code"]) == (503, "store_unavailable")
            refused = await chat([url], 1)
            assert (refused[0].status, refused[0].code) == (503, "store_unavailable")
    assert sum(used for used, _ in sim_used(sim).values()) == 20
    store = RedisStore(one_server, prefix=pfx)
    try:
        with pytest.raises(StoreError, match=r"MovedError: .*write redis\+cluster://"):
            await store.reserve(request((KeySpec("a", "", 1, None),)))
    finally:
        await store.aclose()


def _topology_url(kind: str, cluster: LocalCluster, sentinel: LocalSentinel) -> str:
    return cluster.url() if kind == "cluster" else sentinel.url()


@pytest.fixture(params=["cluster", "sentinel"])
def topology_url(
    request: pytest.FixtureRequest, redis_cluster: LocalCluster, redis_sentinel: LocalSentinel
) -> str:
    return _topology_url(str(request.param), redis_cluster, redis_sentinel)


async def test_every_call_is_one_round_trip_on_cluster_and_sentinel(
    topology_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One EVALSHA per reserve and per settle (and one command per other call) once the
    client knows the topology and the scripts are loaded."""
    store = RedisStore(topology_url, prefix=prefix())
    keys = (KeySpec("a", "", 10, None), KeySpec("b", "", 10, None))
    free = request(keys, ClientQuota("alice", 100, FAIR))
    try:
        for _ in range(2):  # discover the topology, load the scripts, open connections
            res = await store.reserve(free)
            assert isinstance(res, Reservation)
            await store.settle(res, Settlement(release=True), NOW)
            await store.snapshot(PROVIDER, keys, DAY, NOW)
            await store.disable(PROVIDER, "zzz", "fp", "401")
            await store.enable(PROVIDER, "zzz")
            await store.client_usage(DAY, ["alice"], {PROVIDER: FAIR}, NOW)
            await store.reset_key(PROVIDER, "zzz", DAY)
            await store.ping()
        trips = _RoundTrips(monkeypatch)
        for _ in range(5):
            res = await store.reserve(free)
        assert trips.take() == 5
        for call in (
            store.settle(res, Settlement(release=True), NOW),
            store.snapshot(PROVIDER, keys, DAY, NOW),
            store.disable(PROVIDER, "a", "fp", "401"),
            store.enable(PROVIDER, "a"),
            store.reset_key(PROVIDER, "a", DAY),
            store.client_usage(DAY, ["alice", "bob"], {PROVIDER: FAIR, "other": FAIR}, NOW),
            store.remember_task("t", "v", 1000),
            store.recall_task("t"),
            store.ping(),
        ):
            await call
            assert trips.take() == 1, call
    finally:
        await store.aclose()


async def test_fail_open_heartbeat_and_write_back_on_cluster_and_sentinel(
    topology_url: str,
) -> None:
    """ResilientStore (store.on_error: fail_open) over a Cluster or a Sentinel service: its
    heartbeat and write-back scripts run there as on one server."""
    pfx = prefix()
    inner = RedisStore(topology_url, prefix=pfx)
    store = ResilientStore(inner, probe_s=0.05)
    spec = KeySpec("a", "fp", 10, 10)
    try:
        assert await store.heartbeat() == 1
        res = await store.reserve(request((spec,)))
        assert isinstance(res, Reservation)
        batch = [DayDeltas(PROVIDER, DAY, {k.used_field("a"): 2})]
        assert await inner.write_back("token-1", batch) is True
        assert await inner.write_back("token-1", batch) is False  # once per token
        assert (await store.snapshot(PROVIDER, (spec,), DAY, NOW))[0].used == 3
        await probe_reservation(store, DAY, NOW, DAY_END)
    finally:
        await store.aclose()


async def test_a_wrong_sentinel_password_is_a_store_error_not_a_hang(
    sentinel: LocalSentinel,
) -> None:
    assert sentinel.sentinel_password is not None
    assert sentinel.password is not None
    for url in (
        sentinel.url().replace(sentinel.sentinel_password, "wrong-secret"),
        sentinel.url(sentinel_password=False),  # the sentinels refuse: no AUTH given
        sentinel.url().replace(sentinel.password, "wrong-secret"),  # the master refuses
    ):
        store = RedisStore(url, prefix=prefix())
        try:
            started = time.monotonic()
            with pytest.raises(StoreError) as refused:
                await store.reserve(request((KeySpec("a", "", 5, None),)))
            assert time.monotonic() - started < CALL_TIMEOUTS * SOCKET_TIMEOUT_S
            message = str(refused.value)
            for secret in ("wrong-secret", sentinel.password, sentinel.sentinel_password):
                assert secret not in message
        finally:
            await store.aclose()


# -- failover under load ----------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    started: float
    status: int  # -1: no answer within DEADLINE_S


@asynccontextmanager
async def readiness(url: str) -> AsyncIterator[list[Probe]]:
    """/readyz asked back to back (every 50 ms) for as long as the block runs."""
    probes: list[Probe] = []
    stop = asyncio.Event()

    async def ask() -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
                    async with http.get(url + "/readyz", timeout=timeout) as response:
                        await response.read()
                        probes.append(Probe(started, response.status))
                except TimeoutError:
                    probes.append(Probe(started, -1))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

    task = asyncio.create_task(ask())
    try:
        yield probes
    finally:
        stop.set()
        await task


async def _counts(url: str, pfx: str) -> dict[str, int]:
    """key -> calls the store counted today, read by a fresh store on ``url``."""
    store = RedisStore(url, prefix=pfx)
    try:
        day = quota_day_of(datetime.now(UTC))
        specs = tuple(KeySpec(name, "", LIMIT, None) for name, _ in TOKENS)
        usages = await store.snapshot(PROVIDER, specs, day, int(time.time() * 1000))
    finally:
        await store.aclose()
    return {u.key: u.used for u in usages}


async def _kill_the_master_under_load(
    url: str, pfx: str, kill: Callable[[], None], down_after_s: float, what: str
) -> None:
    """SIGKILL the master serving the deployment under load; service must resume by itself.

    Checks: every answer is 200 or 503 store_unavailable, none slower than a bound; service
    back within ``down_after_s`` + 10 s; /readyz 503 during the outage and 200 after; the
    store never counts more than the upstream served (plus requests whose reserve may have
    run and lost its reply), and loses at most what asynchronous replication can lose.
    """
    workers = 8
    async with Simulator(sim_config(LIMIT, None)) as sim:
        config = config_for(sim, limit=LIMIT, model_daily_limit=LIMIT, store_url=url, prefix=pfx)
        async with serving(config) as (gateway, _), Load([gateway], workers) as load:
            await poll(lambda: load.count(200) >= 50, 15, "traffic before the kill")
            async with readiness(gateway) as probes:
                killed = time.monotonic()
                await asyncio.to_thread(kill)

                def resumed() -> bool:
                    failed = [r for r in load.since(killed) if r.status != 200]
                    if not failed:
                        return False
                    last = max(r.started + r.elapsed for r in failed)
                    after = [p for p in probes if p.started > last]
                    return (
                        sum(1 for r in load.since(last) if r.status == 200) >= 30
                        and len(after) >= 3
                        and all(p.status == 200 for p in after)
                    )

                await poll(resumed, down_after_s + 15, f"{what}: service back after the kill")
    results = load.results
    statuses = Counter((r.status, r.code) for r in results)
    assert set(statuses) <= {(200, None), (503, "store_unavailable")}, statuses
    refusals = [r for r in results if r.status == 503]
    assert refusals, "the kill was never seen"
    slowest = max(r.elapsed for r in results)
    # A refused connect fails at once; a call never takes more than the store's own bound.
    assert slowest < (CALL_TIMEOUTS + 1) * SOCKET_TIMEOUT_S + 1, slowest
    outage_end = max(r.started + r.elapsed for r in refusals)
    back_after = outage_end - killed
    assert back_after < down_after_s + 10, back_after
    during = [p for p in probes if killed < p.started < outage_end]
    after = [p for p in probes if p.started > outage_end]
    assert any(p.status == 503 for p in during), during
    assert after
    assert all(p.status == 200 for p in after), after
    # Counts: none doubled, and what was lost bounded by the writes in flight at the kill.
    store = await _counts(url, pfx)
    upstream = {name: used for name, (used, _) in sim_used(sim).items()}
    served = sum(1 for r in results if r.status == 200)
    assert sum(upstream.values()) == served
    # A reserve that ran on the old master and lost its reply (503): counted, not served.
    ambiguous = sum(1 for r in refusals if r.started <= killed <= r.started + r.elapsed)
    over = sum(store.values()) - sum(upstream.values())
    assert over <= ambiguous, (store, upstream, ambiguous)
    lost = {name: upstream[name] - store.get(name, 0) for name in upstream}
    # Replication is asynchronous: writes acknowledged by the old master in the moment before
    # the kill may never reach the replica. Each worker has one request in flight, so a few
    # per worker is already a loose bound on loopback.
    assert sum(max(n, 0) for n in lost.values()) <= 2 * workers, lost
    print(
        f"\n{what}: {dict(Counter(r.status for r in results))} in {len(results)} requests; "
        f"service back {back_after:.2f} s after the SIGKILL (503s for "
        f"{outage_end - min(r.started for r in refusals):.2f} s, slowest answer "
        f"{slowest * 1000:.0f} ms); /readyz: {Counter(p.status for p in during)} during, "
        f"{len(after)} x 200 after; counts: upstream {sum(upstream.values())}, store "
        f"{sum(store.values())}, lost to replication {sum(lost.values())} {lost}, "
        f"ambiguous 503s at the kill {ambiguous}"
    )


@pytest.mark.slow
async def test_cluster_master_killed_under_load_fails_over_by_itself(
    cluster: LocalCluster,
) -> None:
    pfx = prefix()
    owner = cluster.owner(k.replicas_key(pfx))  # every key of the deployment is in this slot
    await _kill_the_master_under_load(
        cluster.url(), pfx, owner.kill, cluster.node_timeout_ms / 1000, "cluster failover"
    )
    assert cluster.owner(k.replicas_key(pfx)) is not owner  # its replica took over


@pytest.mark.slow
async def test_sentinel_master_killed_under_load_fails_over_by_itself(
    sentinel: LocalSentinel,
) -> None:
    master = sentinel.current_master()
    await _kill_the_master_under_load(
        sentinel.url(), prefix(), master.kill, sentinel.down_after_ms / 1000, "sentinel failover"
    )
    assert sentinel.current_master() is not master


# -- one server: what the hand-written script lane was tested for, now through redis-py -------


def _outcome(o: Reservation | NoCapacity) -> tuple[Any, ...]:
    if isinstance(o, Reservation):
        return ("ok", o.key, o.remaining, o.model_remaining, o.fair_counted)
    return ("no", o.reason, o.retry_at_ms, o.client_limit)


async def test_200_concurrent_reserves_match_sequential_ones(redis_server: RedisServer) -> None:
    keys = (KeySpec("a", "", 60, None), KeySpec("b", "", 70, 65))
    alice = ClientQuota("alice", 150, FAIR)
    sequential = RedisStore(redis_server.url, prefix=prefix())
    name = f"burst-{uuid.uuid4().hex[:8]}"
    concurrent = RedisStore(
        f"{redis_server.url}?client_name={name}", prefix=prefix(), max_connections=16
    )
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        one_by_one = [await sequential.reserve(request(keys, alice)) for _ in range(200)]
        all_at_once = await asyncio.gather(
            *(concurrent.reserve(request(keys, alice)) for _ in range(200))
        )
        # The same decisions, one by one in Redis: the same outcomes (in some order).
        assert Counter(map(_outcome, all_at_once)) == Counter(map(_outcome, one_by_one))
        granted = [o for o in all_at_once if isinstance(o, Reservation)]
        assert 0 < len(granted) <= 125  # 60 + 65: never past a key's (model) limit
        per_key = Counter(o.key for o in granted)
        assert len({(o.key, o.remaining) for o in granted}) == len(granted)  # each reply once
        usage = {u.key: u.used for u in await concurrent.snapshot(PROVIDER, keys, DAY, NOW)}
        assert usage == dict(per_key)
        await asyncio.gather(
            *(concurrent.settle(o, Settlement(release=True), NOW) for o in granted)
        )
        usage = {u.key: u.used for u in await concurrent.snapshot(PROVIDER, keys, DAY, NOW)}
        assert usage == {"a": 0, "b": 0}
        # 200 callers on at most 16 connections: the burst waited for its turn, none failed.
        opened = [c for c in await admin.client_list() if c["name"] == name]
        assert 0 < len(opened) <= 16
    finally:
        await admin.aclose()
        await sequential.aclose()
        await concurrent.aclose()


class _Sends:
    """Counts the commands redis-py writes; ``reached(n)`` returns once n were written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        send = Connection.send_packed_command

        async def counting(conn: Connection, command: Any, check_health: bool = True) -> None:
            await send(conn, command, check_health)
            self.count += 1
            for n, event in self._waiters:
                if self.count >= n:
                    event.set()

        monkeypatch.setattr(Connection, "send_packed_command", counting)

    async def reached(self, n: int) -> None:
        event = asyncio.Event()
        self._waiters.append((n, event))
        if self.count >= n:
            event.set()
        await asyncio.wait_for(event.wait(), 10)


async def test_cancelled_callers_do_not_desync_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies held back (server stopped) while half of the callers go away: each remaining
    caller still gets its own reply (request i can only be served by key k<i>)."""
    sends = _Sends(monkeypatch)
    with RedisServer() as server:
        store = RedisStore(server.url, prefix=prefix(), socket_timeout=10)
        try:

            def req(i: int) -> ReserveRequest:
                spent = tuple(KeySpec(f"z{j}", "", 0, None) for j in range(i))
                return request((*spent, KeySpec(f"k{i}", "", None, None)))

            assert isinstance(await store.reserve(req(0)), Reservation)  # connected, loaded
            before = sends.count
            server.pause()
            try:
                tasks = [asyncio.create_task(store.reserve(req(i))) for i in range(20)]
                await sends.reached(before + 20)  # every command written, no reply yet
                for task in tasks[::2]:
                    task.cancel()
                await asyncio.gather(*tasks[::2], return_exceptions=True)
                assert all(task.cancelled() for task in tasks[::2])
            finally:
                server.resume()
            kept = await asyncio.gather(*tasks[1::2])
            assert [o.key for o in kept if isinstance(o, Reservation)] == [
                f"k{i}" for i in range(1, 20, 2)
            ]
            after = await store.reserve(req(3))
            assert isinstance(after, Reservation)
            assert (after.key, after.remaining) == ("k3", None)
        finally:
            await store.aclose()


async def test_a_flushed_script_is_loaded_again_and_runs_once(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, prefix=prefix())
    admin = Redis.from_url(redis_server.url)
    keys = (KeySpec("a", "", 3, None),)
    try:
        assert isinstance(await store.reserve(request(keys)), Reservation)
        await admin.script_flush()
        res = await store.reserve(request(keys))  # NOSCRIPT, SCRIPT LOAD, run once
        assert isinstance(res, Reservation)
        assert res.remaining == 1
        await admin.script_flush()
        await store.settle(res, Settlement(release=True), NOW)
        usage = await store.snapshot(PROVIDER, keys, DAY, NOW)
        assert [u.used for u in usage] == [1]  # released once, not twice
    finally:
        await admin.aclose()
        await store.aclose()


async def test_a_killed_server_fails_fast_and_a_restarted_one_serves_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sends = _Sends(monkeypatch)
    keys = (KeySpec("a", "", 1000, None),)
    with RedisServer() as server:
        store = RedisStore(server.url, prefix=prefix(), socket_timeout=5)
        try:
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            # Killed with replies pending: those callers fail at once, not after 5 s.
            server.pause()
            before = sends.count
            pending = [
                asyncio.create_task(store.reserve(request(keys))),
                asyncio.create_task(store.settle(res, Settlement(release=True), NOW)),
            ]
            await sends.reached(before + 2)
            started = time.monotonic()
            await asyncio.to_thread(server.kill)
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                assert isinstance(outcome, StoreError), outcome
                assert str(outcome).startswith(f"redis {server.url}: ConnectionError: ")
            # Down: a refused connect, at once.
            for call in (store.reserve(request(keys)), store.settle(res, Settlement(), NOW)):
                with pytest.raises(StoreError, match=r"ConnectionError: Error .*connecting to"):
                    await call
            assert time.monotonic() - started < 2
            await asyncio.to_thread(server.start)  # empty: no scripts, no counts
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            assert res.remaining == 999
            await store.settle(res, Settlement(release=True), NOW)
        finally:
            await store.aclose()


async def test_a_hung_server_fails_within_the_socket_timeout() -> None:
    keys = (KeySpec("a", "", 1000, None),)
    with RedisServer() as server:
        store = RedisStore(server.url, prefix=prefix(), socket_timeout=0.3)
        try:
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            server.pause()
            try:
                started = time.monotonic()
                calls = [store.reserve(request(keys)), store.settle(res, Settlement(), NOW)]
                for outcome in await asyncio.gather(*calls, return_exceptions=True):
                    assert isinstance(outcome, StoreError), outcome
                    assert "TimeoutError" in str(outcome)
                assert 0.29 <= time.monotonic() - started < 1.0
                # A new connection (the kernel accepts it) times out as well.
                started = time.monotonic()
                with pytest.raises(StoreError, match="TimeoutError"):
                    await store.ping()
                assert 0.29 <= time.monotonic() - started < 1.0
            finally:
                server.resume()
            assert isinstance(await store.reserve(request(keys)), Reservation)
        finally:
            await store.aclose()


def test_a_hung_server_times_out_on_uvloop_too() -> None:
    """The gateway runs on uvloop: redis-py's timeouts and the store's bounds work there."""
    uvloop = pytest.importorskip("uvloop")
    keys = (KeySpec("a", "", 1000, None),)

    async def scenario(server: RedisServer) -> None:
        store = RedisStore(server.url, prefix=prefix(), socket_timeout=0.3)
        try:
            outcomes = await asyncio.gather(*(store.reserve(request(keys)) for _ in range(50)))
            assert sorted(o.remaining for o in outcomes if isinstance(o, Reservation)) == list(
                range(950, 1000)
            )
            server.pause()
            try:
                started = time.monotonic()
                with pytest.raises(StoreError, match="TimeoutError"):
                    await store.reserve(request(keys))
                assert time.monotonic() - started < 1.0
            finally:
                server.resume()
            assert isinstance(await store.reserve(request(keys)), Reservation)
        finally:
            await store.aclose()

    with RedisServer() as server:
        uvloop.run(scenario(server))


async def test_a_burst_beyond_max_connections_waits_its_turn_within_a_bound() -> None:
    """More callers than connections on a hung server: none waits past the turn's bound plus
    the call's own (a wait for a turn is at most one socket timeout)."""
    keys = (KeySpec("a", "", 1000, None),)
    with RedisServer() as server:
        store = RedisStore(server.url, prefix=prefix(), socket_timeout=0.3, max_connections=2)
        try:
            assert isinstance(await store.reserve(request(keys)), Reservation)
            server.pause()
            try:
                started = time.monotonic()
                outcomes = await asyncio.gather(
                    *(store.reserve(request(keys)) for _ in range(6)), return_exceptions=True
                )
                took = time.monotonic() - started
            finally:
                server.resume()
            assert all(isinstance(o, StoreError) for o in outcomes), outcomes
            assert took < 0.3 + CALL_TIMEOUTS * 0.3 + 0.5, took
            assert isinstance(await store.reserve(request(keys)), Reservation)
        finally:
            await store.aclose()


# A script that keeps Redis busy for 150 ms (by Redis's own clock), then answers.
BUSY_150_MS = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= 150000
return 1
"""


async def test_a_burst_on_a_working_server_waits_as_long_as_calls_get_answers() -> None:
    """Calls queued for the one connection wait far longer than a socket timeout for their
    turn, but calls keep getting answers (one every 150 ms), so none is refused."""
    with RedisServer() as server:
        store = RedisStore(server.url, prefix=prefix(), socket_timeout=0.5, max_connections=1)
        client = store._client  # the store's own client, through its one bounded boundary
        try:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(store._io(lambda: client.eval(BUSY_150_MS, 0)) for _ in range(8)),
                return_exceptions=True,
            )
            took = time.monotonic() - started
            assert outcomes == [1] * 8, outcomes
            assert took > 1.0, took  # the last one waited two socket timeouts for its turn
        finally:
            await store.aclose()


async def test_a_password_protected_server_and_a_wrong_password() -> None:
    password = f"topo-pw-{uuid.uuid4().hex}"
    keys = (KeySpec("a", "", 5, None),)
    with RedisServer(password=password) as server:
        store = RedisStore(server.url, prefix=prefix())
        try:
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            await store.settle(res, Settlement(release=True), NOW)
        finally:
            await store.aclose()
        wrong, none = server.url.replace(password, "wrong-secret"), server.url.split("@")[1]
        for url in (wrong, f"redis://{none}"):
            store = RedisStore(url, prefix=prefix())
            try:
                with pytest.raises(StoreError) as refused:
                    await store.reserve(request(keys))
                message = str(refused.value)
                assert any(w in message for w in ("WRONGPASS", "invalid", "NOAUTH", "uthenti"))
                assert password not in message
                assert "wrong-secret" not in message
                assert "wrong-secret" not in repr(store)
            finally:
                await store.aclose()


async def test_an_acl_user_limited_to_the_deployment_keys() -> None:
    """An ACL user (user:password in the URL) allowed only this deployment's keys and the
    commands the store sends: the store works; a user without EVALSHA gets a StoreError."""
    pfx = prefix()
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        try:
            await admin.acl_setuser(
                "router",
                enabled=True,
                passwords=["+router-pw"],
                keys=[f"{{{pfx}}}:*"],
                commands=[
                    "+evalsha",
                    "+script|load",
                    "+@hash",
                    "+@string",
                    "+@sortedset",
                    "+del",
                    "+pexpire",
                    "+time",
                    "+ping",
                ],
            )
            await admin.acl_setuser(
                "reader", enabled=True, passwords=["+reader-pw"], keys=["*"], commands=["+get"]
            )
        finally:
            await admin.aclose()
        url = f"redis://router:router-pw@127.0.0.1:{server.port}/0"
        store = RedisStore(url, prefix=pfx)
        try:
            res = await store.reserve(request((KeySpec("a", "", 5, None),)))
            assert isinstance(res, Reservation)
            await store.settle(res, Settlement(release=True), NOW)
            await store.enable(PROVIDER, "a")
            await store.remember_task("t", "v", 1000)
            assert await store.recall_task("t") == "v"
        finally:
            await store.aclose()
        store = RedisStore(f"redis://reader:reader-pw@127.0.0.1:{server.port}/0", prefix=pfx)
        try:
            with pytest.raises(StoreError, match=r"NoPermissionError|NOPERM"):
                await store.reserve(request((KeySpec("a", "", 5, None),)))
            assert "reader-pw" not in repr(store)
        finally:
            await store.aclose()


class _UnixRedisServer(RedisServer):
    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    def _extra_args(self) -> list[str]:
        return [*super()._extra_args(), "--unixsocket", str(self.socket)]


async def test_a_unix_socket_with_a_password_and_a_db() -> None:
    password = f"topo-pw-{uuid.uuid4().hex}"
    with _UnixRedisServer(password=password) as server:
        pfx = prefix()
        store = RedisStore(f"unix://{server.socket}?db=2&password={password}", prefix=pfx)
        admin = Redis(unix_socket_path=str(server.socket), db=2, password=password)
        try:
            assert password not in repr(store)
            res = await store.reserve(request((KeySpec("a", "", 5, None),)))
            assert isinstance(res, Reservation)
            assert await admin.exists(f"{{{pfx}}}:p:{PROVIDER}:day:{DAY}") == 1
        finally:
            await admin.aclose()
            await store.aclose()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A TLS-only, password-protected redis-server with a certificate from a private CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not on PATH")
    where = tmp_path_factory.mktemp("topo-pki")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=topology test CA", cwd=where,
    )  # fmt: skip
    _openssl(
        "req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=where,
    )  # fmt: skip
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
        cwd=where,
    )  # fmt: skip
    tls = RedisTls(where / "server.pem", where / "server.key", where / "ca.pem")
    server = RedisServer(password=f"topo-tls-pw-{uuid.uuid4().hex}", tls=tls)
    try:
        server.start()
    except RuntimeError as exc:  # a redis-server built without TLS
        server.close()
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    yield server
    server.close()


async def test_rediss_reserves_and_settles_and_refuses_an_untrusted_server(
    tls_server: RedisServer,
) -> None:
    assert tls_server.password is not None
    store = RedisStore(tls_server.url, prefix=prefix())
    try:
        res = await store.reserve(request((KeySpec("a", "", 5, None),)))
        assert isinstance(res, Reservation)
        assert res.remaining == 4
        await store.settle(res, Settlement(release=True), NOW)
    finally:
        await store.aclose()
    untrusted = tls_server.url.split("?", 1)[0]  # the system CAs only
    store = RedisStore(untrusted, prefix=prefix())
    try:
        with pytest.raises(StoreError) as refused:
            await store.reserve(request((KeySpec("a", "", 5, None),)))
        message = str(refused.value)
        assert "certificate" in message.lower(), message
        assert tls_server.password not in message
        assert "***" in message
    finally:
        await store.aclose()


async def test_a_client_passed_in_is_used_as_configured(redis_server: RedisServer) -> None:
    """A Redis client of the caller's (here RESP3) is used, and left open by aclose."""
    client = Redis.from_url(redis_server.url, protocol=3)
    store = RedisStore(client, prefix=prefix())
    limited = ClientQuota("bob", 1, None)
    try:
        outcomes = [await store.reserve(request((KeySpec("a", "", 5, None),), limited))]
        outcomes.append(await store.reserve(request((KeySpec("a", "", 5, None),), limited)))
        assert isinstance(outcomes[0], Reservation)
        assert outcomes[0].remaining == 4
        refused = outcomes[1]
        assert isinstance(refused, NoCapacity)
        assert (refused.reason, refused.client_limit) == (Refusal.CLIENT_LIMIT, 1)
        await store.aclose()
        assert await client.ping()
    finally:
        await client.aclose()
