"""RedisStore's script lane: reserve and settle on one pipelined connection (redis_lane.py).

Against real redis-servers: the session one for what leaves it as it was, private ones for
kills, hangs, passwords, a unix socket and TLS.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.credentials import UsernamePasswordCredentialProvider

from router.quota.redis_lane import LaneConnection, ScriptLane, pack, pack_fast
from router.quota.redis_store import FRAMES_MAX, RedisStore, _reserve_args, _settle_args
from router.quota.store import StoreError
from router.quota.types import (
    ClientQuota,
    Cooldown,
    FairShare,
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
    Strategy,
)
from tests.redis_server import RedisServer, RedisTls

PROVIDER = "modelscope"
MODEL = "Qwen/Qwen3-235B-A22B:free"
DAY = "20991230"
NOW = int(time.time() * 1000)  # Redis expires by its own clock: stay near the real time
DAY_END = NOW + 10 * 3_600_000
FAIR = FairShare(0.3, (("alice", 1.0), ("bob", 2.5), ("ç客", 0.1)), 600_000)


def prefix() -> str:
    return f"lane-{uuid.uuid4().hex[:12]}"


def request(
    keys: tuple[KeySpec, ...],
    client: ClientQuota | None = None,
    *,
    provider: str = PROVIDER,
    model: str = MODEL,
    strategy: Strategy = Strategy.MOST_REMAINING,
    day: str = DAY,
    now: int = NOW,
) -> ReserveRequest:
    return ReserveRequest(provider, model, keys, strategy, day, now, DAY_END, client)


def store_on(url: str, **kwargs: Any) -> RedisStore:
    store = RedisStore(url, prefix=prefix(), **kwargs)
    assert store._lane is not None  # these tests are about the lane
    return store


class _Sends:
    """Counts the commands written on lanes; ``reached(n)`` is set once n were written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        send = LaneConnection.send

        def counting(conn: LaneConnection, command: bytes) -> asyncio.Future[Any]:
            future = send(conn, command)
            self.count += 1
            for n, event in self._waiters:
                if self.count >= n:
                    event.set()
            return future

        monkeypatch.setattr(LaneConnection, "send", counting)

    async def reached(self, n: int) -> None:
        event = asyncio.Event()
        self._waiters.append((n, event))
        if self.count >= n:
            event.set()
        await asyncio.wait_for(event.wait(), 10)


# -- encoding ---------------------------------------------------------------------------------


def _requests() -> list[ReserveRequest]:
    keys = (KeySpec("a", "fp-a", 100, None), KeySpec("b", "fp-b", None, 7))
    return [
        request(keys),
        request(keys, ClientQuota("alice", 500, None)),
        request(keys, ClientQuota("alice", None, FAIR), strategy=Strategy.ROUND_ROBIN),
        request(keys, ClientQuota("ç客", 3, FairShare(0.25, (), None)), model="模型/x:free"),
        request((KeySpec("only", "", 0, 0),), now=0, day="20000101"),
    ]


def test_reserve_encoding_equals_the_reference_encoding() -> None:
    """The pre-encoded reserve command is exactly RESP of the keys and _reserve_args, on a
    first call (frame built) and on later ones (frame reused, other now_ms)."""
    store = RedisStore("redis://127.0.0.1:1/0", prefix="enc")
    for req in _requests():
        for now in (req.now_ms, req.now_ms + 1, 10**13 + 7):
            timed = ReserveRequest(
                req.provider, req.model, req.keys, req.strategy, req.day, now, req.day_end_ms,
                req.client,
            )  # fmt: skip
            expected = pack(
                "EVALSHA",
                store._reserve_lua.sha,
                3,
                *store._keys(req.provider, req.day),
                *_reserve_args(timed),
            )
            assert store._reserve_command(timed) == expected
    # An equal keys tuple that is another object: looked up by identity, still the same bytes.
    req = _requests()[2]
    copy = ReserveRequest(
        req.provider, req.model, tuple(list(req.keys)), req.strategy, req.day, req.now_ms,
        req.day_end_ms, ClientQuota("alice", None, FAIR),
    )  # fmt: skip
    assert copy.keys is not req.keys
    assert store._reserve_command(copy) == store._reserve_command(req)


def test_settle_encoding_equals_the_reference_encoding() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="enc")
    res = Reservation(PROVIDER, "a", "fp", "模型", DAY, DAY_END, 10, None, 9, None, "ç客", True)
    for settlement in (
        Settlement(),
        Settlement(release=True),
        Settlement(remaining=3, model_remaining=0, exhaust="ambiguous", near_zero=2),
        Settlement(cooldown=Cooldown("model", 1000, 60_000, fixed=True), disable_reason="401"),
    ):
        expected = pack(
            "EVALSHA",
            store._settle_lua.sha,
            3,
            *store._keys(PROVIDER, DAY),
            *_settle_args(res, settlement, NOW),
        )
        assert store._settle_command(res, settlement, NOW) == expected


def test_the_reference_encoder_is_what_redis_py_and_hiredis_write() -> None:
    args: tuple[str | int | bytes, ...] = ("EVALSHA", "0" * 40, 3, "é", -1, 0, b"\r\n", "")
    assert pack_fast(args) == pack(*args)
    assert b"".join(Connection().pack_command(*args)) == pack(*args)
    assert hiredis.pack_command(args) == pack(*args)


def test_reserve_frames_stay_bounded() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="enc")
    keys = (KeySpec("a", "", 1, None),)
    for day in range(FRAMES_MAX + 50):
        store._reserve_command(request(keys, day=str(day)))
    assert len(store._reserve_frames) == FRAMES_MAX


# -- which connections a lane takes on --------------------------------------------------------


class _OwnConnection(Connection):
    pass


def test_settings_a_lane_does_not_carry_out_keep_redis_py() -> None:
    creds = UsernamePasswordCredentialProvider("u", "p")
    for client in (
        Redis(protocol=3),
        Redis(credential_provider=creds),
        Redis(connection_pool=ConnectionPool(connection_class=_OwnConnection)),
    ):
        assert ScriptLane.for_client(client, timeout=1) is None
    assert ScriptLane.for_url("redis://h:1/0?protocol=3", timeout=1) is None
    for url in ("redis://u:pw@h:1/2", "unix:///tmp/x.sock?db=1", "rediss://h:1/0"):
        lane = ScriptLane.for_url(url, timeout=1)
        assert lane is not None
        assert "pw" not in repr(lane)
    assert "tls=True" in repr(ScriptLane.for_url("rediss://h:1/0", timeout=1))


async def test_a_client_that_keeps_redis_py_still_reserves(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, protocol=3)
    store = RedisStore(client, prefix=prefix())
    try:
        assert store._lane is None
        res = await store.reserve(request((KeySpec("a", "", 2, None),)))
        assert isinstance(res, Reservation)
        await store.settle(res, Settlement(release=True), NOW)
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_client_passed_in_gets_a_lane(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    store = RedisStore(client, prefix=prefix())
    try:
        assert store._lane is not None
        res = await store.reserve(request((KeySpec("a", "", 2, None),)))
        assert isinstance(res, Reservation)
        assert res.remaining == 1
    finally:
        await store.aclose()
        await client.aclose()


# -- concurrency ------------------------------------------------------------------------------


def _outcome(o: Reservation | NoCapacity) -> tuple[Any, ...]:
    if isinstance(o, Reservation):
        return ("ok", o.key, o.remaining, o.model_remaining, o.fair_counted)
    return ("no", o.reason, o.retry_at_ms, o.client_limit)


async def test_200_concurrent_reserves_on_one_lane_match_sequential_ones(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = Counter[str]()
    real_open = ScriptLane._open

    async def counting_open(lane: ScriptLane) -> LaneConnection:
        opens["open"] += 1
        return await real_open(lane)

    monkeypatch.setattr(ScriptLane, "_open", counting_open)
    keys = (KeySpec("a", "", 60, None), KeySpec("b", "", 70, 65))
    alice = ClientQuota("alice", 150, FAIR)
    sequential, concurrent = store_on(redis_server.url), store_on(redis_server.url)
    try:
        one_by_one = [await sequential.reserve(request(keys, alice)) for _ in range(200)]
        all_at_once = await asyncio.gather(
            *(concurrent.reserve(request(keys, alice)) for _ in range(200))
        )
        assert opens["open"] == 2  # one connect per store, shared by its first 200 callers
        # The same decisions, one by one in Redis: the same outcomes (in some order).
        assert Counter(map(_outcome, all_at_once)) == Counter(map(_outcome, one_by_one))
        granted = [o for o in all_at_once if isinstance(o, Reservation)]
        assert 0 < len(granted) <= 125  # 60 + 65: never past a key's (model) limit
        per_key = Counter(o.key for o in granted)
        assert per_key["a"] <= 60
        assert per_key["b"] <= 65
        # every reply went to one caller: each (key, remaining) once
        assert len({(o.key, o.remaining) for o in granted}) == len(granted)
        usage = {u.key: u.used for u in await concurrent.snapshot(PROVIDER, keys, DAY, NOW)}
        assert usage == dict(per_key)
        settled = await asyncio.gather(
            *(concurrent.settle(o, Settlement(release=True), NOW) for o in granted)
        )
        assert len(settled) == len(granted)
        usage = {u.key: u.used for u in await concurrent.snapshot(PROVIDER, keys, DAY, NOW)}
        assert usage == {"a": 0, "b": 0}
    finally:
        await sequential.aclose()
        await concurrent.aclose()


async def test_a_cancelled_caller_does_not_desync_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replies held back (server stopped) while half of the callers go away: each remaining
    caller still gets its own reply (request i can only be served by key k<i>)."""
    sends = _Sends(monkeypatch)
    with RedisServer() as server:
        store = store_on(server.url, socket_timeout=10)
        try:

            def req(i: int) -> ReserveRequest:
                spent = tuple(KeySpec(f"z{j}", "", 0, None) for j in range(i))
                return request((*spent, KeySpec(f"k{i}", "", None, None)))

            assert isinstance(await store.reserve(req(0)), Reservation)  # connected, loaded
            server.pause()
            try:
                tasks = [asyncio.create_task(store.reserve(req(i))) for i in range(20)]
                await sends.reached(1 + 20)  # every command written, no reply yet
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


# -- NOSCRIPT, kills, hangs -------------------------------------------------------------------


async def test_a_flushed_script_is_loaded_again(redis_server: RedisServer) -> None:
    store = store_on(redis_server.url)
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
        store = store_on(server.url, socket_timeout=5)
        try:
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            # Killed with replies pending: those callers fail at once, not after 5 s.
            server.pause()
            pending = [
                asyncio.create_task(store.reserve(request(keys))),
                asyncio.create_task(store.settle(res, Settlement(release=True), NOW)),
            ]
            await sends.reached(1 + 2)
            started = time.monotonic()
            await asyncio.to_thread(server.kill)
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                assert isinstance(outcome, StoreError), outcome
                assert str(outcome).startswith(f"redis {server.url}: ConnectionError: ")
                assert "lost" in str(outcome)
            # Down: a refused connect, at once.
            for call in (store.reserve(request(keys)), store.settle(res, Settlement(), NOW)):
                with pytest.raises(StoreError, match="ConnectionError: Error connecting to"):
                    await call
            assert time.monotonic() - started < 2
            await asyncio.to_thread(server.start)  # empty: no scripts, no counts
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            assert res.remaining == 999
            await store.settle(res, Settlement(release=True), NOW)
        finally:
            await store.aclose()


async def test_a_hung_server_fails_within_the_socket_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sends = _Sends(monkeypatch)
    keys = (KeySpec("a", "", 1000, None),)
    with RedisServer() as server:
        store = store_on(server.url, socket_timeout=0.3)
        try:
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            server.pause()
            try:
                started = time.monotonic()
                first = asyncio.create_task(store.reserve(request(keys)))
                await sends.reached(2)
                second = asyncio.create_task(store.settle(res, Settlement(), NOW))  # later
                for task in (first, second):
                    with pytest.raises(StoreError, match="TimeoutError: Timeout reading from"):
                        await task
                assert 0.29 <= time.monotonic() - started < 1.0
                # A new connection (the kernel accepts it) times out as well.
                started = time.monotonic()
                with pytest.raises(StoreError, match="TimeoutError"):
                    await store.reserve(request(keys))
                assert 0.29 <= time.monotonic() - started < 1.0
            finally:
                server.resume()
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
        finally:
            await store.aclose()


def test_a_hung_server_times_out_on_uvloop_too() -> None:
    """The gateway runs on uvloop: the watchdog (call_at) and the protocol work there."""
    uvloop = pytest.importorskip("uvloop")
    keys = (KeySpec("a", "", 1000, None),)

    async def scenario(server: RedisServer) -> None:
        store = store_on(server.url, socket_timeout=0.3)
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


# -- password, unix socket with a db, TLS -----------------------------------------------------


async def test_a_password_protected_server_and_a_wrong_password() -> None:
    password = f"lane-pw-{uuid.uuid4().hex}"
    keys = (KeySpec("a", "", 5, None),)
    with RedisServer(password=password) as server:
        store = store_on(server.url)
        try:
            res = await store.reserve(request(keys))
            assert isinstance(res, Reservation)
            await store.settle(res, Settlement(release=True), NOW)
        finally:
            await store.aclose()
        wrong, none = server.url.replace(password, "wrong-secret"), server.url.split("@")[1]
        for url in (wrong, f"redis://{none}"):
            store = store_on(url)
            try:
                with pytest.raises(StoreError) as refused:
                    await store.reserve(request(keys))
                message = str(refused.value)
                # no AUTH: Redis refuses a big command before AUTH ("unauthenticated")
                assert any(w in message for w in ("WRONGPASS", "unauthenticated", "NOAUTH"))
                assert password not in message
                assert "wrong-secret" not in message
                assert "wrong-secret" not in repr(store)
            finally:
                await store.aclose()


class _UnixRedisServer(RedisServer):
    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    def _extra_args(self) -> list[str]:
        return [*super()._extra_args(), "--unixsocket", str(self.socket)]


async def test_a_unix_socket_with_a_password_and_a_db() -> None:
    """AUTH and SELECT pipelined ahead of the first script; the counts land in db 2."""
    password = f"lane-pw-{uuid.uuid4().hex}"
    with _UnixRedisServer(password=password) as server:
        pfx = prefix()
        store = RedisStore(f"unix://{server.socket}?db=2&password={password}", prefix=pfx)
        admin = Redis(unix_socket_path=str(server.socket), db=2, password=password)
        try:
            assert store._lane is not None
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
    where = tmp_path_factory.mktemp("lane-pki")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=lane test CA", cwd=where,
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
    server = RedisServer(password=f"lane-tls-pw-{uuid.uuid4().hex}", tls=tls)
    try:
        server.start()
    except RuntimeError as exc:  # a redis-server built without TLS
        server.close()
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    yield server
    server.close()


async def test_rediss_goes_through_the_lane(tls_server: RedisServer) -> None:
    assert tls_server.password is not None
    store = store_on(tls_server.url)
    try:
        assert "tls=True" in repr(store._lane)
        res = await store.reserve(request((KeySpec("a", "", 5, None),)))
        assert isinstance(res, Reservation)
        assert res.remaining == 4
        await store.settle(res, Settlement(release=True), NOW)
    finally:
        await store.aclose()
    untrusted = tls_server.url.split("?", 1)[0]  # the system CAs only
    store = store_on(untrusted)
    try:
        with pytest.raises(StoreError) as refused:
            await store.reserve(request((KeySpec("a", "", 5, None),)))
        message = str(refused.value)
        assert "certificate" in message.lower(), message
        assert tls_server.password not in message
        assert "***" in message
    finally:
        await store.aclose()


# -- the client-limit refusal comes back as text ----------------------------------------------


async def test_refusals_decode_from_the_lane(redis_server: RedisServer) -> None:
    store = store_on(redis_server.url)
    limited = ClientQuota("bob", 1, None)
    keys = (KeySpec("a", "", 5, None),)
    try:
        outcomes = [await store.reserve(request(keys, limited)) for _ in range(2)]
    finally:
        await store.aclose()
    refused = outcomes[1]
    assert isinstance(refused, NoCapacity)
    assert (refused.reason, refused.client_limit) == (Refusal.CLIENT_LIMIT, 1)
