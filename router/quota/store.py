"""The one interface every quota store implements (Redis, SQLite, memory)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from router.quota.types import (
    ClientUsage,
    FairShare,
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
    Strategy,
    UsageRecord,
    UsageRow,
)

# The readiness probe's own provider and key: a provider name config never accepts (':'), so
# its counters are apart from every real one, and a key with no limit, so it always has room.
PROBE_PROVIDER = "readyz:probe"
_PROBE_KEYS = (KeySpec("probe", "probe", None, None),)


class StoreError(Exception):
    """The store could not be reached or answered wrongly; wraps the backend's own error."""


class QuotaStore(Protocol):
    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        """Atomically pick a key that can serve ``req.model`` and count one call on it."""
        ...

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        """Apply what the upstream answered to the reserved key, atomically."""
        ...

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        """Add a batch of answers' tokens and cost to their quota days, atomically and once
        per ``token`` (a batch sent again after a lost reply adds nothing)."""
        ...

    async def usage(self, day: str) -> list[UsageRow]:
        """Tokens and cost of a quota day per client, provider, key and model."""
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

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        """Disable a key (for this secret); True when it was not disabled before."""
        ...

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        """Forget a key's counters, exhaustion and cooldowns of a day (e.g. after buying quota)."""
        ...

    async def client_usage(
        self,
        day: str,
        clients: Sequence[str],
        free: Mapping[str, FairShare] | None = None,
        now_ms: int | None = None,
    ) -> list[ClientUsage]:
        """Per client usage of a quota day, in the given order.

        ``free`` maps each free provider to its fair-share parameters: a client's ``shares``
        hold those of them whose pool was shared out that day (in ``free``'s order), with
        the share computed as reserve does at ``now_ms`` (default: the store's clock).
        """
        ...

    async def remember_task(self, task_id: str, value: str, ttl_ms: int) -> None:
        """Remember which provider/key and client created an asynchronous task (image
        generation): ``value`` is opaque to the store ("provider|key|client", router.proxy)."""
        ...

    async def recall_task(self, task_id: str) -> str | None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached."""
        ...

    async def aclose(self) -> None: ...


class ForwardingStore:
    """A QuotaStore that hands every call to ``inner``: the base of the wrappers
    (ResilientStore), which override only what they change."""

    def __init__(self, inner: QuotaStore) -> None:
        self.inner = inner

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        return await self.inner.reserve(req)

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        return await self.inner.settle(res, settlement, now_ms)

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        await self.inner.record_usage(token, records)

    async def usage(self, day: str) -> list[UsageRow]:
        return await self.inner.usage(day)

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        return await self.inner.snapshot(provider, keys, day, now_ms, model_limits)

    async def enable(self, provider: str, key: str) -> None:
        await self.inner.enable(provider, key)

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        return await self.inner.disable(provider, key, fingerprint, reason)

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        await self.inner.reset_key(provider, key, day)

    async def client_usage(
        self,
        day: str,
        clients: Sequence[str],
        free: Mapping[str, FairShare] | None = None,
        now_ms: int | None = None,
    ) -> list[ClientUsage]:
        return await self.inner.client_usage(day, clients, free, now_ms)

    async def remember_task(self, task_id: str, value: str, ttl_ms: int) -> None:
        await self.inner.remember_task(task_id, value, ttl_ms)

    async def recall_task(self, task_id: str) -> str | None:
        return await self.inner.recall_task(task_id)

    async def ping(self) -> None:
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def probe_reservation(store: QuotaStore, day: str, now_ms: int, day_end_ms: int) -> None:
    """Make one reservation on the probe key and give it back: what every request does first.

    Raises StoreError when the store cannot reserve (unreachable, read-only, out of memory,
    scripts refused), which a mere ping does not see.
    """
    req = ReserveRequest(
        PROBE_PROVIDER, "probe", _PROBE_KEYS, Strategy.FILL_FIRST, day, now_ms, day_end_ms
    )
    outcome = await store.reserve(req)
    if not isinstance(outcome, Reservation):
        raise StoreError(f"the probe reservation was refused ({outcome.reason})")
    await store.settle(outcome, Settlement(release=True), now_ms)
