"""A QuotaStore in process memory: for tests and single-process runs without persistence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from router.quota import logic
from router.quota.types import (
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)


def _previous_day(day: str) -> str | None:
    try:
        parsed = datetime.strptime(day, "%Y%m%d")
    except ValueError:
        return None
    return (parsed - timedelta(days=1)).strftime("%Y%m%d")


class MemoryStore:
    """Day maps and disabled maps in dicts; each call runs without awaiting, so it is atomic."""

    def __init__(self) -> None:
        self._days: dict[tuple[str, str], dict[str, str]] = {}
        self._disabled: dict[str, dict[str, str]] = {}

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
        yesterday = _previous_day(day)
        if yesterday is None:
            return
        for stale in [pd for pd in self._days if pd[0] == provider and pd[1] < yesterday]:
            del self._days[stale]

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        fields = self._fields(req.provider, req.day)
        outcome, changed = logic.reserve_on(fields, self._disabled.get(req.provider, {}), req)
        self._write(req.provider, req.day, changed)
        return outcome

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        disabled = self._disabled.get(res.provider, {})
        result, changed, changed_disabled = logic.settle_on(
            self._fields(res.provider, res.day), disabled, res, settlement, now_ms
        )
        self._write(res.provider, res.day, changed)
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

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
