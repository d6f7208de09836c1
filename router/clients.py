"""What each client may do: models, paid fallback, daily limits, per-minute limits, budget,
fair share. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from router.config import ClientConfig, ProviderConfig, Settings
from router.pricing import to_nanos
from router.quota.types import ClientQuota, FairShare
from router.routing import Route, upstream_model_name


class ClientPolicy:
    def __init__(self, settings: Settings) -> None:
        self._clients = {c.name: c for c in settings.clients}
        fair = settings.fair_share
        self._fair_share = (
            FairShare(
                below=fair.below,
                weights=tuple((c.name, c.share) for c in settings.clients),
                active_window_ms=(
                    int(fair.active_window_seconds * 1000) if fair.count == "active" else None
                ),
            )
            if len(settings.clients) > 1  # one client has nobody to share with
            else None
        )
        self._quotas: dict[tuple[str, str, bool], ClientQuota] = {}

    def client(self, name: str) -> ClientConfig | None:
        return self._clients.get(name)

    def allows_model(self, name: str, model_id: str) -> bool:
        """A client's ``models`` are glob patterns over the id or alias it sends."""
        client = self._clients.get(name)
        if client is None or client.models is None:
            return True
        return _matches(model_id, client.models)

    def allowed_routes(
        self, name: str, model_id: str, routes: tuple[Route, ...], listed: Iterable[str]
    ) -> tuple[Route, ...]:
        """The routes of a raw model id (not an alias) that call a model the client may use.

        ``allows_model`` judged the id the client sent; a provider that renames it (Bailian
        drops the organisation and lower-cases: ``Qwen/deepseek-r1`` -> ``deepseek-r1``) may
        call another model than that id names. So a renamed route is kept only if the client's
        patterns allow the model it really calls, under a name that is that model's own:

        - the upstream name itself (what the client could send unrenamed), or
        - a *canonical* id of it: an id some provider lists or an alias routes to (``listed``)
          that the same provider renames to the same upstream name (``Qwen/Qwen3-32B`` for
          Bailian's ``qwen3-32b``; for ``deepseek-r1`` only a listed ``<org>/DeepSeek-R1``,
          so ``deepseek-ai/*`` may allow it, ``Qwen/*`` never).

        ``Qwen/*`` thus keeps Bailian's ``qwen3-32b`` for ``Qwen/Qwen3-32B`` but refuses
        ``Qwen/deepseek-r1``. A route that calls the id as sent needs nothing more. Without a
        known canonical id (no provider lists one) a renamed route is refused: fail closed.
        """
        client = self._clients.get(name)
        if client is None or client.models is None:
            return routes
        patterns = client.models
        canonical: list[str] | None = None
        kept = []
        for route in routes:
            if route.model != model_id and not _matches(route.model, patterns):
                if canonical is None:
                    canonical = [m for m in listed if _matches(m, patterns)]
                called = route.model
                if not any(upstream_model_name(route.provider, m) == called for m in canonical):
                    continue
            kept.append(route)
        return tuple(kept)

    def routes_for(self, name: str, routes: tuple[Route, ...]) -> tuple[Route, ...]:
        """A client without ``fallback`` never reaches a paid provider."""
        client = self._clients.get(name)
        if client is None or client.fallback:
            return routes
        return tuple(r for r in routes if not r.provider.is_paid)

    def quota_for(
        self, name: str, provider: ProviderConfig, count_rate: bool = True
    ) -> ClientQuota | None:
        """What the store checks and counts for this client on this provider: the fair share
        on free ones, the budget on priced ones; rpm and tpm on a request's first reservation
        (``count_rate``)."""
        client = self._clients.get(name)
        if client is None:
            return None
        key = (name, provider.name, count_rate)
        quota = self._quotas.get(key)
        if quota is None:
            free = not provider.is_paid
            budget = client.daily_budget if provider.is_priced else None
            quota = ClientQuota(
                name=name,
                daily_limit=client.daily_limit,
                fair_share=self._fair_share if free else None,
                daily_tokens=client.daily_tokens,
                daily_budget=None if budget is None else to_nanos(budget),
                rpm=client.rpm,
                tpm=client.tpm,
                count_rate=count_rate,
            )
            self._quotas[key] = quota
        return quota


def _matches(model_id: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(model_id, pattern) for pattern in patterns)
