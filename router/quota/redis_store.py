"""A QuotaStore in Redis: each reserve and each settle is one EVALSHA of a Lua script."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.quota import keys as k
from router.quota import logic
from router.quota.store import StoreError
from router.quota.types import (
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)

T = TypeVar("T")


@cache
def _lua(name: str) -> str:
    """A script shipped as package data next to this module."""
    return (resources.files("router.quota") / "lua" / name).read_text(encoding="utf-8")


def masked_url(url: str) -> str:
    """``url`` with any password (in the userinfo or a ?password= query) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}"
    query = "&".join(
        f"{name}={'***' if name.lower() == 'password' else value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
    return args


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
    ]


def _settle_result(reply: Sequence[Any]) -> SettleResult:
    exhausted = _text(reply[1])
    return SettleResult(
        exhausted="key" if exhausted == "key" else "model" if exhausted == "model" else None,
        cooldown_until_ms=int(reply[2]) if len(reply) > 2 else None,
        newly_disabled=int(reply[0]) == 1,
    )


class RedisStore:
    """Day and disabled maps as Redis hashes, hash-tagged per provider (cluster-safe).

    Given a URL the store owns its client and closes it. That client does not retry: a
    script whose reply was lost may already have run, and running a settle twice would
    release a call twice. A client passed in is used as configured and left open.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        prefix: str = k.DEFAULT_PREFIX,
        socket_timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        if isinstance(redis, str):
            self._where = masked_url(redis)
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

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self._prefix!r})"

    def _keys(self, provider: str, day: str) -> list[str]:
        return [
            k.day_key(self._prefix, provider, day),
            k.disabled_key(self._prefix, provider),
        ]

    async def _io(self, call: Awaitable[T]) -> T:
        """The one boundary where Redis errors become StoreError."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis {self._where}: {type(exc).__name__}: {exc}") from exc

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        reply = await self._io(
            self._reserve_script(keys=self._keys(req.provider, req.day), args=_reserve_args(req))
        )
        if int(reply[0]) == 1:
            return logic.reservation_for(req, int(reply[1]), int(reply[2]), int(reply[3]))
        retry_at = int(reply[1]) if len(reply) > 1 else None
        return NoCapacity(req.provider, req.model, retry_at)

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        reply = await self._io(
            self._settle_script(
                keys=self._keys(res.provider, res.day), args=_settle_args(res, settlement, now_ms)
            )
        )
        return _settle_result(reply)

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        day_map, disabled_map = self._keys(provider, day)
        pipe = self._client.pipeline(transaction=True)  # one round trip, one consistent view
        pipe.hgetall(day_map)
        pipe.hgetall(disabled_map)
        fields, disabled = await self._io(pipe.execute())
        return logic.summarize(
            provider, _text_map(fields), _text_map(disabled), keys, now_ms, model_limits
        )

    async def enable(self, provider: str, key: str) -> None:
        await self._io(self._client.hdel(k.disabled_key(self._prefix, provider), key))

    async def ping(self) -> None:
        await self._io(self._client.ping())

    async def aclose(self) -> None:
        if self._owns_client:
            await self._io(self._client.aclose())
