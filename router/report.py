"""Human-readable views of a configuration; secrets are never printed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from router.config import KeyConfig, Settings
from router.routing import upstream_model_name


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


def mask_url(url: str) -> str:
    """Hide a password in a store URL (redis://:secret@host -> redis://:••••@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # redis-py also takes ?password=... in the query: check-config and serve's startup line
    # printed it in clear (tests/test_canary.py).
    rest = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1••••", rest)
    if "@" not in rest:
        return f"{scheme}://{rest}"
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:••••@{host}"
