"""Human-readable views of a configuration; secrets are never printed."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from router.config import KeyConfig, Settings
from router.quota.urls import mask_url
from router.routing import RouteTable, known_routes, upstream_model_name


def _secret_source(key: KeyConfig) -> str:
    if key.secret_file is not None:
        return f"•••• file {key.secret_file}"
    return "•••• set"


def _limit(value: int | None) -> str:
    return "no cap" if value is None else str(value)


def print_pool(settings: Settings, path: Path, console: Console | None = None) -> None:
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]{path}[/bold]: valid")
    console.print(
        f"server {settings.server.host}:{settings.server.port} · store "
        f"{mask_url(settings.store.url)} · quota day in {settings.quota.timezone} from "
        f"{settings.quota.reset_time.strftime('%H:%M')} · clients: "
        f"{', '.join(c.name for c in settings.clients) or 'none (open gateway)'}"
    )
    table = Table(title="Upstream pool (tried in this order)")
    for column in (
        "provider",
        "type",
        "key",
        "secret",
        "daily limit",
        "per-model limit",
        "strategy",
    ):
        table.add_column(column)
    for provider in settings.providers:
        for key in provider.keys:
            table.add_row(
                provider.name,
                provider.type.value,
                key.name,
                _secret_source(key),
                _limit(provider.key_daily_limit(key)),
                _limit(provider.default_model_limit(key)),
                provider.strategy.value,
            )
    console.print(table)
    routes = Table(title="Model aliases")
    routes.add_column("alias")
    routes.add_column("routes")
    for alias in settings.models:
        routes.add_row(alias.id, " → ".join(f"{r.provider}:{r.model}" for r in alias.routes))
    if settings.models:
        console.print(routes)
    example = "Qwen/Qwen3-32B"
    chain = " → ".join(f"{p.name}:{upstream_model_name(p, example)}" for p in settings.providers)
    console.print(f"Other model ids go to every provider in order, e.g. {example}: {chain}")
    for warning in paid_only_warnings(settings):
        console.print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)


def paid_only_warnings(settings: Settings) -> list[str]:
    """Aliases, and models a paid provider lists, that only paid routes serve while a free
    provider lists a model that maps to the same upstream model: its free quota goes unused.

    Only the ``models:`` lists of the config are known here (the gateway also asks upstream).
    """
    table = RouteTable(settings)
    catalog = {
        p.name: None if p.models is None else frozenset(p.models) for p in settings.providers
    }
    free = [(p.name, m) for p in settings.providers if not p.is_paid for m in p.models or ()]
    listed_by_paid = [m for p in settings.providers if p.is_paid for m in p.models or ()]
    warnings = []
    for name in dict.fromkeys([*table.aliases, *listed_by_paid]):
        routes = known_routes(table.resolve(name), catalog)  # what the gateway does
        if not routes or not all(r.provider.is_paid for r in routes):
            continue
        matching = [
            f"{provider}:{model}"
            for provider, model in free
            if any(upstream_model_name(r.provider, model) == r.model for r in routes)
        ]
        if matching:
            paid = ", ".join(dict.fromkeys(r.provider.name for r in routes))
            warnings.append(
                f"{name} is served only by paid providers ({paid}), though the free "
                f"{', '.join(matching)} maps to it: route {name} there first (models:) "
                "to use the free quota before paying"
            )
    return warnings
