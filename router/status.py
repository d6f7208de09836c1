"""The quota and client status documents, and their rendering as tables.

One builder for every view: ``GET /admin/quota`` and ``GET /admin/clients`` answer these
documents, ``modelscope-router status --config`` builds them from the store directly, and
``status --url`` fetches them; ``render`` draws either as rich tables. Key names only: a
document never holds a secret.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from router.clients import ClientPolicy
from router.config import ClientConfig, ProviderConfig, Settings
from router.pool import KeyPool
from router.pricing import from_nanos, to_nanos
from router.quota.days import next_reset, previous_day, quota_day, to_ms
from router.quota.store import QuotaStore
from router.quota.types import ClientUsage, FairShare, KeyState, KeyUsage, ModelUsage, UsageRow

Document = dict[str, Any]


def moment(ms: int, tz: ZoneInfo) -> Document:
    """A point in time for people (ISO 8601 in the quota's zone) and for scripts (Unix s)."""
    at = datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)
    return {"iso": at.isoformat(timespec="seconds"), "unix": round(ms / 1000, 3)}


def iso_day(day: str) -> str:
    """ "20261129" -> "2026-11-29"."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def _remaining(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(0, limit - used)


def money(nanos: int) -> float:
    """Nanos of a currency as an amount (rounded to the nano, so 0.1 + 0.2 reads 0.3)."""
    return round(from_nanos(nanos), 9)


def budget_left(budget: float | None, spent_nanos: int) -> float | None:
    """What is left of a daily budget (money) after ``spent_nanos``; None when there is none."""
    return None if budget is None else money(max(0, to_nanos(budget) - spent_nanos))


@dataclass(slots=True)
class Tally:
    """Tokens and cost (nanos) summed over usage rows."""

    prompt: int = 0
    completion: int = 0
    total: int = 0
    cost: int = 0

    def add(self, row: UsageRow) -> None:
        self.prompt += row.prompt
        self.completion += row.completion
        self.total += row.total
        self.cost += row.cost

    def tokens(self) -> Document:
        return {"prompt": self.prompt, "completion": self.completion, "total": self.total}


@dataclass(slots=True)
class DayUsage:
    """A quota day's usage rows (``QuotaStore.usage``) summed per provider, key and client.

    A client's cost is kept per currency (each provider bills in its own); a row of a provider
    the config no longer has counts in the currency client budgets are in.
    """

    providers: dict[str, Tally] = field(default_factory=dict)
    keys: dict[tuple[str, str], Tally] = field(default_factory=dict)
    clients: dict[str, Tally] = field(default_factory=dict)
    client_costs: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> cur -> n

    @classmethod
    def of(cls, settings: Settings, rows: Iterable[UsageRow]) -> DayUsage:
        currencies = {p.name: p.currency for p in settings.providers}
        day = cls()
        for row in rows:
            day.providers.setdefault(row.provider, Tally()).add(row)
            day.keys.setdefault((row.provider, row.key), Tally()).add(row)
            day.clients.setdefault(row.client, Tally()).add(row)
            if row.cost:
                currency = currencies.get(row.provider, settings.budget_currency)
                costs = day.client_costs.setdefault(row.client, {})
                costs[currency] = costs.get(currency, 0) + row.cost
        return day

    def provider(self, name: str) -> Tally:
        return self.providers.get(name) or Tally()

    def key(self, provider: str, key: str) -> Tally:
        return self.keys.get((provider, key)) or Tally()

    def client(self, name: str) -> Tally:
        return self.clients.get(name) or Tally()

    def client_cost(self, name: str) -> dict[str, float]:
        """The client's cost per currency (only currencies it spent in)."""
        return {c: money(n) for c, n in sorted(self.client_costs.get(name, {}).items())}


def _model_view(provider: ProviderConfig, key: str, usage: ModelUsage, tz: ZoneInfo) -> Document:
    config = next(k for k in provider.keys if k.name == key)
    limit = provider.key_model_limit(config, usage.model)
    return {
        "model": usage.model,
        "used": usage.used,
        "limit": limit,
        "remaining": _remaining(limit, usage.used),
        "state": usage.state.value,
        "until": moment(usage.until_ms, tz) if usage.until_ms is not None else None,
    }


def key_view(provider: ProviderConfig, usage: KeyUsage, tz: ZoneInfo) -> Document:
    """One key of a provider: its counters, its state and its models (by upstream name)."""
    return {
        "name": usage.key,
        "used": usage.used,
        "limit": usage.limit,
        "remaining": usage.remaining,
        "state": usage.state.value,
        "reason": usage.reason,
        "until": moment(usage.until_ms, tz) if usage.until_ms is not None else None,
        "models": [_model_view(provider, usage.key, m, tz) for m in usage.models],
    }


def _key_today(provider: ProviderConfig, usage: KeyUsage, tz: ZoneInfo, day: DayUsage) -> Document:
    tally = day.key(provider.name, usage.key)
    return {**key_view(provider, usage, tz), "tokens": tally.tokens(), "cost": money(tally.cost)}


def _provider_view(
    provider: ProviderConfig, usages: list[KeyUsage], tz: ZoneInfo, day: DayUsage
) -> Document:
    usable = [u for u in usages if u.state in (KeyState.AVAILABLE, KeyState.COOLING)]
    capped = all(u.limit is not None for u in usages)
    spent = day.provider(provider.name)
    return {
        "name": provider.name,
        "type": provider.type.value,
        "paid": provider.is_paid,
        "strategy": provider.strategy.value,
        "used": sum(u.used for u in usages),
        "limit": sum(u.limit or 0 for u in usages) if capped else None,
        # what the pool can still serve today: spent and disabled keys count for nothing
        "remaining": (
            sum(u.remaining or 0 for u in usable)
            if all(u.limit is not None for u in usable)
            else None
        ),
        "tokens": spent.tokens(),
        "currency": provider.currency,
        "cost": money(spent.cost),
        "daily_budget": provider.daily_budget,
        "budget_remaining": budget_left(provider.daily_budget, spent.cost),
        "keys": [_key_today(provider, u, tz, day) for u in usages],
    }


def _fair_shares(settings: Settings) -> dict[str, FairShare]:
    """The fair-share parameters of each free provider, as the request path uses them."""
    if not settings.clients:
        return {}
    policy = ClientPolicy(settings)
    shares = {}
    for provider in settings.providers:
        quota = policy.quota_for(settings.clients[0].name, provider)
        if quota is not None and quota.fair_share is not None:
            shares[provider.name] = quota.fair_share
    return shares


def _day_header(settings: Settings, now: datetime) -> tuple[str, Document, Document]:
    tz, reset_time = settings.quota.tz, settings.quota.reset_time
    day = quota_day(now, tz, reset_time)
    reset = next_reset(now, tz, reset_time)
    reset_view = {
        **moment(to_ms(reset), tz),
        "in_seconds": max(0, round((reset - now).total_seconds())),
    }
    return day, moment(to_ms(now), tz), reset_view


async def snapshot_usages(
    settings: Settings, store: QuotaStore, pool: KeyPool, now: datetime
) -> dict[str, list[KeyUsage]]:
    """Every provider's keys as the store has them now (consistent across replicas)."""
    day = quota_day(now, settings.quota.tz, settings.quota.reset_time)
    return {
        p.name: await store.snapshot(p.name, pool.default_specs(p), day, to_ms(now), p.model_limits)
        for p in settings.providers
    }


async def quota_document(
    settings: Settings, store: QuotaStore, pool: KeyPool, now: datetime
) -> Document:
    """What ``GET /admin/quota`` answers."""
    day, now_view, reset_view = _day_header(settings, now)
    usages = await snapshot_usages(settings, store, pool, now)
    spent = DayUsage.of(settings, await store.usage(day))
    tz = settings.quota.tz
    return {
        "day": iso_day(day),
        "timezone": settings.quota.timezone,
        "now": now_view,
        "next_reset": reset_view,
        "providers": [_provider_view(p, usages[p.name], tz, spent) for p in settings.providers],
    }


def _usage_view(usage: ClientUsage, config: ClientConfig, day: DayUsage) -> Document:
    spent = day.client(config.name)
    return {
        "used": usage.used,
        "free_used": usage.free_used,
        "remaining": _remaining(config.daily_limit, usage.used),
        "tokens": spent.tokens(),
        "tokens_remaining": _remaining(config.daily_tokens, spent.total),
        "cost": day.client_cost(config.name),
        # a client budget counts the cost on every provider (free ones cost nothing)
        "budget_remaining": budget_left(config.daily_budget, spent.cost),
        "fair_share": [
            {
                "provider": provider,
                "share": share,
                "used": used,
                "remaining": max(0, share - used),
            }
            for provider, share, used in usage.shares
        ],
    }


async def clients_document(settings: Settings, store: QuotaStore, now: datetime) -> Document:
    """What ``GET /admin/clients`` answers: usage today and yesterday of every client."""
    day, now_view, reset_view = _day_header(settings, now)
    yesterday = previous_day(day) or day  # a quota day always has one before it
    names = [c.name for c in settings.clients]
    free = _fair_shares(settings)
    today = await store.client_usage(day, names, free, to_ms(now))
    before = await store.client_usage(yesterday, names, free, to_ms(now))
    spent_today = DayUsage.of(settings, await store.usage(day) if names else [])
    spent_before = DayUsage.of(settings, await store.usage(yesterday) if names else [])
    clients = [
        {
            "name": config.name,
            "daily_limit": config.daily_limit,
            "daily_tokens": config.daily_tokens,
            "daily_budget": config.daily_budget,
            "budget_currency": settings.budget_currency,
            "rpm": config.rpm,
            "tpm": config.tpm,
            "share": config.share,
            "models": config.models,
            "fallback": config.fallback,
            "today": _usage_view(now_usage, config, spent_today),
            "yesterday": _usage_view(old_usage, config, spent_before),
        }
        for config, now_usage, old_usage in zip(settings.clients, today, before, strict=True)
    ]
    fair = settings.fair_share
    return {
        "day": iso_day(day),
        "yesterday": iso_day(yesterday),
        "timezone": settings.quota.timezone,
        "now": now_view,
        "next_reset": reset_view,
        "open": not settings.clients,
        "fair_share": {
            "below": fair.below,
            "count": fair.count,
            "active_window_seconds": fair.active_window_seconds,
        },
        "clients": clients,
    }


async def usage_document(
    settings: Settings, store: QuotaStore, now: datetime, day: str | None = None
) -> Document:
    """What ``GET /admin/usage`` answers: the tokens and cost of a quota day (today unless
    ``day``, "YYYYMMDD") per client, provider, key and upstream model, as the store has them."""
    today, now_view, _reset = _day_header(settings, now)
    day = day or today
    currencies = {p.name: p.currency for p in settings.providers}
    rows = await store.usage(day)
    return {
        "day": iso_day(day),
        "timezone": settings.quota.timezone,
        "now": now_view,
        "rows": [
            {
                "client": r.client,
                "provider": r.provider,
                "key": r.key,
                "model": r.model,
                "prompt": r.prompt,
                "completion": r.completion,
                "total": r.total,
                "cost": money(r.cost),
                "currency": currencies.get(r.provider, settings.budget_currency),
                "answers": r.answers,
                "estimated": r.estimated,
            }
            for r in rows
        ],
    }


# -- rendering ---------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """3725 -> "1h 2m"; 42 -> "42s"."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _number(value: int | None) -> str:
    return "no cap" if value is None else str(value)


def amount(value: float) -> str:
    """Money for people: 0.000123 -> "0.000123"; 12.5 -> "12.50"; never an exponent."""
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.2f}"
    return f"{value:.9f}".rstrip("0")


def _cost(cost: float, currency: str, budget: float | None, left: float | None) -> str:
    """ "1.20 CNY", or against a budget "1.20 of 10.00 CNY (8.80 left)"."""
    if budget is None or left is None:
        return f"{amount(cost)} {currency}"
    return f"{amount(cost)} of {amount(budget)} {currency} ({amount(left)} left)"


def _costs(costs: Document) -> str:
    return ", ".join(f"{amount(v)} {c}" for c, v in costs.items()) or "0"


_STYLE = {
    KeyState.AVAILABLE.value: "green",
    KeyState.COOLING.value: "yellow",
    KeyState.EXHAUSTED.value: "red",
    KeyState.DISABLED.value: "magenta",
}


def _state(item: Document, now_unix: float, reset_in: float) -> tuple[str, str]:
    """(state text, "back in") of a key or a model."""
    state: str = item["state"]
    text = f"[{_STYLE.get(state, 'white')}]{state}[/]"
    reason = item.get("reason")
    if reason and state == KeyState.DISABLED.value:
        text += f" ({reason})"
    if state == KeyState.COOLING.value and item.get("until"):
        return text, duration(item["until"]["unix"] - now_unix)
    if state == KeyState.EXHAUSTED.value:
        return text, f"reset in {duration(reset_in)}"
    if state == KeyState.DISABLED.value:
        return text, "until enabled"
    return text, ""


def quota_table(quota: Document) -> Table:
    now_unix = float(quota["now"]["unix"])
    reset = quota["next_reset"]
    table = Table(
        title=(
            f"Quota day {quota['day']} ({quota['timezone']}) · resets {reset['iso']} "
            f"(in {duration(reset['in_seconds'])})"
        )
    )
    columns = (
        "provider",
        "key",
        "model",
        "used",
        "limit",
        "remaining",
        "state",
        "back in",
        "tokens today",
        "cost today",
    )
    for column in columns:
        right = column in ("used", "limit", "remaining", "tokens today")
        table.add_column(
            column, justify="right" if right else "left", no_wrap=column in ("provider", "key")
        )
    for provider in quota["providers"]:
        currency = provider["currency"]
        table.add_row(
            provider["name"],
            "(all keys)",
            "",
            str(provider["used"]),
            _number(provider["limit"]),
            _number(provider["remaining"]),
            "",
            "",
            str(provider["tokens"]["total"]),
            _cost(
                provider["cost"], currency, provider["daily_budget"], provider["budget_remaining"]
            ),
        )
        for key in provider["keys"]:
            state, back = _state(key, now_unix, reset["in_seconds"])
            table.add_row(
                "",
                key["name"],
                "(all models)",
                str(key["used"]),
                _number(key["limit"]),
                _number(key["remaining"]),
                state,
                back,
                str(key["tokens"]["total"]),
                _cost(key["cost"], currency, None, None),
            )
            for model in key["models"]:
                state, back = _state(model, now_unix, reset["in_seconds"])
                table.add_row(
                    "",
                    "",
                    model["model"],
                    str(model["used"]),
                    _number(model["limit"]),
                    _number(model["remaining"]),
                    state,
                    back,
                    "",
                    "",
                )
        table.add_section()
    return table


def _fair(usage: Document) -> str:
    return ", ".join(f"{s['provider']}: {s['used']}/{s['share']}" for s in usage["fair_share"])


def _limit_left(limit: int | None, left: int | None) -> str:
    return "no cap" if limit is None else f"{limit} ({left})"


def clients_table(clients: Document) -> Table:
    title = f"Clients on {clients['day']} (yesterday {clients['yesterday']})"
    if clients["open"]:
        title += " · no clients configured: the gateway is open and counts no client"
    table = Table(title=title)
    for column in (
        "client",
        "used today",
        "of which free",
        "daily limit",
        "remaining",
        "yesterday",
        "share",
        "fallback",
        "models",
        "fair share (used/share)",
        "tokens today",
        "daily tokens (left)",
        "cost today",
        "daily budget (left)",
        "rpm / tpm",
    ):
        table.add_column(column, no_wrap=column == "client")
    for client in clients["clients"]:
        today = client["today"]
        models = client["models"]
        budget = client["daily_budget"]
        table.add_row(
            client["name"],
            str(today["used"]),
            str(today["free_used"]),
            _number(client["daily_limit"]),
            _number(today["remaining"]),
            str(client["yesterday"]["used"]),
            f"{client['share']:g}",
            "yes" if client["fallback"] else "no",
            "all" if models is None else ", ".join(models),
            _fair(today),
            str(today["tokens"]["total"]),
            _limit_left(client["daily_tokens"], today["tokens_remaining"]),
            _costs(today["cost"]),
            "no cap"
            if budget is None
            else f"{amount(budget)} {client['budget_currency']} "
            f"({amount(today['budget_remaining'])})",
            f"{_number(client['rpm'])} / {_number(client['tpm'])}",
        )
    return table


def render(document: Document, console: Console | None = None) -> None:
    """Print a ``{"quota": ..., "clients": ...}`` document as two tables."""
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(quota_table(document["quota"]))
    console.print(clients_table(document["clients"]))


# -- the `status` command ------------------------------------------------------------------------


async def collect_local(settings: Settings, now: datetime | None = None) -> Document:
    """Both documents read from the config's store directly (no gateway needed)."""
    from router.quota.days import utc_now
    from router.quota.factory import open_store

    now = now or utc_now()
    store = open_store(settings.store.url, prefix=settings.store.prefix)
    try:
        pool = KeyPool(settings)
        return {
            "quota": await quota_document(settings, store, pool, now),
            "clients": await clients_document(settings, store, now),
        }
    finally:
        await store.aclose()


async def collect_remote(url: str, admin_key: str) -> Document:
    """Both documents from a gateway's admin API."""
    from router.admin_client import AdminClient

    async with AdminClient(url, admin_key) as admin:
        return {
            "quota": await admin.get("/admin/quota"),
            "clients": await admin.get("/admin/clients"),
        }
