"""Value objects shared by every quota store and by the request path.

The quota state of one provider for one quota day is a flat map of fields (a Redis
hash; a dict in memory; rows in SQLite). Field names are built by ``router.quota.keys``.
Every store makes the same decisions: ``router.quota.logic`` is the reference in Python,
``router/quota/lua/*.lua`` the same decisions for Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Strategy(StrEnum):
    """How a key is picked among those that can serve."""

    MOST_REMAINING = "most_remaining"
    ROUND_ROBIN = "round_robin"
    FILL_FIRST = "fill_first"


class KeyState(StrEnum):
    AVAILABLE = "available"
    EXHAUSTED = "exhausted"
    COOLING = "cooling"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One upstream key as the store sees it: its name, never its secret."""

    name: str
    fingerprint: str  # a short hash of the secret: a disabled record only holds for this secret
    daily_limit: int | None  # calls per quota day for the whole key; None = no cap
    model_limit: int | None  # calls per quota day for the requested model; None = no cap


@dataclass(frozen=True, slots=True)
class FairShare:
    """How a free provider's pool is shared once it runs low (see ClientQuota)."""

    below: float  # share out once less than this fraction of the pool's limit remains
    weights: tuple[tuple[str, float], ...]  # every configured client and its weight (share)
    active_window_ms: int | None  # None: all clients count; else only those seen this recently


@dataclass(frozen=True, slots=True)
class ClientQuota:
    """Who is asking, counted atomically with the key reservation."""

    name: str
    daily_limit: int | None  # calls per quota day on every provider together; None = no cap
    fair_share: FairShare | None  # set only when reserving on a free (not paid) provider


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    provider: str
    model: str  # the upstream model name (what the provider counts), not the alias
    keys: tuple[KeySpec, ...]  # candidates in config order
    strategy: Strategy
    day: str  # quota day, "YYYYMMDD"
    now_ms: int
    day_end_ms: int  # the next reset (Unix ms): cooldowns never pass it, counters expire after it
    client: ClientQuota | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """One counted call on one key: what ``settle`` needs to give it back or correct it."""

    provider: str
    key: str
    fingerprint: str
    model: str
    day: str
    day_end_ms: int
    daily_limit: int | None
    model_limit: int | None
    remaining: int | None  # calls left on the key after this one; None = no cap
    model_remaining: int | None  # calls left for (key, model) after this one; None = no cap
    client: str | None = None  # the client counted with it (given back with it)
    fair_counted: bool = False  # also counted against the client's fair share of this provider
    free: bool = False  # reserved with client.fair_share set: also counted in the client's f|


class Refusal(StrEnum):
    KEYS = "keys"  # every key is spent, cooling or disabled
    CLIENT_LIMIT = "client_limit"  # the client's own daily_limit is reached
    CLIENT_SHARE = "client_share"  # the client used its fair share of this free pool


@dataclass(frozen=True, slots=True)
class NoCapacity:
    """No key of the provider can serve the model now (or not for this client)."""

    provider: str
    model: str
    retry_at_ms: int | None  # end of the earliest cooldown; None = nothing before the next reset
    reason: Refusal = Refusal.KEYS
    client_limit: int | None = None  # CLIENT_LIMIT: the daily limit; CLIENT_SHARE: the share


@dataclass(frozen=True, slots=True)
class ClientUsage:
    client: str
    used: int  # calls counted today on every provider
    free_used: int  # of which on free providers
    shares: tuple[tuple[str, int, int], ...]  # (provider, share, used since the share-out)


@dataclass(frozen=True, slots=True)
class Cooldown:
    scope: Literal["key", "model"]
    base_ms: int
    max_ms: int
    fixed: bool = False  # True: exactly base_ms (a Retry-After); False: doubles per repeat


@dataclass(frozen=True, slots=True)
class Settlement:
    """What an upstream answer changes in the store; applied atomically in one round trip."""

    release: bool = False  # give the call back (throttled, or never sent)
    remaining: int | None = None  # upstream's requests-remaining header for the key
    model_remaining: int | None = None  # upstream's model-requests-remaining header
    exhaust: Literal["key", "model", "ambiguous"] | None = None
    near_zero: int = 0  # "ambiguous": the whole key is out when its remaining is at most this
    cooldown: Cooldown | None = None
    disable_reason: str | None = None

    def is_noop(self) -> bool:
        return self == _NOOP


_NOOP = Settlement()


@dataclass(frozen=True, slots=True)
class SettleResult:
    exhausted: Literal["key", "model"] | None = None
    cooldown_until_ms: int | None = None
    newly_disabled: bool = False  # first time this key (with this secret) was disabled


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    used: int
    state: KeyState
    until_ms: int | None = None  # for COOLING


@dataclass(frozen=True, slots=True)
class KeyUsage:
    provider: str
    key: str
    used: int
    limit: int | None
    state: KeyState
    until_ms: int | None  # for COOLING
    reason: str | None  # for DISABLED / EXHAUSTED
    models: tuple[ModelUsage, ...]

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)
