"""A QuotaStore in Redis: each reserve and each settle is one EVALSHA of a Lua script.

Every command goes through redis-py's asyncio clients, on the topology the URL names
(router/quota/urls.py): one server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://``, ``RedisCluster`` seeded by the nodes listed) or the master of a Sentinel
service (``redis+sentinel://``, ``Sentinel(...).master_for(service)``, followed through
failovers). Every key of a deployment has one hash tag (keys.py), so each script's keys are in
one Cluster slot, and every call is one keyed command: a script (EVALSHA, SCRIPT LOAD after a
NOSCRIPT) or a single-key command, routed and redirected (MOVED, ASK) by the Cluster client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, NamedTuple, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from router.quota import keys as k
from router.quota import logic, spending
from router.quota.days import wall_clock_ms
from router.quota.keysets import KeySets
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
    Settlement,
    SettleResult,
    UsageRecord,
    UsageRow,
)
from router.quota.urls import SERVER_SCHEMES, mask_url, parse_redis_url, split_scheme

T = TypeVar("T")
Client = Redis | RedisCluster

DAY_MS = 86_400_000
RATES_TTL_MS = 120_000  # the per-minute windows: a minute and a bit (reserve.lua too)
USAGE_BATCH_TTL_MS = 3_600_000  # a usage batch is retried within seconds, never an hour later
# Small enough that a hung Redis fails a request fast (503, or the local allowance with
# store.on_error: fail_open), large enough for any script of ours on a loaded server. It bounds
# every connect, and every call to one server as a whole; a call to a Cluster or a Sentinel
# service (a topology refresh or a master lookup may come ahead of the command) gets
# CALL_TIMEOUTS of it. A call waiting for one of the max_connections in flight waits at most
# one more.
SOCKET_TIMEOUT_S = 2.0
CALL_TIMEOUTS = 2
# What a call may raise, all of it a StoreError at RedisStore._io: redis-py's errors
# (RedisError; RedisClusterException is not one), the socket's (OSError), the call's own
# deadline (TimeoutError), and more: a connection closed under a command by another task (a
# Cluster client recycling a failed node's connections while they are handed out again)
# surfaces as AttributeError or TypeError from asyncio's transport, not as a ConnectionError
# (redis-py issues 3546, 4287). The store failing, whatever the type: never a 500.

# A standalone client sent to a Cluster node: what it gets back (MOVED is an AskError), and
# what to do about it.
_CLUSTER_REPLIES = (AskError, ClusterDownError, TryAgainError)
_USE_CLUSTER = " (a Redis Cluster node: write redis+cluster://host:port[,host:port...])"


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


def _cap(limit: int | None) -> int:
    return -1 if limit is None else limit


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _reserve_args(req: ReserveRequest, pool_stamp: str) -> list[str | int]:
    """The script's arguments: as many whatever the number of keys (the key set is in Redis)."""
    args: list[str | int] = [req.model, req.strategy.value, req.now_ms, req.day_end_ms, pool_stamp]
    client = req.client
    args += [req.provider, _cap(req.budget)]
    if client is None:
        return [*args, -1, -1, -1, -1, 0, "", -1, 0, 0, -1, 0]
    args += [_cap(client.daily_tokens), _cap(client.daily_budget), _cap(client.rpm)]
    args += [_cap(client.tpm), int(client.count_rate)]
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


def _no_retry() -> Retry:
    """No command is sent twice: a script whose reply was lost may have run, and a settle run
    twice would give a call back twice. The next call reconnects (and a Cluster client finds
    the slot's master again); MOVED and ASK, which say the command did not run, are followed."""
    return Retry(NoBackoff(), 0)


def _no_maintenance() -> MaintNotificationsConfig:
    """Off: redis-py 8 turns on "maintenance notifications" (a Redis Enterprise feature) by
    default with RESP3. They cost a handshake command per connection, and while they are on
    its pools hand out a connection the server closed (a restarted Redis) without checking it
    first, so the next call after a restart would fail."""
    return MaintNotificationsConfig(enabled=False)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    """HGETALL as a script returns it (field, value, field, value, ...) as a dict."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


class _Sentinel(Sentinel):
    """redis-py's Sentinel client, with a master lookup safe for concurrent callers.

    redis-py's discover_master moves the sentinel that answered to the front of
    ``self.sentinels`` by swapping two positions read before an await. Concurrent lookups
    (during a failover every connection opened makes one) then leave one sentinel's client
    twice in the list and another's not at all: from then on fewer sentinels are asked, and
    the lost client is never closed. Here the one that answered moves to the front by
    identity, with no await in between. Otherwise the same: sentinels asked in turn, the first
    that names a master that is not down wins.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for sentinel in list(self.sentinels):
            try:
                masters: Any = await sentinel.sentinel_masters()  # name -> state
            except (RedisConnectionError, RedisTimeoutError) as exc:
                errors.append(f"{sentinel} - {exc!r}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                if sentinel in self.sentinels:
                    self.sentinels.remove(sentinel)
                    self.sentinels.insert(0, sentinel)
                ip = state["ip"] if self._force_master_ip is None else self._force_master_ip
                return ip, int(state["port"])
        why = f" : {', '.join(errors)}" if errors else ""
        raise MasterNotFoundError(f"No master found for {service_name!r}{why}")


def connect(url: str, *, timeout: float, max_connections: int) -> tuple[Client, Sentinel | None]:
    """A redis-py client for the topology ``url`` names, and the Sentinel client behind it.

    Every connect is bounded by ``timeout`` and no command is retried (``_no_retry``); reads
    are bounded by RedisStore's deadline of each call, and also by ``timeout`` where a timely
    redis-py TimeoutError matters: a Cluster client refreshes its topology on one (it does
    not on a cancelled read), and a Sentinel lookup moves on to the next sentinel. On one
    server and a Sentinel's master, no per-read timer and no waiting pool: redis-py's
    socket_timeout (a task per write, a timer per read) and its blocking pool (a lock per
    checkout) each cost about as much CPU as the rest of a command; RedisStore keeps the
    calls in flight below ``max_connections`` itself. Nothing connects until the first
    command.
    """
    scheme, _ = split_scheme(url)
    if scheme in SERVER_SCHEMES:
        pool = ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            decode_responses=True,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=_no_retry(),
            maint_notifications_config=_no_maintenance(),
        )
        return Redis.from_pool(pool), None
    target = parse_redis_url(url)
    options = dict(target.options)
    sentinel_auth: dict[str, Any] = {
        "username": options.pop("sentinel_username", None),
        "password": options.pop("sentinel_password", None),
    }
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "retry": _no_retry(),
        "maint_notifications_config": _no_maintenance(),
        "ssl": target.tls,
        **options,  # client_name and ssl_*: urls.py accepts no other
    }
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.topology == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            # The deployment needs its one slot, not all 16384: a shard lost elsewhere in the
            # cluster does not stop it.
            require_full_coverage=False,
            # A MOVED is followed and patches that slot's owner; never a whole-client close
            # (redis-py closes every node's connections after N MOVED, in-flight calls too).
            # A lost node still refreshes the whole topology (on the next call).
            reinitialize_steps=0,
            max_connections=max_connections,  # per node; RedisStore keeps below it
            decode_responses=True,
            socket_timeout=timeout,
            **auth,
            **common,
        )
        return cluster, None
    assert target.service is not None
    # (redis-py's Sentinel.__init__ has annotations from 8.2 on, none before)
    sentinel = _Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        target.hosts, sentinel_kwargs={"socket_timeout": timeout, **common, **sentinel_auth}
    )
    master = sentinel.master_for(
        target.service,
        redis_class=Redis,
        db=target.db,
        max_connections=max_connections,
        decode_responses=True,
        **auth,
        **common,
    )
    return master, sentinel


class RedisStore:
    """Day, disabled and clients maps as Redis hashes, all under one hash tag (see keys.py).

    Given a URL the store owns its client (``connect``: standalone, Cluster or Sentinel) and
    closes it; a client passed in (a ``Redis`` or a ``RedisCluster``) is used as configured
    and left open. At most ``max_connections`` calls are in flight at once; any failure of a
    call becomes a StoreError in ``_io``, within a bounded time. ``clock`` (Unix ms) is only
    the default ``now`` of client_usage: Redis expires tasks.
    """

    def __init__(
        self,
        redis: str | Client,
        *,
        prefix: str = k.DEFAULT_PREFIX,
        socket_timeout: float = SOCKET_TIMEOUT_S,
        max_connections: int = 64,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._clock = clock
        self._sentinels: list[Redis] = []  # the clients of the sentinels, closed by aclose
        if isinstance(redis, str):
            self._where = mask_url(redis)
            self._client, sentinel = connect(
                redis, timeout=socket_timeout, max_connections=max_connections
            )
            if sentinel is not None:
                self._sentinels = list(sentinel.sentinels)
            self._owns_client = True
        else:
            self._where = "client"
            self._client = redis
            self._owns_client = False
        # A Cluster client routes a command by its keys only once it knows the topology; a
        # command issued while it does not (first use, or after a node was lost) would go to
        # any node and be MOVED. So every call first awaits initialize(), which returns at
        # once when the topology is known and otherwise waits for the one refresh under way.
        self._cluster = isinstance(self._client, RedisCluster)
        self._discover: Callable[[], Awaitable[Any]] | None = (
            self._client.initialize if isinstance(self._client, RedisCluster) else None
        )
        self._prefix = prefix
        self._keysets = KeySets()
        self._timeout = socket_timeout
        one_server = not self._cluster and not self._sentinels
        self._deadline = socket_timeout * (1 if one_server else CALL_TIMEOUTS)
        self._in_flight = asyncio.Semaphore(max_connections)
        self._answered = 0  # calls that got an answer: a turn's wait goes on while this moves
        # register_script: EVALSHA, and SCRIPT LOAD + EVALSHA only after a NOSCRIPT (the
        # script did not run then). A Cluster client loads it on every master.
        register = self._client.register_script
        self._reserve_script = register(_lua("reserve.lua"))
        self._settle_script = register(_lua("settle.lua"))
        self._snapshot_script = register(_lua("snapshot.lua"))
        self._disable_script = register(_lua("disable.lua"))
        self._enable_script = register(_lua("enable.lua"))
        self._client_usage_script = register(_lua("client_usage.lua"))
        self._reset_key_script = register(_lua("reset_key.lua"))
        self._heartbeat_script = register(_lua("heartbeat.lua"))
        self._writeback_script = register(_lua("writeback.lua"))
        self._usage_script = register(_lua("usage.lua"))

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self._prefix!r})"

    def _keys(self, provider: str, day: str) -> list[str]:
        return [
            k.day_key(self._prefix, provider, day),
            k.disabled_key(self._prefix, provider),
            k.clients_key(self._prefix, day),
        ]

    async def _io(self, call: Callable[[], Awaitable[T]], *, command: bool = True) -> T:
        """The one boundary where Redis errors become StoreError, for every call.

        Bounded: waiting for a turn (at most max_connections calls in flight, see _take_turn)
        gives up after one socket timeout in which no call got an answer, and the call itself
        takes at most one socket timeout (one server) or CALL_TIMEOUTS of
        them (a Cluster's topology refresh, a Sentinel's master lookup, then the command),
        whatever redis-py does inside: a call cut off at its deadline closes its connection
        (redis-py drops a connection whose reply is cancelled), so no late reply is read by
        another call.
        ``command`` False: not a command to Redis (closing), so no topology is looked up.
        """
        in_flight = self._in_flight
        try:
            await self._take_turn()
            try:
                async with asyncio.timeout(self._deadline):
                    if command and self._discover is not None:
                        await self._discover()
                    result = await call()
                self._answered += 1
                return result
            finally:
                in_flight.release()
        except Exception as exc:  # every failure of the client (see above)
            raise StoreError(f"redis {self._where}: {self._describe(exc)}") from exc

    async def _take_turn(self) -> None:
        """Take one of the max_connections turns. A burst (a thousand requests arriving at
        once) waits as long as calls keep getting answers; when none got one for a whole
        socket timeout, Redis is stuck, and the wait ends with a TimeoutError. A waiter keeps
        its place in the queue while it checks (the turns are first come, first served)."""
        in_flight = self._in_flight
        if not in_flight.locked():
            await in_flight.acquire()  # a free turn: taken at once
            return
        turn = asyncio.ensure_future(in_flight.acquire())
        taken = False
        try:
            while True:
                answered = self._answered
                done, _ = await asyncio.wait({turn}, timeout=self._timeout)
                if done:
                    taken = turn.result()
                    return
                if self._answered == answered:
                    raise TimeoutError
        finally:
            if not taken:
                if not turn.done():
                    turn.cancel()  # the semaphore passes a turn given meanwhile on
                elif not turn.cancelled() and turn.exception() is None:
                    in_flight.release()

    def _describe(self, exc: BaseException) -> str:
        if type(exc) is TimeoutError:  # asyncio.timeout's: no text of its own
            return f"TimeoutError: no answer within {self._deadline:g} s"
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, _CLUSTER_REPLIES) and not self._cluster:
            text += _USE_CLUSTER
        return text

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        ks = self._keysets.of(req.keys, req.strategy)
        p, provider, day = self._prefix, req.provider, req.day
        keys = [
            *self._keys(provider, day),
            k.keyset_key(p, ks.digest),
            k.index_key(p, provider, day, ks.digest, req.model),
            k.cooling_index_key(p, provider, day, ks.digest, req.model),
            k.epoch_key(p, provider),
            k.pool_key(p, provider, day),
            k.rates_key(p),
        ]
        args = _reserve_args(req, ks.pool_stamp)
        reply = await self._io(lambda: self._reserve_script(keys=keys, args=args))
        if int(reply[0]) == -1:  # a key set Redis has not seen (or lost): store it, ask again
            await self._io(lambda: self._client.hset(keys[3], mapping=ks.entries))
            reply = await self._io(lambda: self._reserve_script(keys=keys, args=args))
        return _reserve_outcome(req, reply)

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        keys = [*self._keys(res.provider, res.day), k.epoch_key(self._prefix, res.provider)]
        args = _settle_args(res, settlement, now_ms)
        reply = await self._io(lambda: self._settle_script(keys=keys, args=args))
        return _settle_result(reply)

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        """One script (lua/usage.lua), applied once per ``token``."""
        if not records:
            return
        changes = spending.changes_of(records)
        p = self._prefix
        keys = [k.usage_batch_key(p, token), k.rates_key(p)]
        maps: list[str | int] = []
        now_ms = max(r.at_ms for r in records)
        for day, c in changes.days.items():
            # As reserve.lua: the maps live a day past the reset, a duration from our clock.
            ttl = max(c.day_end_ms + DAY_MS - now_ms, DAY_MS)
            targets = [
                (k.usage_key(p, day), c.usage),
                (k.clients_key(p, day), c.clients),
                *(
                    (k.day_key(p, provider, day), {k.COST_FIELD: cost})
                    for provider, cost in c.providers.items()
                ),
            ]
            for key, increments in targets:
                if increments:
                    keys.append(key)
                    maps += [ttl, len(increments)]
                    for field, delta in increments.items():
                        maps += [field, delta]
        args: list[str | int] = [USAGE_BATCH_TTL_MS, RATES_TTL_MS, len(keys) - 2, *maps]
        tpm = [(client, at, n) for client, added in changes.tpm.items() for at, n in added]
        args.append(len(tpm))
        for client, at_ms, tokens in tpm:
            args += [k.client_tpm_field(client), at_ms, tokens]
        await self._io(lambda: self._usage_script(keys=keys, args=args))

    async def usage(self, day: str) -> list[UsageRow]:
        fields = await self._io(lambda: self._client.hgetall(k.usage_key(self._prefix, day)))
        return spending.rows_of({_text(f): _text(v) for f, v in fields.items()})

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        maps = self._keys(provider, day)[:2]  # one script: one round trip, one consistent view
        fields, disabled = await self._io(lambda: self._snapshot_script(keys=maps))
        return logic.summarize(
            provider, _pairs(fields), _pairs(disabled), keys, now_ms, model_limits
        )

    async def enable(self, provider: str, key: str) -> None:
        maps = [k.disabled_key(self._prefix, provider), k.epoch_key(self._prefix, provider)]
        await self._io(lambda: self._enable_script(keys=maps, args=[key]))

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        maps = [k.disabled_key(self._prefix, provider), k.epoch_key(self._prefix, provider)]
        args = [key, logic.disabled_record(fingerprint, reason)]
        # one script: read and write at once
        before = await self._io(lambda: self._disable_script(keys=maps, args=args))
        was = {} if before is None else {key: _text(before)}
        newly, _ = logic.disable_on(was, key, fingerprint, reason)
        return newly

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        maps = [k.day_key(self._prefix, provider, day), k.epoch_key(self._prefix, provider)]
        await self._io(lambda: self._reset_key_script(keys=maps, args=[key]))

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
        maps = [
            k.clients_key(self._prefix, day),
            *(k.day_key(self._prefix, provider, day) for provider in free),
        ]
        # one script: one round trip, one consistent view
        client_map, *values = await self._io(
            lambda: self._client_usage_script(keys=maps, args=wanted)
        )
        providers = {
            provider: {f: _text(v) for f, v in zip(wanted, got, strict=True) if v is not None}
            for provider, got in zip(free, values, strict=True)
        }
        return logic.client_usages(_pairs(client_map), providers, clients, free, now)

    async def remember_task(self, task_id: str, value: str, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, not {ttl_ms}")
        task = k.task_key(self._prefix, task_id)
        await self._io(lambda: self._client.set(task, value, px=ttl_ms))

    async def recall_task(self, task_id: str) -> str | None:
        task = k.task_key(self._prefix, task_id)
        value = await self._io(lambda: self._client.get(task))
        return None if value is None else _text(value)

    async def ping(self) -> None:
        if self._cluster:
            # PING would go to any node: ask the master of this deployment's slot instead.
            replicas = k.replicas_key(self._prefix)
            await self._io(lambda: self._client.exists(replicas))
        else:
            await self._io(self._client.ping)

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
        reply = await self._io(lambda: self._heartbeat_script(keys=keys, args=args))
        read = {
            where: {
                field: None if value is None else _text(value)
                for field, value in zip(wanted, got, strict=True)
            }
            for (where, wanted), got in zip(reads.items(), reply[1:], strict=True)
        }
        return int(reply[0]), read

    async def forget_replica(self, replica: str) -> None:
        replicas = k.replicas_key(self._prefix)
        await self._io(lambda: self._client.hdel(replicas, replica))

    async def write_back(self, token: str, batch: Sequence[DayDeltas]) -> bool:
        """Add ``batch`` to the day maps in one script, once per ``token``.

        True when applied now; False when a call with this token applied it before (its
        reply was lost), so a retry never counts twice.
        """
        keys = [k.writeback_key(self._prefix, token)]
        # A write-back may come long after the day it counts: the maps live two days from it
        # (a day map's writes all fall within a day of its end, so that keeps yesterday
        # readable), a duration that needs no clock here.
        args: list[str | int] = [2 * DAY_MS, 2 * DAY_MS, len(batch)]
        providers = dict.fromkeys(e.provider for e in batch if e.provider is not None)
        for entry in batch:
            deltas = [(field, delta) for field, delta in entry.deltas.items() if delta]
            if entry.provider is None:
                keys.append(k.clients_key(self._prefix, entry.day))
            else:
                keys.append(k.day_key(self._prefix, entry.provider, entry.day))
            args.append(len(deltas))
            for field, delta in deltas:
                args += [field, delta]
        keys += [k.epoch_key(self._prefix, provider) for provider in providers]
        reply = await self._io(lambda: self._writeback_script(keys=keys, args=args))
        return int(reply) == 1

    async def aclose(self) -> None:
        if not self._owns_client:
            return
        try:
            await self._io(self._client.aclose, command=False)
        finally:
            # The clients of the sentinels themselves (Sentinel.aclose is recent in redis-py:
            # closed one by one here).
            for client in self._sentinels:
                await self._io(client.aclose, command=False)
