"""A QuotaStore in process memory: for tests and single-process runs without persistence."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from router.quota import keys as k
from router.quota import logic, rates, spending
from router.quota.days import previous_day, wall_clock_ms
from router.quota.types import (
    ClientUsage,
    FairShare,
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
    UsageRecord,
    UsageRow,
)

CLIENTS = ""  # the clients day map's place among the provider maps (no provider is named "")
USAGE = ":usage"  # the usage maps' place (no provider name holds ':')


class MemoryStore:
    """Day maps and disabled maps in dicts; each call runs without awaiting, so it is atomic.

    ``clock`` (Unix ms) decides when a remembered task expires and is the default ``now``
    of client_usage.
    """

    def __init__(self, *, clock: Callable[[], int] = wall_clock_ms) -> None:
        # (provider, day) -> day map; (CLIENTS, day) -> the clients day map
        self._days: dict[tuple[str, str], dict[str, str]] = {}
        self._disabled: dict[str, dict[str, str]] = {}
        self._tasks: dict[str, tuple[str, int]] = {}  # task id -> (value, expires at ms)
        self._rates: dict[str, str] = {}  # the per-minute windows (router.quota.rates)
        self._batches: set[str] = set()  # usage batches already added
        self._clock = clock

    def __repr__(self) -> str:
        return f"MemoryStore(days={len(self._days)})"

    def _fields(self, provider: str, day: str) -> dict[str, str]:
        return self._days.get((provider, day), {})

    def _write(self, provider: str, day: str, changed: Mapping[str, str]) -> None:
        if not changed:
            return
        if (provider, day) not in self._days:
            self._drop_before_yesterday(provider, day)
        self._days.setdefault((provider, day), {}).update(changed)

    def _drop_before_yesterday(self, provider: str, day: str) -> None:
        """Counters expire by themselves, as in Redis: yesterday stays readable."""
        yesterday = previous_day(day)
        if yesterday is None:
            return
        for stale in [pd for pd in self._days if pd[0] == provider and pd[1] < yesterday]:
            del self._days[stale]

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        outcome, changed, changed_clients, changed_rates = logic.reserve_on(
            self._fields(req.provider, req.day),
            self._disabled.get(req.provider, {}),
            self._fields(CLIENTS, req.day),
            req,
            self._rates,
        )
        self._write(req.provider, req.day, changed)
        self._write(CLIENTS, req.day, changed_clients)
        self._rates.update(changed_rates)
        return outcome

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        if token in self._batches:
            return
        if len(self._batches) >= 100_000:  # bounded: a retried batch comes back within seconds
            self._batches.clear()
        self._batches.add(token)
        changes = spending.changes_of(records)
        for day, c in changes.days.items():
            self._write(USAGE, day, spending.add_to(self._fields(USAGE, day), c.usage))
            self._write(CLIENTS, day, spending.add_to(self._fields(CLIENTS, day), c.clients))
            for provider, cost in c.providers.items():
                fields = self._fields(provider, day)
                self._write(provider, day, spending.add_to(fields, {k.COST_FIELD: cost}))
        for client, added in changes.tpm.items():
            field = k.client_tpm_field(client)
            for at_ms, tokens in added:
                kept, _ = rates.window(self._rates.get(field), at_ms)
                self._rates[field] = rates.add(kept, at_ms, tokens)

    async def usage(self, day: str) -> list[UsageRow]:
        return spending.rows_of(self._fields(USAGE, day))

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        result, changed, changed_disabled, changed_clients = logic.settle_on(
            self._fields(res.provider, res.day),
            self._disabled.get(res.provider, {}),
            self._fields(CLIENTS, res.day),
            res,
            settlement,
            now_ms,
        )
        self._write(res.provider, res.day, changed)
        self._write(CLIENTS, res.day, changed_clients)
        if changed_disabled:
            self._disabled.setdefault(res.provider, {}).update(changed_disabled)
        return result

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        return logic.summarize(
            provider,
            self._fields(provider, day),
            self._disabled.get(provider, {}),
            keys,
            now_ms,
            model_limits,
        )

    async def enable(self, provider: str, key: str) -> None:
        self._disabled.get(provider, {}).pop(key, None)

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        disabled = self._disabled.setdefault(provider, {})
        newly, record = logic.disable_on(disabled, key, fingerprint, reason)
        disabled[key] = record
        return newly

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        fields = self._days.get((provider, day), {})
        for field in logic.key_fields(list(fields), key):
            del fields[field]

    async def client_usage(
        self,
        day: str,
        clients: Sequence[str],
        free: Mapping[str, FairShare] | None = None,
        now_ms: int | None = None,
    ) -> list[ClientUsage]:
        free = free or {}
        providers = {provider: self._fields(provider, day) for provider in free}
        now = self._clock() if now_ms is None else now_ms
        return logic.client_usages(self._fields(CLIENTS, day), providers, clients, free, now)

    async def remember_task(self, task_id: str, value: str, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, not {ttl_ms}")
        now = self._clock()
        for stale in [t for t, (_, expires) in self._tasks.items() if expires <= now]:
            del self._tasks[stale]
        self._tasks[task_id] = (value, now + ttl_ms)

    async def recall_task(self, task_id: str) -> str | None:
        value, expires = self._tasks.get(task_id, (None, 0))
        return value if expires > self._clock() else None

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
