"""Pure state of the simulated upstreams: quota usage per quota day, counters, tasks.

No aiohttp here. Time comes from an injectable clock (a callable returning Unix seconds);
a quota day is a calendar day in UTC+8 (reset at 00:00 Asia/Shanghai).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, Literal

from router.simulator.config import SimulatorConfig

Clock = Callable[[], float]
Provider = Literal["modelscope", "bailian"]
PROVIDERS: tuple[Provider, ...] = ("modelscope", "bailian")
Quota = Literal["daily", "model"]

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")


def quota_day(ts: float) -> date:
    """The quota day (calendar day in UTC+8) that Unix time ``ts`` falls in."""
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(SHANGHAI).date()


@dataclass(frozen=True, slots=True)
class Account:
    """A ModelScope token or a Bailian key, as the simulator sees it."""

    provider: Provider
    name: str
    secret: str
    status: str  # "ok" or a provider-specific failure status
    daily_limit: int | None
    model_daily_limit: int | None = None
    model_limits: tuple[tuple[str, int], ...] = ()

    def model_limit(self, model: str) -> int | None:
        return dict(self.model_limits).get(model, self.model_daily_limit)


@dataclass(slots=True)
class Usage:
    day: date
    used: int = 0
    models: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The four ModelScope rate-limit numbers for one token and model."""

    limit: int
    remaining: int
    model_limit: int
    model_remaining: int


class ProviderState:
    """Usage and counters of one simulated provider."""

    def __init__(self, provider: Provider, accounts: list[Account], now: Callable[[], float]):
        self.provider: Provider = provider
        self._now = now
        self._by_name = {a.name: a for a in accounts}
        self._by_secret = {a.secret: a for a in accounts}
        self._usage: dict[str, Usage] = {}
        self.calls = 0
        self.rejected: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self.inflight_by_account: Counter[str] = Counter()
        self.prompt_cache: set[str] = set()  # Anthropic prompt prefixes written to the cache

    # -- accounts -------------------------------------------------------------------------
    @property
    def accounts(self) -> list[Account]:
        return list(self._by_name.values())

    def lookup(self, secret: str | None) -> Account | None:
        """The account whose secret is ``secret``."""
        return None if secret is None else self._by_secret.get(secret)

    def find(self, ref: str) -> Account | None:
        """The account named ``ref``, or whose secret is ``ref``."""
        return self._by_name.get(ref) or self._by_secret.get(ref)

    # -- usage ----------------------------------------------------------------------------
    def _current(self, name: str) -> Usage:
        today = quota_day(self._now())
        usage = self._usage.get(name)
        if usage is None or usage.day != today:
            usage = Usage(day=today)
            self._usage[name] = usage
        return usage

    def used(self, name: str) -> int:
        return self._current(name).used

    def model_used(self, name: str, model: str) -> int:
        return self._current(name).models.get(model, 0)

    def over_quota(self, account: Account, model: str) -> Quota | None:
        """Which cap one more call of ``model`` would break, if any."""
        usage = self._current(account.name)
        if account.daily_limit is not None and usage.used >= account.daily_limit:
            return "daily"
        mlimit = account.model_limit(model)
        if mlimit is not None and usage.models.get(model, 0) >= mlimit:
            return "model"
        return None

    def record(self, name: str, model: str) -> None:
        """Count one accepted call."""
        usage = self._current(name)
        usage.used += 1
        usage.models[model] = usage.models.get(model, 0) + 1
        self.calls += 1

    def set_usage(
        self,
        name: str,
        used: int | None = None,
        model: str | None = None,
        model_used: int | None = None,
    ) -> None:
        """Set today's usage (as if the account had been used elsewhere)."""
        usage = self._current(name)
        if used is not None:
            usage.used = max(0, used)
        if model is not None and model_used is not None:
            usage.models[model] = max(0, model_used)

    def rate_limit(self, account: Account, model: str) -> RateLimit:
        limit = account.daily_limit if account.daily_limit is not None else 0
        mlimit = account.model_limit(model)
        mlimit = mlimit if mlimit is not None else 0
        return RateLimit(
            limit=limit,
            remaining=max(0, limit - self.used(account.name)),
            model_limit=mlimit,
            model_remaining=max(0, mlimit - self.model_used(account.name, model)),
        )

    # -- counters -------------------------------------------------------------------------
    def reject(self, status: int) -> None:
        self.rejected[str(status)] += 1

    def fault_fired(self, kind: str) -> None:
        self.faults_fired[kind] += 1

    def enter(self, account: str | None) -> None:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        if account is not None:
            self.inflight_by_account[account] += 1

    def leave(self, account: str | None) -> None:
        self.inflight -= 1
        if account is not None:
            self.inflight_by_account[account] -= 1
            if self.inflight_by_account[account] <= 0:
                del self.inflight_by_account[account]

    def reset(self) -> None:
        """Forget usage and counters (in-flight tracking stays accurate)."""
        self._usage.clear()
        self.prompt_cache.clear()
        self.calls = 0
        self.rejected.clear()
        self.faults_fired.clear()
        self.max_inflight = self.inflight

    def stats(self) -> dict[str, Any]:
        by_token: dict[str, Any] = {}
        for name in self._by_name:
            usage = self._current(name)
            by_token[name] = {"used": usage.used, "models": dict(usage.models)}
        return {
            "calls": self.calls,
            "by_token": by_token,
            "rejected": dict(self.rejected),
            "faults_fired": dict(self.faults_fired),
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "quota_day": quota_day(self._now()).isoformat(),
        }


@dataclass(frozen=True, slots=True)
class ImageTask:
    task_id: str
    account: str
    model: str
    created: float


class SimState:
    """Everything both simulated upstreams remember."""

    def __init__(self, config: SimulatorConfig, clock: Clock | None = None):
        self.config = config
        self._clock: Clock = clock if clock is not None else time.time
        self.clock_offset = 0.0
        self.modelscope = ProviderState("modelscope", _modelscope_accounts(config), self.now)
        self.bailian = ProviderState("bailian", _bailian_accounts(config), self.now)
        self.tasks: dict[str, ImageTask] = {}

    def now(self) -> float:
        return self._clock() + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the simulator's time forward (on top of the injected clock)."""
        self.clock_offset += seconds

    def quota_day(self) -> date:
        return quota_day(self.now())

    def provider(self, provider: Provider) -> ProviderState:
        return self.modelscope if provider == "modelscope" else self.bailian

    def create_task(self, account: str, model: str) -> ImageTask:
        task = ImageTask(uuid.uuid4().hex, account, model, self.now())
        self.tasks[task.task_id] = task
        return task

    def reset(self, provider: Provider | None = None) -> None:
        for p in PROVIDERS if provider is None else (provider,):
            self.provider(p).reset()
        if provider in (None, "modelscope"):
            self.tasks.clear()

    def stats(self, provider: Provider | None = None) -> dict[str, Any]:
        """Stats of one provider, or of both under "modelscope"/"bailian" plus totals."""
        if provider is not None:
            return self.provider(provider).stats()
        parts: dict[str, dict[str, Any]] = {p: self.provider(p).stats() for p in PROVIDERS}
        return {
            "calls": sum(s["calls"] for s in parts.values()),
            **parts,
        }


def _modelscope_accounts(config: SimulatorConfig) -> list[Account]:
    return [
        Account(
            provider="modelscope",
            name=t.name,
            secret=t.secret,
            status=t.status,
            daily_limit=t.daily_limit,
            model_daily_limit=t.model_daily_limit,
            model_limits=tuple(sorted(t.model_limits.items())),
        )
        for t in config.modelscope.tokens
    ]


def _bailian_accounts(config: SimulatorConfig) -> list[Account]:
    return [
        Account(
            provider="bailian",
            name=k.name,
            secret=k.secret,
            status=k.status,
            daily_limit=k.daily_limit,
        )
        for k in config.bailian.keys
    ]
