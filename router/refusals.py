"""What the client is told when the gateway will not or cannot serve a call: each refusal of the
failover engine (router.failover) as an error of router.errors, with its user-facing text, its
error code and its Retry-After (the quota reset, a cooldown's end or a breaker's). The engine
decides which refusal applies; this module only words it. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime

from router.breaker import Open
from router.classify import Verdict
from router.config import QuotaSettings
from router.errors import (
    Forbidden,
    NotFound,
    PoolExhausted,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from router.pricing import from_nanos
from router.quota.days import next_reset, to_ms
from router.quota.types import NoCapacity, Refusal
from router.routing import Route


class Refusals:
    """The refusals of one configuration: reset times are told in its quota timezone."""

    def __init__(
        self,
        quota: QuotaSettings,
        clock: Callable[[], datetime],
        currency: Callable[[str | None], str] = lambda _: "CNY",
    ) -> None:
        self.quota = quota
        self.clock = clock
        self.currency = currency  # a provider's currency; None: the client budgets' one

    # -- before any upstream: the client's rules and the model ------------------------------

    def model_not_allowed(self, client: str, model: str) -> Forbidden:
        return Forbidden(
            f"The client '{client}' may not use the model '{model}'.",
            code="model_not_allowed",
            param="model",
        )

    def served_as_not_allowed(self, client: str, model: str, routes: Sequence[Route]) -> Forbidden:
        served = ", ".join(f"'{r.model}' on {r.provider.name}" for r in routes)
        return Forbidden(
            f"The client '{client}' may not use the model '{model}': it would be "
            f"served as {served}, which its allowed models do not cover.",
            code="model_not_allowed",
            param="model",
        )

    def paid_not_allowed(self, client: str, model: str) -> Forbidden:
        return Forbidden(
            f"The client '{client}' may not use paid providers, the only ones serving '{model}'.",
            code="paid_provider_not_allowed",
            param="model",
        )

    def no_such_model(self, model: str) -> NotFound:
        return NotFound(
            f"The model '{model}' does not exist or no configured provider serves it.",
            code="model_not_found",
            param="model",
        )

    def not_served_anywhere(self, model: str) -> NotFound:
        return NotFound(
            f"The model '{model}' is not served by any configured provider.",
            code="model_not_found",
            param="model",
        )

    # -- counts: the client's own, then the pool's -------------------------------------------

    def client_limit(self, client: str, refusal: NoCapacity) -> PoolExhausted:
        return self._daily(client, f"{refusal.client_limit} calls", "client_daily_limit")

    def _daily(self, client: str, limit: str, code: str) -> PoolExhausted:
        reset_text, wait = self._reset_text()
        return PoolExhausted(
            f"The client '{client}' has used its daily limit of {limit}; "
            f"it resets at {reset_text}.",
            retry_after_s=wait,
            code=code,
        )

    def client_refusal(self, client: str, refusal: NoCapacity) -> PoolExhausted:
        """A refusal that holds on every route: the client's daily calls or tokens, or its
        requests or tokens per minute."""
        reason, limit = refusal.reason, refusal.client_limit
        if reason is Refusal.CLIENT_LIMIT:
            return self.client_limit(client, refusal)
        if reason is Refusal.CLIENT_TOKENS:
            return self._daily(client, f"{limit} tokens", "client_daily_tokens")
        what = "requests" if reason is Refusal.CLIENT_RPM else "tokens"
        now_ms = to_ms(self.clock())
        wait = ((refusal.retry_at_ms or now_ms + 1000) - now_ms) / 1000
        return PoolExhausted(
            f"The client '{client}' is over its limit of {limit} {what} per minute; "
            f"retry in {max(1, math.ceil(wait))} s.",
            retry_after_s=wait,
            code="rate_limited",
        )

    def budget_spent(self, client: str, model: str, refusal: NoCapacity) -> PoolExhausted:
        """Every route left is stopped by a budget: the provider's, or the client's."""
        reset_text, wait = self._reset_text()
        limit = refusal.client_limit or 0
        if refusal.reason is Refusal.PROVIDER_BUDGET:
            money = f"{from_nanos(limit):.2f} {self.currency(refusal.provider)}"
            whose = f"The paid provider '{refusal.provider}' has spent its daily budget of {money}"
            code = "provider_budget_exhausted"
        else:
            money = f"{from_nanos(limit):.2f} {self.currency(None)}"
            whose = f"The client '{client}' has spent its daily budget of {money}"
            code = "client_budget_exhausted"
        return PoolExhausted(
            f"{whose}, and no other route can serve '{model}' now. "
            f"The budget resets at {reset_text}.",
            retry_after_s=wait,
            code=code,
        )

    def client_share(self, client: str, refusal: NoCapacity) -> PoolExhausted:
        reset_text, wait = self._reset_text()
        return PoolExhausted(
            f"The free pool is running low and is shared out: the client '{client}' "
            f"has used its share of {refusal.client_limit} calls on {refusal.provider} today"
            " and may not use a paid fallback. It resets at "
            f"{reset_text}.",
            retry_after_s=wait,
            code="client_fair_share",
        )

    def pool_exhausted(self, model: str, blocked: Sequence[NoCapacity]) -> PoolExhausted:
        reset_text, to_reset = self._reset_text()
        cooling = [b.retry_at_ms for b in blocked if b.retry_at_ms is not None]
        if cooling:
            wait = (min(cooling) - to_ms(self.clock())) / 1000
            return PoolExhausted(
                f"Every key that serves '{model}' is spent or cooling down after upstream "
                f"throttling; retry in {max(1, round(wait))} s. "
                f"The daily quota resets at {reset_text}.",
                retry_after_s=wait,
                code="rate_limited",
            )
        return PoolExhausted(
            f"The daily quota pool for '{model}' is spent on every route; "
            f"it resets at {reset_text} (in {_duration(to_reset)}).",
            retry_after_s=to_reset,
        )

    # -- upstreams ---------------------------------------------------------------------------

    def upstream_unavailable(
        self, model: str, broken: Open, blocked: Sequence[NoCapacity]
    ) -> UpstreamUnavailable:
        # The earliest moment a route may serve again: the breaker's end, or a cooldown's.
        now_ms = to_ms(self.clock())
        soonest = min(
            [int(broken.until * 1000), *(b.retry_at_ms for b in blocked if b.retry_at_ms)]
        )
        wait = (soonest - now_ms) / 1000
        return UpstreamUnavailable(
            f"The provider '{broken.provider}' is failing on several keys at once; "
            f"no other route can serve '{model}' now. Retry in {max(1, math.ceil(wait))} s.",
            retry_after_s=wait,
        )

    def upstream_failed(self, last: Verdict | None, *, out_of_time: bool) -> UpstreamError:
        detail = f" (last: {last.row})" if last is not None else ""
        if out_of_time or (last is not None and last.row.endswith("timeout")):
            return UpstreamTimeout(f"The upstream did not answer in time{detail}.")
        return UpstreamError(f"Every upstream attempt failed{detail}; try again shortly.")

    def body_too_large(self, limit: int) -> UpstreamError:
        return UpstreamError(
            f"The upstream's answer is larger than the gateway's limit of {limit} bytes "
            "(server.max_upstream_body_bytes) and was not passed on; the call was made and "
            "counts against the quota.",
            code="upstream_body_too_large",
        )

    def _reset_text(self) -> tuple[str, float]:
        now = self.clock()
        reset = next_reset(now, self.quota.tz, self.quota.reset_time)
        text = reset.strftime("%Y-%m-%d %H:%M") + f" {self.quota.timezone}"
        return text, (reset - now).total_seconds()


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes} min"
