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
    rpm: int | None = None  # calls per minute (any 60 s); None = no limit (router.quota.rates)


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
    daily_tokens: int | None = None  # tokens per quota day on every provider; None = no cap
    # Money per quota day, in nanos of the currency (router.pricing); set only when reserving
    # on a provider that has prices: free providers cost nothing and never stop for it.
    daily_budget: int | None = None
    rpm: int | None = None  # requests per minute (any 60 s); None = no limit
    tpm: int | None = None  # tokens per minute (any 60 s), checked before a call
    # Whether this reservation is the request's first that may count: rpm and tpm are checked
    # (and rpm counted) once per request, not once per failover attempt.
    count_rate: bool = True

    @property
    def checks_usage(self) -> bool:
        """Whether this reservation is checked against the usage recorded in the store (daily
        tokens, budget, tokens per minute), so the answers that ended before it must be there
        first (router.ledger)."""
        return (
            self.daily_tokens is not None
            or self.daily_budget is not None
            or (self.count_rate and self.tpm is not None)
        )


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
    # The provider's daily budget in nanos of its currency; None = none. Spent (the cost the
    # store has recorded today reached it): the provider refuses like a spent pool.
    budget: int | None = None


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
    CLIENT_TOKENS = "client_tokens"  # the client's daily_tokens are used
    CLIENT_BUDGET = "client_budget"  # the client's daily_budget is spent (priced providers only)
    CLIENT_RPM = "client_rpm"  # the client made rpm requests in the last minute
    CLIENT_TPM = "client_tpm"  # the client used tpm tokens in the last minute
    PROVIDER_BUDGET = "provider_budget"  # the provider's daily_budget is spent

    @property
    def whole_client(self) -> bool:
        """A refusal that holds on every route (the client's own counts), not just this one."""
        return self in _WHOLE_CLIENT


_WHOLE_CLIENT = frozenset(
    {Refusal.CLIENT_LIMIT, Refusal.CLIENT_TOKENS, Refusal.CLIENT_RPM, Refusal.CLIENT_TPM}
)


@dataclass(frozen=True, slots=True)
class NoCapacity:
    """No key of the provider can serve the model now (or not for this client)."""

    provider: str
    model: str
    retry_at_ms: int | None  # end of the earliest cooldown; None = nothing before the next reset
    reason: Refusal = Refusal.KEYS
    # The limit that refused: CLIENT_LIMIT the daily calls, CLIENT_SHARE the share, CLIENT_TOKENS
    # the daily tokens, CLIENT_RPM / CLIENT_TPM the per-minute limit, CLIENT_BUDGET and
    # PROVIDER_BUDGET the budget (nanos). retry_at_ms is set for the per-minute ones.
    client_limit: int | None = None


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


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The tokens and cost of one answer, to add to its quota day (QuotaStore.record_usage)."""

    day: str
    day_end_ms: int  # the day's reset: its counters expire a day after it
    client: str
    provider: str
    key: str
    model: str  # the upstream model name, as the calls are counted
    prompt: int
    completion: int
    total: int
    cost: int  # nanos of the provider's currency (router.pricing); 0 when free or unpriced
    at_ms: int  # when the answer ended: the minute its tokens count in (tpm)
    tpm: bool = False  # the client has a tpm limit: also add the tokens to its minute window
    estimated: bool = False  # a stream that ended before its usage was complete


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Tokens and cost of a quota day for one (client, provider, key, model)."""

    client: str
    provider: str
    key: str
    model: str
    prompt: int
    completion: int
    total: int
    cost: int  # nanos of the provider's currency
    answers: int  # answers that reported (or estimated) usage
    estimated: int  # of which estimated
