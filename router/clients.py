"""What each client may do: models, paid fallback, daily limit, fair share. Pure."""

from __future__ import annotations

from fnmatch import fnmatchcase

from router.config import ClientConfig, ProviderConfig, Settings
from router.quota.types import ClientQuota, FairShare
from router.routing import Route


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
        self._quotas: dict[tuple[str, bool], ClientQuota] = {}

    def client(self, name: str) -> ClientConfig | None:
        return self._clients.get(name)

    def allows_model(self, name: str, model_id: str) -> bool:
        """A client's ``models`` are glob patterns over the id or alias it sends."""
        client = self._clients.get(name)
        if client is None or client.models is None:
            return True
        return any(fnmatchcase(model_id, pattern) for pattern in client.models)

    def routes_for(self, name: str, routes: tuple[Route, ...]) -> tuple[Route, ...]:
        """A client without ``fallback`` never reaches a paid provider."""
        client = self._clients.get(name)
        if client is None or client.fallback:
            return routes
        return tuple(r for r in routes if not r.provider.is_paid)

    def quota_for(self, name: str, provider: ProviderConfig) -> ClientQuota | None:
        """What the store counts for this client on this provider (fair share on free ones)."""
        client = self._clients.get(name)
        if client is None:
            return None
        free = not provider.is_paid
        quota = self._quotas.get((name, free))
        if quota is None:
            quota = ClientQuota(
                name=name,
                daily_limit=client.daily_limit,
                fair_share=self._fair_share if free else None,
            )
            self._quotas[name, free] = quota
        return quota
