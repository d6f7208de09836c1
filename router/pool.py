"""The upstream keys of every provider: secrets kept here, only names and limits go further."""

from __future__ import annotations

from router.config import ProviderConfig, Settings, fingerprint
from router.quota.types import KeySpec


class KeyPool:
    def __init__(self, settings: Settings) -> None:
        self._secrets: dict[tuple[str, str], str] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        for provider in settings.providers:
            for key in provider.keys:
                secret = key.resolved_secret()
                self._secrets[provider.name, key.name] = secret
                self._fingerprints[provider.name, key.name] = fingerprint(secret)
        self._specs: dict[tuple[str, str], tuple[KeySpec, ...]] = {}

    def __repr__(self) -> str:
        return f"KeyPool({len(self._secrets)} keys)"

    def secret(self, provider: str, key: str) -> str:
        return self._secrets[provider, key]

    def specs(self, provider: ProviderConfig, model: str) -> tuple[KeySpec, ...]:
        """The keys of a provider with their limits for ``model``, in config order (cached)."""
        cached = self._specs.get((provider.name, model))
        if cached is None:
            cached = tuple(
                KeySpec(
                    name=key.name,
                    fingerprint=self._fingerprints[provider.name, key.name],
                    daily_limit=provider.key_daily_limit(key),
                    model_limit=provider.key_model_limit(key, model),
                    rpm=provider.key_rpm(key),
                )
                for key in provider.keys
            )
            if len(self._specs) < 10_000:  # bounded: clients choose model names
                self._specs[provider.name, model] = cached
        return cached

    def default_specs(self, provider: ProviderConfig) -> tuple[KeySpec, ...]:
        """Keys with their default per-model limit, for snapshots."""
        return tuple(
            KeySpec(
                name=key.name,
                fingerprint=self._fingerprints[provider.name, key.name],
                daily_limit=provider.key_daily_limit(key),
                model_limit=provider.default_model_limit(key),
                rpm=provider.key_rpm(key),
            )
            for key in provider.keys
        )
