"""What an answer cost: the config's prices per million tokens applied to its usage. Pure.

Money is counted in integer nanos of the provider's currency (10**-9): a token at 2 CNY per
million tokens costs 2,000 nanos, so sums are exact in the stores (Lua's doubles included)
and never drift as floats would. A free provider costs nothing; a paid one costs what its
``prices`` say for the model (an exact id first, then glob patterns in order); a model with no
price costs 0 and is logged once, so an operator sees a budget that cannot hold.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase

from router.config import Price, ProviderConfig, Settings
from router.usage import Usage

log = logging.getLogger("router.pricing")

NANOS = 10**9  # nanos per currency unit
PER_MILLION = 10**6


def to_nanos(amount: float) -> int:
    """A configured amount of money (a budget) in nanos."""
    return round(amount * NANOS)


def from_nanos(nanos: int) -> float:
    return nanos / NANOS


class Prices:
    """Every provider's price table, looked up per (provider, model) once."""

    def __init__(self, settings: Settings) -> None:
        self._providers = {p.name: p for p in settings.providers}
        self._found: dict[tuple[str, str], Price | None] = {}
        self._warned: set[tuple[str, str]] = set()

    def currency(self, provider: str) -> str:
        return self._providers[provider].currency

    def price(self, provider: str, model: str) -> Price | None:
        key = (provider, model)
        if key not in self._found:
            config = self._providers.get(provider)
            found = None if config is None or not config.is_paid else _lookup(config, model)
            if len(self._found) < 10_000:  # bounded: clients choose model names
                self._found[key] = found
            return found
        return self._found[key]

    def cost(self, provider: str, model: str, usage: Usage) -> int:
        """The answer's cost in nanos of the provider's currency."""
        price = self.price(provider, model)
        if price is None:
            config = self._providers.get(provider)
            if config is not None and config.is_paid and (provider, model) not in self._warned:
                self._warned.add((provider, model))
                log.warning(
                    "no price for %s on %s: its calls count 0 toward budgets and cost "
                    "(add it to providers[].prices)",
                    model,
                    provider,
                )
            return 0
        return cost_nanos(price, usage)


def cost_nanos(price: Price, usage: Usage) -> int:
    """``usage`` at ``price``, in nanos (prices are per million tokens: nanos = tokens x
    price x 1000), rounded once at the end."""
    cache_read = price.input if price.cache_read is None else price.cache_read
    cache_write = price.input if price.cache_write is None else price.cache_write
    units = (
        usage.prompt * price.input
        + usage.completion * price.output
        + usage.cache_read * cache_read
        + usage.cache_write * cache_write
    )
    return round(units * NANOS / PER_MILLION)


def _lookup(provider: ProviderConfig, model: str) -> Price | None:
    exact = provider.prices.get(model)
    if exact is not None:
        return exact
    for pattern, price in provider.prices.items():
        if fnmatchcase(model, pattern):
            return price
    return None
