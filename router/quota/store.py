"""The one interface every quota store implements (Redis, SQLite, memory)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from router.quota.types import (
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)


class StoreError(Exception):
    """The store could not be reached or answered wrongly; wraps the backend's own error."""


class QuotaStore(Protocol):
    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        """Atomically pick a key that can serve ``req.model`` and count one call on it."""
        ...

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        """Apply what the upstream answered to the reserved key, atomically."""
        ...

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        """Usage and state of every key of a provider on a quota day.

        Key limits come from ``keys``; a model's limit is ``model_limits[model]`` when given,
        else the key's ``model_limit``.
        """
        ...

    async def enable(self, provider: str, key: str) -> None:
        """Forget that a key was disabled."""
        ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached."""
        ...

    async def aclose(self) -> None: ...
