"""Quota gauges read from the store, so every replica reports the same, right numbers."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Container
from datetime import datetime

from router.auth import OPEN_CLIENT
from router.config import Settings
from router.metrics import QUOTA_SERIES, Metrics
from router.pool import KeyPool
from router.quota.days import next_reset, quota_day, to_ms
from router.quota.store import QuotaStore, StoreError
from router.quota.types import KeyState, KeyUsage
from router.status import DayUsage, money

log = logging.getLogger("router.quota_metrics")

PACE_WINDOW_SECONDS = 3600.0
STATES = tuple(KeyState)


class Pace:
    """Pool usage samples of the last hour: how fast the pool is being spent."""

    def __init__(self, window: float = PACE_WINDOW_SECONDS) -> None:
        self.window = window
        self._samples: deque[tuple[float, str, int]] = deque()

    def add(self, at: float, day: str, used: int) -> None:
        self._samples.append((at, day, used))
        while self._samples and self._samples[0][0] < at - self.window:
            self._samples.popleft()

    def rate(self) -> float:
        """Calls per second over the window, within the current quota day only."""
        if not self._samples:
            return 0.0
        last_at, day, last_used = self._samples[-1]
        first = next((s for s in self._samples if s[1] == day), None)
        if first is None or last_at <= first[0]:
            return 0.0
        return max(0.0, (last_used - first[2]) / (last_at - first[0]))


def forecast_seconds(remaining: int, rate: float, until_reset: float) -> float:
    """Seconds until ``remaining`` calls are spent at ``rate``; +Inf when not before the reset."""
    if remaining <= 0:
        return 0.0
    if rate <= 0:
        return math.inf
    seconds = remaining / rate
    return seconds if seconds < until_reset else math.inf


class QuotaReporter:
    def __init__(
        self,
        settings: Settings,
        store: QuotaStore,
        pool: KeyPool,
        metrics: Metrics,
        clock: Callable[[], datetime],
        known_models: Callable[[], Container[str]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.known_models = known_models
        self.paces = {p.name: Pace() for p in settings.providers}

    async def refresh(self) -> bool:
        """Read every provider's usage from the store into the gauges; False if it is away."""
        now = self.clock()
        tz, reset_time = self.settings.quota.tz, self.settings.quota.reset_time
        day = quota_day(now, tz, reset_time)
        reset = next_reset(now, tz, reset_time)
        try:
            usages = {
                p.name: await self.store.snapshot(
                    p.name, self.pool.default_specs(p), day, to_ms(now), p.model_limits
                )
                for p in self.settings.providers
            }
            spent = DayUsage.of(self.settings, await self.store.usage(day))
        except StoreError as exc:
            self.metrics.store_up.set(0)
            log.warning("quota store unreachable for metrics: %s", exc)
            return False
        self.metrics.store_up.set(1)
        self.metrics.reset_timestamp.set(reset.timestamp())
        until_reset = (reset - now).total_seconds()
        rows: dict[str, list[tuple[tuple[str, ...], float]]] = {n: [] for n in QUOTA_SERIES}
        for provider, keys in usages.items():
            self._report_provider(rows, provider, keys, now.timestamp(), day, until_reset)
        self.metrics.quota.replace(rows)  # keys and models that went away leave no series
        self._report_spending(spent)
        return True

    def _report_spending(self, spent: DayUsage) -> None:
        """Tokens and cost of the quota day; every series is set anew (no await in between), so
        providers and clients a reload removed leave no series. Labels: configured names only
        (or the open gateway's client), whatever the store holds."""
        m = self.metrics
        for gauge in (m.cost_today, m.budget, m.client_tokens_today, m.client_cost_today):
            gauge.clear()
        paid_currencies = set()
        for provider in self.settings.providers:
            currency = provider.currency
            m.cost_today.labels(provider.name, currency).set(
                money(spent.provider(provider.name).cost)
            )
            if provider.daily_budget is not None:
                m.budget.labels(provider.name, currency).set(provider.daily_budget)
            if provider.is_paid:
                paid_currencies.add(currency)
        clients = [c.name for c in self.settings.clients] or [OPEN_CLIENT]
        for client in clients:
            m.client_tokens_today.labels(client).set(spent.client(client).total)
            costs = dict.fromkeys(paid_currencies, 0.0) | spent.client_cost(client)
            for currency, cost in costs.items():
                m.client_cost_today.labels(client, currency).set(cost)

    def _report_provider(
        self,
        rows: dict[str, list[tuple[tuple[str, ...], float]]],
        provider: str,
        keys: list[KeyUsage],
        now: float,
        day: str,
        until_reset: float,
    ) -> None:
        config = self.settings.provider(provider)
        limits = config.model_limits
        defaults = {k.name: config.default_model_limit(k) for k in config.keys}
        known = self.known_models()
        for usage in keys:
            key = (provider, usage.key)
            rows["router_quota_used"].append((key, usage.used))
            if usage.limit is not None:
                rows["router_quota_limit"].append((key, usage.limit))
                rows["router_quota_remaining"].append((key, usage.remaining or 0))
            for state in STATES:
                rows["router_key_state"].append(
                    ((*key, state.value), 1 if usage.state is state else 0)
                )
            cooling = (
                usage.until_ms / 1000 if usage.state is KeyState.COOLING and usage.until_ms else 0
            )
            rows["router_key_cooldown_until_timestamp_seconds"].append((key, cooling))
            default = defaults.get(usage.key)
            for model in usage.models:
                if model.model not in known:
                    continue  # bounded labels: only models the gateway knows
                labels = (*key, model.model)
                rows["router_model_quota_used"].append((labels, model.used))
                limit = limits.get(model.model, default)
                if limit is not None:
                    rows["router_model_quota_limit"].append((labels, limit))
                    rows["router_model_quota_remaining"].append(
                        (labels, max(0, limit - model.used))
                    )
        self._forecast(provider, keys, now, day, until_reset)

    def _forecast(
        self, provider: str, keys: list[KeyUsage], now: float, day: str, until_reset: float
    ) -> None:
        pace = self.paces.setdefault(provider, Pace())
        pace.add(now, day, sum(k.used for k in keys))
        usable = [k for k in keys if k.state is not KeyState.DISABLED]
        if any(k.limit is None for k in usable):
            seconds = math.inf  # an uncapped key: the pool does not run out by count
        else:
            remaining = sum(
                0 if k.state is KeyState.EXHAUSTED else (k.remaining or 0) for k in usable
            )
            seconds = forecast_seconds(remaining, pace.rate(), until_reset)
        self.metrics.exhaustion_forecast.labels(provider).set(seconds)
