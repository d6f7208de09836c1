"""A QuotaStore in Redis: each reserve and each settle is one EVALSHA of a Lua script."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, NamedTuple, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.quota import keys as k
from router.quota import logic
from router.quota.days import wall_clock_ms
from router.quota.redis_lane import LaneScript, ScriptLane, bulks, pack_fast
from router.quota.store import StoreError
from router.quota.types import (
    ClientUsage,
    FairShare,
    KeySpec,
    KeyUsage,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    RouteIdent,
    Settlement,
    SettleResult,
)
from router.quota.urls import mask_url

T = TypeVar("T")

DAY_MS = 86_400_000
# Small enough that a hung Redis fails a request fast (503, or the local allowance with
# store.on_error: fail_open), large enough for any script of ours on a loaded server.
SOCKET_TIMEOUT_S = 2.0
# Pre-encoded reserve commands kept (a few per provider, model, client and day).
FRAMES_MAX = 1024


class DayDeltas(NamedTuple):
    """Counts to add to one day map (write-back of calls counted while Redis was away)."""

    provider: str | None  # None: the clients day map
    day: str
    deltas: Mapping[str, int]  # field -> calls to add (negative: calls given back)


@cache
def _lua(name: str) -> str:
    """A script shipped as package data next to this module."""
    return (resources.files("router.quota") / "lua" / name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(f): _text(v) for f, v in raw.items()}


def _cap(limit: int | None) -> int:
    return -1 if limit is None else limit


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _reserve_args(req: ReserveRequest) -> list[str | int]:
    args: list[str | int] = [
        req.model,
        req.strategy.value,
        req.now_ms,
        req.day_end_ms,
        len(req.keys),
    ]
    for spec in req.keys:
        args += [spec.name, spec.fingerprint, _cap(spec.daily_limit), _cap(spec.model_limit)]
    client = req.client
    if client is None:
        return [*args, "", -1, 0, 0, -1, 0]
    fair = client.fair_share
    if fair is None:
        return [*args, client.name, _cap(client.daily_limit), 0, 0, -1, 0]
    # repr() of a float is the shortest text that parses back to the same double in Lua.
    args += [client.name, _cap(client.daily_limit), 1, repr(float(fair.below))]
    args += [_cap(fair.active_window_ms), len(fair.weights)]
    for name, weight in fair.weights:
        args += [name, repr(float(weight))]
    return args


def _reserve_outcome(req: ReserveRequest, reply: Sequence[Any]) -> Reservation | NoCapacity:
    if int(reply[0]) == 1:
        index, used, model_used = int(reply[1]), int(reply[2]), int(reply[3])
        return logic.reservation_for(req, index, used, model_used, int(reply[4]) == 1)
    retry_at, limit = int(reply[2]), int(reply[3])
    return NoCapacity(
        req.provider,
        req.model,
        None if retry_at < 0 else retry_at,
        Refusal(_text(reply[1])),
        None if limit < 0 else limit,
    )


class _ReserveFrame(NamedTuple):
    """A reserve EVALSHA encoded but for now_ms and day_end_ms (RedisStore._reserve_command)."""

    req: ReserveRequest  # the one it was made for: its keys and client keep their ids
    head: bytes  # *N, EVALSHA, sha, 3, the three keys, model, strategy
    tail: bytes  # every argument after day_end_ms


def _settle_args(res: Reservation, s: Settlement, now_ms: int) -> list[str | int]:
    cooldown = s.cooldown
    return [
        res.key,
        res.model,
        res.fingerprint,
        res.day_end_ms,
        _cap(res.daily_limit),
        _cap(res.model_limit),
        now_ms,
        int(s.release),
        _opt(s.remaining),
        _opt(s.model_remaining),
        s.exhaust or "",
        s.near_zero,
        "" if cooldown is None else cooldown.scope,
        0 if cooldown is None else cooldown.base_ms,
        0 if cooldown is None else cooldown.max_ms,
        int(cooldown is not None and cooldown.fixed),
        int(s.disable_reason is not None),
        s.disable_reason or "",
        res.client or "",
        int(res.free),
        int(res.fair_counted),
    ]


def _settle_result(reply: Sequence[Any]) -> SettleResult:
    exhausted = _text(reply[1])
    return SettleResult(
        exhausted="key" if exhausted == "key" else "model" if exhausted == "model" else None,
        cooldown_until_ms=int(reply[2]) if len(reply) > 2 else None,
        newly_disabled=int(reply[0]) == 1,
    )


class RedisStore:
    """Day, disabled and clients maps as Redis hashes, all under one hash tag (see keys.py).

    Given a URL the store owns its client and closes it. That client does not retry: a
    script whose reply was lost may already have run, and running a settle twice would
    release a call twice. A client passed in is used as configured and left open.
    reserve and settle, the hot path, go on a ScriptLane of the store's own (one pipelined
    connection with the client's settings and ``socket_timeout``; it never retries either)
    unless those settings are some a lane does not carry out (see redis_lane.py).
    ``clock`` (Unix ms) is only the default ``now`` of client_usage: Redis expires tasks.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        prefix: str = k.DEFAULT_PREFIX,
        socket_timeout: float = SOCKET_TIMEOUT_S,
        max_connections: int = 64,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._clock = clock
        if isinstance(redis, str):
            self._where = mask_url(redis)
            # A blocking pool: a burst beyond max_connections waits for a free connection
            # (each script is short) instead of failing with "Too many connections".
            pool = BlockingConnectionPool.from_url(
                redis,
                max_connections=max_connections,
                timeout=socket_timeout,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._client = Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._where = "client"
            self._client = redis
            self._owns_client = False
        self._prefix = prefix
        # register_script: EVALSHA, and SCRIPT LOAD + retry only after a NOSCRIPT.
        self._reserve_script = self._client.register_script(_lua("reserve.lua"))
        self._settle_script = self._client.register_script(_lua("settle.lua"))
        self._reset_key_script = self._client.register_script(_lua("reset_key.lua"))
        self._heartbeat_script = self._client.register_script(_lua("heartbeat.lua"))
        self._writeback_script = self._client.register_script(_lua("writeback.lua"))
        # reserve and settle: on one pipelined connection of their own, unless its settings
        # are some a lane does not carry out (then on redis-py as the rest; see redis_lane).
        self._lane = ScriptLane.for_client(self._client, timeout=socket_timeout)
        self._reserve_lua = LaneScript(_lua("reserve.lua"))
        self._settle_lua = LaneScript(_lua("settle.lua"))
        self._reserve_frames: dict[tuple[RouteIdent, str], _ReserveFrame] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self._prefix!r})"

    def _keys(self, provider: str, day: str) -> list[str]:
        return [
            k.day_key(self._prefix, provider, day),
            k.disabled_key(self._prefix, provider),
            k.clients_key(self._prefix, day),
        ]

    async def _io(self, call: Awaitable[T]) -> T:
        """The one boundary where Redis errors (redis-py's or the lane's) become StoreError."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis {self._where}: {type(exc).__name__}: {exc}") from exc

    def _reserve_command(self, req: ReserveRequest) -> bytes:
        """EVALSHA of reserve.lua for ``req`` as RESP: ``pack`` of the keys and _reserve_args.

        Only now_ms and day_end_ms change between the requests of one route and day
        (``ReserveRequest.route``), so the rest is encoded once.
        """
        frames = self._reserve_frames
        ident = (req.route(), req.day)
        frame = frames.get(ident)
        if frame is None or not frame.req.same_route(req):
            args = _reserve_args(req)
            head: tuple[str | int, ...] = (
                "EVALSHA",
                self._reserve_lua.sha,
                3,
                *self._keys(req.provider, req.day),
            )
            frame = _ReserveFrame(
                req,
                b"*%d\r\n%s" % (len(head) + len(args), bulks(*head, *args[:2])),
                bulks(*args[4:]),
            )
            if len(frames) >= FRAMES_MAX:
                del frames[next(iter(frames))]  # the oldest
            frames[ident] = frame
        now, end = b"%d" % req.now_ms, b"%d" % req.day_end_ms
        return b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
            frame.head,
            len(now),
            now,
            len(end),
            end,
            frame.tail,
        )

    def _settle_command(self, res: Reservation, s: Settlement, now_ms: int) -> bytes:
        """EVALSHA of settle.lua as RESP (settles are rare: nothing kept between calls)."""
        keys = self._keys(res.provider, res.day)
        return pack_fast(("EVALSHA", self._settle_lua.sha, 3, *keys, *_settle_args(res, s, now_ms)))

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        if self._lane is None:
            keys = self._keys(req.provider, req.day)
            reply = await self._io(self._reserve_script(keys=keys, args=_reserve_args(req)))
        else:
            reply = await self._io(self._lane.run(self._reserve_lua, self._reserve_command(req)))
        return _reserve_outcome(req, reply)

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        if self._lane is None:
            keys = self._keys(res.provider, res.day)
            args = _settle_args(res, settlement, now_ms)
            reply = await self._io(self._settle_script(keys=keys, args=args))
        else:
            command = self._settle_command(res, settlement, now_ms)
            reply = await self._io(self._lane.run(self._settle_lua, command))
        return _settle_result(reply)

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        day_map, disabled_map, _ = self._keys(provider, day)
        pipe = self._client.pipeline(transaction=True)  # one round trip, one consistent view
        pipe.hgetall(day_map)
        pipe.hgetall(disabled_map)
        fields, disabled = await self._io(pipe.execute())
        return logic.summarize(
            provider, _text_map(fields), _text_map(disabled), keys, now_ms, model_limits
        )

    async def enable(self, provider: str, key: str) -> None:
        await self._io(self._client.hdel(k.disabled_key(self._prefix, provider), key))

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        disabled_map = k.disabled_key(self._prefix, provider)
        pipe = self._client.pipeline(transaction=True)  # one round trip: read and write at once
        pipe.hget(disabled_map, key)
        pipe.hset(disabled_map, key, logic.disabled_record(fingerprint, reason))
        before, _ = await self._io(pipe.execute())
        was = {} if before is None else {key: _text(before)}
        newly, _ = logic.disable_on(was, key, fingerprint, reason)
        return newly

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        day_map = k.day_key(self._prefix, provider, day)
        await self._io(self._reset_key_script(keys=[day_map], args=[key]))

    async def client_usage(
        self,
        day: str,
        clients: Sequence[str],
        free: Mapping[str, FairShare] | None = None,
        now_ms: int | None = None,
    ) -> list[ClientUsage]:
        free = free or {}
        now = self._clock() if now_ms is None else now_ms
        wanted = [k.SHARE_OUT_FIELD, *(k.fair_used_field(client) for client in clients)]
        pipe = self._client.pipeline(transaction=True)  # one round trip, one consistent view
        pipe.hgetall(k.clients_key(self._prefix, day))
        for provider in free:
            pipe.hmget(k.day_key(self._prefix, provider, day), wanted)
        client_map, *values = await self._io(pipe.execute())
        providers = {
            provider: {f: _text(v) for f, v in zip(wanted, got, strict=True) if v is not None}
            for provider, got in zip(free, values, strict=True)
        }
        return logic.client_usages(_text_map(client_map), providers, clients, free, now)

    async def remember_task(self, task_id: str, value: str, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, not {ttl_ms}")
        await self._io(self._client.set(k.task_key(self._prefix, task_id), value, px=ttl_ms))

    async def recall_task(self, task_id: str) -> str | None:
        value = await self._io(self._client.get(k.task_key(self._prefix, task_id)))
        return None if value is None else _text(value)

    async def ping(self) -> None:
        await self._io(self._client.ping())

    # -- for ResilientStore (store.on_error: fail_open) ----------------------------------------

    async def heartbeat(
        self,
        replica: str,
        live_window_ms: int,
        forget_after_ms: int,
        reads: Mapping[tuple[str, str], Sequence[str]] | None = None,
    ) -> tuple[int, dict[tuple[str, str], dict[str, str | None]]]:
        """Say ``replica`` is alive (Redis time) and read day-map fields, in one round trip.

        ``reads`` maps (provider, day) to fields of that day map. Returns the replicas seen
        within the live window and, per (provider, day), each field's value (None: absent).
        """
        reads = reads or {}
        keys = [k.replicas_key(self._prefix)]
        args: list[str | int] = [replica, live_window_ms, forget_after_ms]
        for (provider, day), wanted in reads.items():
            keys.append(k.day_key(self._prefix, provider, day))
            args += [len(wanted), *wanted]
        reply = await self._io(self._heartbeat_script(keys=keys, args=args))
        read = {
            where: {
                field: None if value is None else _text(value)
                for field, value in zip(wanted, got, strict=True)
            }
            for (where, wanted), got in zip(reads.items(), reply[1:], strict=True)
        }
        return int(reply[0]), read

    async def forget_replica(self, replica: str) -> None:
        await self._io(self._client.hdel(k.replicas_key(self._prefix), replica))

    async def write_back(self, token: str, batch: Sequence[DayDeltas]) -> bool:
        """Add ``batch`` to the day maps in one script, once per ``token``.

        True when applied now; False when a call with this token applied it before (its
        reply was lost), so a retry never counts twice.
        """
        keys = [k.writeback_key(self._prefix, token)]
        # A write-back may come long after the day it counts: the maps live two days from it
        # (a day map's writes all fall within a day of its end, so that keeps yesterday
        # readable), a duration that needs no clock here.
        args: list[str | int] = [2 * DAY_MS, 2 * DAY_MS]
        for entry in batch:
            deltas = [(field, delta) for field, delta in entry.deltas.items() if delta]
            if entry.provider is None:
                keys.append(k.clients_key(self._prefix, entry.day))
            else:
                keys.append(k.day_key(self._prefix, entry.provider, entry.day))
            args.append(len(deltas))
            for field, delta in deltas:
                args += [field, delta]
        reply = await self._io(self._writeback_script(keys=keys, args=args))
        return int(reply) == 1

    async def aclose(self) -> None:
        if self._lane is not None:
            await self._lane.aclose()
        if self._owns_client:
            await self._io(self._client.aclose())
