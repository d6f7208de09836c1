"""Which models each provider serves: its free ``/models`` list, refreshed in the background."""

from __future__ import annotations

import asyncio
import logging

from router.config import ProviderConfig, Settings
from router.pool import KeyPool
from router.upstream import Upstreams

log = logging.getLogger("router.catalog")

REFRESH_SECONDS = 600.0
RETRY_SECONDS = 30.0


class Catalog:
    """provider name -> the model ids it lists; ``None`` while the list cannot be had."""

    def __init__(self, settings: Settings) -> None:
        self._providers = list(settings.providers)
        self.models: dict[str, frozenset[str] | None] = {
            p.name: (frozenset(p.models) if p.models is not None else None) for p in self._providers
        }

        self._recount()

    def inherit(self, previous: Catalog) -> None:
        """Keep the lists of providers that a reload left at the same address."""
        before = {p.name: p.base_url for p in previous._providers}
        for provider in self._providers:
            if provider.models is None and before.get(provider.name) == provider.base_url:
                self.models[provider.name] = previous.models.get(provider.name)
        self._recount()

    def _recount(self) -> None:
        seen: dict[str, None] = {}
        for served in self.models.values():
            for model in sorted(served or ()):
                seen.setdefault(model, None)
        self._all = tuple(seen)
        self.known = frozenset(seen)

    def all_models(self) -> tuple[str, ...]:
        """Every listed model id, provider by provider, without repeats."""
        return self._all

    async def refresh(self, upstreams: Upstreams, pool: KeyPool) -> bool:
        """Fetch every provider's list once; True when all lists are known."""
        results = await asyncio.gather(
            *(self._refresh_one(p, upstreams, pool) for p in self._providers if p.models is None)
        )
        return all(results)

    async def _refresh_one(
        self, provider: ProviderConfig, upstreams: Upstreams, pool: KeyPool
    ) -> bool:
        # /models costs no quota; a key is sent because Bailian wants one (ModelScope does not).
        secret = pool.secret(provider.name, provider.keys[0].name)
        try:
            document = await upstreams.get_json(provider, "models", secret)
            ids = _model_ids(document)
        except Exception as exc:  # any failure leaves the list unknown: ids are passed on
            log.warning(
                "model list of provider %s unavailable: %s", provider.name, type(exc).__name__
            )
            return False
        self.models[provider.name] = ids
        self._recount()
        log.info("provider %s lists %d models", provider.name, len(ids))
        return True

    async def run(self, upstreams: Upstreams, pool: KeyPool) -> None:
        """Refresh after the first look: soon while a list is missing, else every 10 min."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS if self.complete() else RETRY_SECONDS)
            await self.refresh(upstreams, pool)

    def complete(self) -> bool:
        return all(served is not None for served in self.models.values())


def _model_ids(document: object) -> frozenset[str]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError("not an OpenAI model list")
    return frozenset(
        str(item["id"]) for item in document["data"] if isinstance(item, dict) and "id" in item
    )
