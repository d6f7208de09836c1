"""Model id or alias -> the ordered routes (provider, upstream model) that serve it. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from router.classify import ProviderType
from router.config import ProviderConfig, Settings

RESOLVED_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    provider: ProviderConfig
    model: str  # the name the provider knows (and counts)


def bailian_model_name(model_id: str) -> str:
    """Bailian's naming: no organisation prefix, lower case (Qwen/Qwen3-32B -> qwen3-32b)."""
    return model_id.rsplit("/", 1)[-1].lower()


def upstream_model_name(provider: ProviderConfig, model_id: str) -> str:
    if provider.type is ProviderType.BAILIAN:
        return bailian_model_name(model_id)
    return model_id


class RouteTable:
    """Aliases from the config; any other id goes to every provider in order, renamed for it."""

    def __init__(self, settings: Settings) -> None:
        self._providers = tuple(settings.providers)
        self._aliases: dict[str, tuple[Route, ...]] = {
            alias.id: tuple(
                Route(settings.provider(route.provider), route.model) for route in alias.routes
            )
            for alias in settings.models
        }

        self.aliases: tuple[str, ...] = tuple(self._aliases)
        # The upstream model ids the aliases name: ids the operator vouches for, as a
        # provider's list does (router.clients judges renamed routes against both).
        self.alias_models: tuple[str, ...] = tuple(
            dict.fromkeys(r.model for routes in self._aliases.values() for r in routes)
        )
        self._resolved: dict[str, tuple[Route, ...]] = {}

    def has_alias(self, model_id: str) -> bool:
        return model_id in self._aliases

    def resolve(self, model_id: str) -> tuple[Route, ...]:
        routes = self._aliases.get(model_id) or self._resolved.get(model_id)
        if routes is not None:
            return routes
        routes = tuple(Route(p, upstream_model_name(p, model_id)) for p in self._providers)
        if len(self._resolved) < RESOLVED_CACHE_SIZE:  # bounded: clients choose model names
            self._resolved[model_id] = routes
        return routes


def known_routes(
    routes: tuple[Route, ...], catalog: Mapping[str, frozenset[str] | None]
) -> tuple[Route, ...]:
    """Drop routes whose provider's model list is known and lacks the model.

    A provider whose list is unknown (``None`` or absent) keeps its route: the id is passed on.
    """
    kept = []
    for route in routes:
        served = catalog.get(route.provider.name)
        if served is None or route.model in served:
            kept.append(route)
    return tuple(kept)
