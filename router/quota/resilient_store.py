"""A Redis QuotaStore that keeps serving while Redis is away (``store.on_error: fail_open``).

The default is ``fail_closed``: exact daily quotas are the product's promise, and a replica
that cannot reach the shared counts cannot know what the other replicas spent, so every
proxied request gets 503 until Redis is back. ``fail_open`` trades some of that exactness
for availability, within these bounds:

Steady state. Every call goes to the primary (RedisStore) unchanged: one EVALSHA per
reserve and per settle, no extra round trip. From each reservation the wrapper only
remembers, in memory, the last known remaining of (provider, key) and of (provider, key,
model) on that quota day (``Reservation.remaining`` / ``model_remaining``, the lowest seen;
a settle that exhausts a key or reads a lower remaining header lowers it too).

Liveness. ``heartbeat_forever`` (spawned by the Runtime) writes this replica's id into the
``{prefix}:replicas`` hash every ``heartbeat_s`` (5 s) with Redis's own clock, and counts the
replicas seen within ``live_window_s`` (30 s). The last count is cached. The same script
(one round trip, off the request path) reads the counts of the keys this replica knows, so
what the other replicas spent lowers the last known remaining within 5 s as well.

Outage. When the primary raises StoreError on a reserve or a settle, the store switches to
a local allowance: a MemoryStore whose limit for each key on the current day is
floor(last known remaining / live replicas), and the same for each (key, model); never
more. A key (or key and model) never seen on that day has an allowance of 0: its remaining
is unknown. A quota day that began after the outage did (the clock crossed the reset)
starts from the full limit divided by the live replicas, as nobody could count on it in
Redis. With no heartbeat ever answered the live count is unknown and every allowance is 0.
Cooldowns, exhaustion and disabled keys learned during the outage stay local. Calls refused
by the allowance say "retry in 5 s" (the store may be back by then), not "until the reset".
Every call counted locally is recorded (per provider, day, key and model, and per client),
and so is every call given back: a local one, or one counted in Redis before the outage
whose release arrives during it (a release whose own settle failed on the primary is not
recorded: its script may have run, and counting a call twice is safe, once too few is not).

Recovery. A background task probes the primary every ``probe_s`` (1 s), never on the
request path. When it answers, the recorded counts are written back in one script
(HINCRBY of ``u|key``, ``m|key|model``, ``t|client``, ``f|client`` in the right day maps,
clamped at 0, with the maps' usual expiry). The batch carries a token, and the script
applies a token once, so a retry after a lost reply never counts twice; the local record is
dropped only after the script answered, and the known remainings are lowered by what was
written (a second outage on the same day starts from what is really left). Reserves wait
for the write-back (one round trip), then go to the primary again. A local reservation
settled after the write-back is settled on the primary, where its call now is.

What is not exact: replicas that lose Redis at different times, or a partition that cuts off
only some replicas, can together spend more than the limit (each spends up to its share of
what it last saw while the others keep counting in Redis); clients' daily limits and fair
shares are checked against local counts only during an outage (the client counts are
written back; fair-share counts are not). Image task ids are not remembered locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from router.quota import keys as k
from router.quota.days import wall_clock_ms
from router.quota.memory_store import MemoryStore
from router.quota.redis_store import DayDeltas, RedisStore
from router.quota.store import ForwardingStore, StoreError
from router.quota.types import (
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)

log = logging.getLogger("router.quota.resilient")

HEARTBEAT_SECONDS = 5.0
LIVE_WINDOW_SECONDS = 30.0
FORGET_REPLICA_SECONDS = 3600.0  # a heartbeat older than this is deleted from the hash
PROBE_SECONDS = 1.0
LOCAL_RETRY_MS = 5_000  # Retry-After of a call the local allowance refuses

Known = tuple[str, int | None]  # (quota day, remaining after the last call seen; None = no cap)


@dataclass(frozen=True, slots=True)
class LocalReservation(Reservation):
    """A call counted in the local allowance of outage ``epoch``.

    Its ``daily_limit``/``model_limit`` are the allowance's; the real limits are kept for a
    settle that arrives after the call was written back to Redis.
    """

    epoch: int = 0
    real_daily_limit: int | None = None
    real_model_limit: int | None = None


def _in_redis(res: Reservation) -> Reservation:
    """``res`` as the primary counts it (a local one: with its real limits)."""
    if not isinstance(res, LocalReservation):
        return res
    values = {f.name: getattr(res, f.name) for f in fields(Reservation)}
    values.update(daily_limit=res.real_daily_limit, model_limit=res.real_model_limit)
    return Reservation(**values)


def _lowest(a: int | None, b: int | None) -> int | None:
    """The lower of two remainings, None meaning no cap."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _note(
    table: dict[tuple[str, ...], Known], where: tuple[str, ...], day: str, left: int | None
) -> None:
    seen = table.get(where)
    if seen is None or seen[0] < day:
        table[where] = (day, left)
    elif seen[0] == day:
        table[where] = (day, _lowest(seen[1], left))


class _Ledger:
    """Calls counted locally and not yet in Redis: per day map, field -> delta."""

    def __init__(self) -> None:
        self._maps: dict[tuple[str | None, str], Counter[str]] = {}

    def add(self, res: Reservation, calls: int) -> None:
        day = self._maps.setdefault((res.provider, res.day), Counter())
        day[k.used_field(res.key)] += calls
        day[k.model_used_field(res.key, res.model)] += calls
        if res.client is not None:
            clients = self._maps.setdefault((None, res.day), Counter())
            clients[k.client_used_field(res.client)] += calls
            if res.free:
                clients[k.client_free_used_field(res.client)] += calls

    def __bool__(self) -> bool:
        return any(any(counts.values()) for counts in self._maps.values())

    def entries(self) -> list[DayDeltas]:
        return [
            DayDeltas(provider, day, {f: n for f, n in counts.items() if n})
            for (provider, day), counts in self._maps.items()
            if any(counts.values())
        ]


@dataclass
class _Outage:
    epoch: int
    day: str  # the quota day when the primary went away
    live: int | None  # live replicas then (the last heartbeat's count)
    local: MemoryStore
    ledger: _Ledger = field(default_factory=_Ledger)
    batch: tuple[str, list[DayDeltas]] | None = None  # being written back: (token, entries)
    reserved: int = 0  # calls served from the allowance (for the log)


class ResilientStore(ForwardingStore):
    """A QuotaStore over a RedisStore that falls back to a local allowance (see the module).
    What it does not override goes to the primary: admin, metrics and tasks see the shared
    truth."""

    def __init__(
        self,
        primary: RedisStore,
        *,
        replica_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_SECONDS,
        live_window_s: float = LIVE_WINDOW_SECONDS,
        probe_s: float = PROBE_SECONDS,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        super().__init__(primary)
        self.primary = primary
        self.replica_id = (
            replica_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self._heartbeat_s = heartbeat_s
        self._live_window_ms = int(live_window_s * 1000)
        self._probe_s = probe_s
        self._clock = clock
        self._key_left: dict[tuple[str, ...], Known] = {}
        self._model_left: dict[tuple[str, ...], Known] = {}
        self._limits: dict[tuple[str, ...], int | None] = {}  # the limits the above were under
        self._latest_day = ""
        self._live: int | None = None
        self._epoch = 0
        self._outage: _Outage | None = None
        self._draining: asyncio.Event | None = None  # set once a write-back attempt ends
        self._recovering = asyncio.Lock()
        self._probe: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"ResilientStore({self.primary!r}, replica={self.replica_id!r})"

    # -- what tests and operators may look at -------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while calls are counted in the local allowance."""
        return self._outage is not None

    @property
    def live_gateways(self) -> int | None:
        """Live replicas at the last heartbeat (None before the first one answered)."""
        return self._live

    def unsynced(self) -> list[DayDeltas]:
        """The calls counted locally and not yet written back."""
        outage = self._outage
        if outage is None:
            return []
        pending = outage.batch[1] if outage.batch is not None else []
        return [*pending, *outage.ledger.entries()]

    # -- the request path ---------------------------------------------------------------------

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        if req.day > self._latest_day:
            self._latest_day = req.day
        if self._draining is not None:
            await self._draining.wait()  # the write-back: one round trip
        outage = self._outage
        if outage is None:
            try:
                outcome = await self.primary.reserve(req)
            except StoreError as exc:
                outage = self._fail(req.day, exc)
            else:
                if isinstance(outcome, Reservation):
                    self._learn(outcome)
                return outcome
        return await self._reserve_locally(outage, req)

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        outage = self._outage
        if isinstance(res, LocalReservation) and outage is not None and res.epoch == outage.epoch:
            result = await outage.local.settle(res, settlement, now_ms)
            if settlement.release:
                outage.ledger.add(res, -1)
            return result
        counted = _in_redis(res)  # in Redis: reserved there, or written back since
        record_release = True
        if outage is None:
            try:
                result = await self.primary.settle(counted, settlement, now_ms)
            except StoreError as exc:
                outage = self._fail(res.day, exc)
                record_release = False  # the script may have run: never give back twice
            else:
                self._learn_settle(counted, settlement, result)
                return result
        local_res = self._as_local(outage, counted)
        result = await outage.local.settle(local_res, replace(settlement, release=False), now_ms)
        if settlement.release and record_release:
            outage.ledger.add(counted, -1)
        return result

    async def aclose(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        if self._outage is not None:
            with contextlib.suppress(StoreError):
                await self.recover()
        if self._outage is not None:
            log.error(
                "closing with calls counted locally that Redis never received: %s",
                self.unsynced(),
            )
        with contextlib.suppress(StoreError):
            await self.primary.forget_replica(self.replica_id)
        await self.primary.aclose()

    # -- liveness -----------------------------------------------------------------------------

    async def heartbeat(self) -> int:
        """Say this replica is alive; returns (and caches) the live replicas.

        The same script reads the counts of every key (and key and model) this replica has
        reserved on: what other replicas spent since lowers the last known remaining.
        """
        forget_ms = int(FORGET_REPLICA_SECONDS * 1000)
        reads = self._reads()
        live, read = await self.primary.heartbeat(
            self.replica_id, self._live_window_ms, forget_ms, reads
        )
        self._live = live
        for (provider, day), values in read.items():
            self._learn_counts(provider, day, values)
        return live

    async def heartbeat_forever(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except StoreError as exc:
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(self._heartbeat_s)

    # -- outage and recovery ------------------------------------------------------------------

    def _fail(self, day: str, exc: StoreError) -> _Outage:
        """Switch to the local allowance (once per outage) and start probing the primary."""
        if self._outage is None:
            self._epoch += 1
            start_day = max(day, self._latest_day)
            self._outage = _Outage(
                self._epoch, start_day, self._live, MemoryStore(clock=self._clock)
            )
            log.error(
                "quota store unreachable (%s): serving from a local allowance of what was left "
                "at the last answer divided by %s live gateway(s); counts are written back "
                "when it returns",
                exc,
                self._live if self._live is not None else "an unknown number of",
            )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_back())
        return self._outage

    async def _probe_until_back(self) -> None:
        while self._outage is not None:
            await asyncio.sleep(self._probe_s)
            try:
                await self.recover()
            except StoreError as exc:
                log.debug("quota store still unreachable: %s", exc)

    async def recover(self) -> None:
        """Write the local counts back and switch to the primary; StoreError while it is away."""
        async with self._recovering:
            outage = self._outage
            if outage is None:
                return
            await self.primary.ping()
            gate = self._draining = asyncio.Event()
            written = 0
            try:
                while True:
                    if outage.batch is None:
                        if not outage.ledger:
                            break
                        outage.batch = (uuid.uuid4().hex, outage.ledger.entries())
                        outage.ledger = _Ledger()
                    token, entries = outage.batch
                    await self.primary.write_back(token, entries)
                    self._learn_written(entries)
                    written += sum(
                        n
                        for e in entries
                        for f, n in e.deltas.items()
                        if f.startswith(k.USED + k.SEP)
                    )
                    outage.batch = None
                # No await since the ledger was last found empty: nothing counted is lost.
                self._outage = None
            finally:
                self._draining = None
                gate.set()
            log.warning(
                "quota store reachable again: %d calls served from the local allowance, "
                "net %d key calls written back",
                outage.reserved,
                written,
            )

    # -- the local allowance ------------------------------------------------------------------

    def _learn(self, res: Reservation) -> None:
        self._limits[(res.provider, res.key)] = res.daily_limit
        self._limits[(res.provider, res.key, res.model)] = res.model_limit
        _note(self._key_left, (res.provider, res.key), res.day, res.remaining)
        _note(self._model_left, (res.provider, res.key, res.model), res.day, res.model_remaining)

    def _reads(self) -> dict[tuple[str, str], list[str]]:
        """Per (provider, day): the fields behind each capped remaining this replica knows."""
        reads: dict[tuple[str, str], list[str]] = {}
        for (provider, key), (day, _) in self._key_left.items():
            if self._limits.get((provider, key)) is not None:
                fields_ = reads.setdefault((provider, day), [])
                fields_ += [k.used_field(key), k.exhausted_field(key)]
        for (provider, key, model), (day, _) in self._model_left.items():
            if self._limits.get((provider, key, model)) is not None:
                fields_ = reads.setdefault((provider, day), [])
                fields_ += [k.model_used_field(key, model), k.model_exhausted_field(key, model)]
        return reads

    def _learn_counts(self, provider: str, day: str, values: Mapping[str, str | None]) -> None:
        """Lower the known remainings to what a day map says (limit - used, 0 if exhausted)."""
        for field_, value in values.items():
            parsed = k.parse_field(field_)
            if parsed is None or parsed.kind not in (k.USED, k.MODEL_USED):
                continue
            where: tuple[str, ...]
            if parsed.model is None:
                table, where = self._key_left, (provider, parsed.key)
                exhausted = k.exhausted_field(parsed.key)
            else:
                table, where = self._model_left, (provider, parsed.key, parsed.model)
                exhausted = k.model_exhausted_field(parsed.key, parsed.model)
            limit = self._limits.get(where)
            if limit is None:
                continue
            used = 0 if value is None else int(value)
            _note(table, where, day, 0 if values.get(exhausted) is not None else limit - used)

    def _learn_written(self, entries: Sequence[DayDeltas]) -> None:
        """The calls just written back are spent: lower the known remainings by them."""
        for entry in entries:
            if entry.provider is None:
                continue
            for field_, calls in entry.deltas.items():
                parsed = k.parse_field(field_)
                if parsed is None or parsed.kind not in (k.USED, k.MODEL_USED):
                    continue
                where: tuple[str, ...]
                if parsed.model is None:
                    table, where = self._key_left, (entry.provider, parsed.key)
                else:
                    table, where = self._model_left, (entry.provider, parsed.key, parsed.model)
                seen = table.get(where)
                if seen is not None and seen[0] == entry.day and seen[1] is not None:
                    table[where] = (entry.day, seen[1] - calls)

    def _learn_settle(self, res: Reservation, s: Settlement, result: SettleResult) -> None:
        key_left = 0 if result.exhausted == "key" else s.remaining
        model_left = 0 if result.exhausted == "model" else s.model_remaining
        if key_left is not None:
            _note(self._key_left, (res.provider, res.key), res.day, key_left)
        if model_left is not None:
            _note(self._model_left, (res.provider, res.key, res.model), res.day, model_left)

    def _allowance(
        self, outage: _Outage, known: Known | None, day: str, limit: int | None
    ) -> int | None:
        """This replica's calls for ``day`` while the primary is away; None = no cap."""
        if limit is None:
            return None
        if known is not None and known[0] == day:
            left = limit if known[1] is None else min(known[1], limit)
        elif day > outage.day:
            left = limit  # a day that began during the outage: nobody counted on it in Redis
        else:
            return 0  # never seen today: unknown, so nothing
        if outage.live is None or outage.live < 1:
            return 0
        return max(0, left) // outage.live

    def _local_limits(
        self,
        outage: _Outage,
        provider: str,
        key: str,
        model: str,
        day: str,
        spec_limits: tuple[int | None, int | None],
    ) -> tuple[int | None, int | None]:
        daily_limit, model_limit = spec_limits
        return (
            self._allowance(outage, self._key_left.get((provider, key)), day, daily_limit),
            self._allowance(outage, self._model_left.get((provider, key, model)), day, model_limit),
        )

    def _as_local(self, outage: _Outage, res: Reservation) -> Reservation:
        daily, model = self._local_limits(
            outage, res.provider, res.key, res.model, res.day, (res.daily_limit, res.model_limit)
        )
        return replace(res, daily_limit=daily, model_limit=model)

    async def _reserve_locally(
        self, outage: _Outage, req: ReserveRequest
    ) -> Reservation | NoCapacity:
        specs = []
        for spec in req.keys:
            daily, model = self._local_limits(
                outage,
                req.provider,
                spec.name,
                req.model,
                req.day,
                (spec.daily_limit, spec.model_limit),
            )
            specs.append(replace(spec, daily_limit=daily, model_limit=model))
        outcome = await outage.local.reserve(replace(req, keys=tuple(specs)))
        if isinstance(outcome, NoCapacity):
            if outcome.reason is Refusal.KEYS:
                retry_at = req.now_ms + LOCAL_RETRY_MS
                if outcome.retry_at_ms is not None:
                    retry_at = min(retry_at, outcome.retry_at_ms)
                outcome = replace(outcome, retry_at_ms=retry_at)
            return outcome
        real = next(spec for spec in req.keys if spec.name == outcome.key)
        values = {f.name: getattr(outcome, f.name) for f in fields(Reservation)}
        local = LocalReservation(
            **values,
            epoch=outage.epoch,
            real_daily_limit=real.daily_limit,
            real_model_limit=real.model_limit,
        )
        outage.ledger.add(local, 1)
        outage.reserved += 1
        return local
