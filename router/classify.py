"""The one classification table: what an upstream answer means for the key, the model and the call.

Every failover decision of the gateway comes from here. The module is pure (no I/O, no state);
the only clock it reads is ``time.time()`` for a ``Retry-After`` given as an HTTP-date.

``classify`` turns (provider, status, headers, body) into a ``Verdict``: an ``Outcome``, the
name of the table row that matched (a metrics label), a log-safe message and what the headers
said. ``Verdict.action`` says what the request path does next; ``settlement_for`` says what the
quota store must record.

The table is data: ``RULES`` is matched top to bottom, the first row whose predicate holds
wins. Adding an upstream quirk is one ``Rule`` plus one test case.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Final

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from router.quota.types import Cooldown, Settlement

# --------------------------------------------------------------------------------------------
# Durations and limits: the only tuning knobs of this module.
# --------------------------------------------------------------------------------------------

#: THROTTLED with a Retry-After: a fixed cooldown of exactly that long, within these bounds.
THROTTLE_RETRY_AFTER_MIN_MS: Final = 1_000
THROTTLE_RETRY_AFTER_MAX_MS: Final = 3_600_000
#: THROTTLED without a Retry-After: seconds, doubling per repeat; never a spent day.
THROTTLE_COOLDOWN: Final = Cooldown(scope="model", base_ms=2_000, max_ms=300_000)
#: QUOTA_THROTTLED: a minute, doubling; the store caps it at the next quota reset.
QUOTA_THROTTLE_COOLDOWN: Final = Cooldown(scope="model", base_ms=60_000, max_ms=86_400_000)
#: UPSTREAM_FAILURE: a short cooldown of the key (or of the host behind it), doubling.
UPSTREAM_FAILURE_COOLDOWN: Final = Cooldown(scope="key", base_ms=1_000, max_ms=30_000)
#: LIMIT_AMBIGUOUS: the whole key counts as spent when its remaining is at most
#: max(AMBIGUOUS_NEAR_ZERO_MIN, daily_limit // AMBIGUOUS_NEAR_ZERO_DIVISOR).
AMBIGUOUS_NEAR_ZERO_MIN: Final = 2
AMBIGUOUS_NEAR_ZERO_DIVISOR: Final = 100

MESSAGE_MAX_CHARS: Final = 300
DISABLE_REASON_MAX_CHARS: Final = 160
MAX_BODY_BYTES: Final = 64 * 1024

REMAINING_HEADER: Final = "modelscope-ratelimit-requests-remaining"
MODEL_REMAINING_HEADER: Final = "modelscope-ratelimit-model-requests-remaining"
RETRY_AFTER_HEADER: Final = "retry-after"
RETRY_AFTER_MS_HEADER: Final = "retry-after-ms"


class ProviderType(StrEnum):
    MODELSCOPE = "modelscope"
    BAILIAN = "bailian"
    OPENAI = "openai"


class Outcome(StrEnum):
    OK = "ok"
    KEY_EXHAUSTED = "key_exhausted"
    MODEL_EXHAUSTED = "model_exhausted"
    LIMIT_AMBIGUOUS = "limit_ambiguous"
    THROTTLED = "throttled"
    QUOTA_THROTTLED = "quota_throttled"
    MODEL_UNAVAILABLE = "model_unavailable"
    KEY_REJECTED = "key_rejected"
    CLIENT_ERROR = "client_error"
    UPSTREAM_FAILURE = "upstream_failure"


class Action(StrEnum):
    RETURN = "return"  # give the upstream answer to the client
    NEXT_KEY = "next_key"  # key out of the pool now; reserve again, not a retry attempt
    NEXT_ROUTE = "next_route"  # this provider cannot serve this model
    RETRY = "retry"  # transient failure: next key, counts against retry.max_attempts


class TransportFailure(StrEnum):
    CONNECT = "connect"  # refused / DNS / TLS handshake: the request never went out
    CONNECT_TIMEOUT = "connect_timeout"  # never went out
    READ_TIMEOUT = "read_timeout"  # no first byte within the timeout
    DISCONNECTED = "disconnected"  # closed / reset after the request was sent
    BAD_RESPONSE = "bad_response"  # a 200 that is not the expected JSON / SSE


OUTCOME_ACTION: Final[Mapping[Outcome, Action]] = {
    Outcome.OK: Action.RETURN,
    Outcome.CLIENT_ERROR: Action.RETURN,
    Outcome.KEY_EXHAUSTED: Action.NEXT_KEY,
    Outcome.MODEL_EXHAUSTED: Action.NEXT_KEY,
    Outcome.LIMIT_AMBIGUOUS: Action.NEXT_KEY,
    Outcome.THROTTLED: Action.NEXT_KEY,
    Outcome.QUOTA_THROTTLED: Action.NEXT_KEY,
    Outcome.KEY_REJECTED: Action.NEXT_KEY,
    Outcome.MODEL_UNAVAILABLE: Action.NEXT_ROUTE,
    Outcome.UPSTREAM_FAILURE: Action.RETRY,
}

#: Outcomes whose counted call is given back: the upstream did not spend it.
RELEASED_OUTCOMES: Final = frozenset({Outcome.THROTTLED, Outcome.QUOTA_THROTTLED})


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    row: str  # stable name of the table row that matched (a metrics label)
    message: str  # log-safe upstream text, at most MESSAGE_MAX_CHARS, secrets redacted
    retry_after_s: float | None = None
    remaining: int | None = None  # modelscope-ratelimit-requests-remaining
    model_remaining: int | None = None  # modelscope-ratelimit-model-requests-remaining
    released: bool = False  # give the counted call back

    @property
    def action(self) -> Action:
        return OUTCOME_ACTION[self.outcome]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Signals:
    """Everything a rule may look at, extracted once from the answer. Built for every
    answer and never kept, so not frozen: a frozen dataclass pays a setattr call per field
    (about 0.6 µs here)."""

    provider: ProviderType
    status: int
    codes: frozenset[str]  # casefolded error code / type values from the body
    message: str  # the body's error message, else its raw text
    remaining: int | None
    model_remaining: int | None
    well_formed_200: bool  # only meaningful for status 200
    foreign_body: bool = False  # an error body that is neither empty nor a JSON object


Predicate = Callable[[Signals], bool]


@dataclass(frozen=True, slots=True)
class Rule:
    row: str
    outcome: Outcome
    when: Predicate


def _status(*statuses: int) -> Predicate:
    wanted = frozenset(statuses)
    return lambda s: s.status in wanted


def _provider(provider: ProviderType) -> Predicate:
    return lambda s: s.provider is provider


def _text(pattern: str) -> Predicate:
    regex = re.compile(pattern, re.IGNORECASE)
    return lambda s: regex.search(s.message) is not None


def _code(*codes: str) -> Predicate:
    wanted = frozenset(c.casefold() for c in codes)
    return lambda s: not wanted.isdisjoint(s.codes)


def _code_prefix(prefix: str) -> Predicate:
    folded = prefix.casefold()
    return lambda s: any(c.startswith(folded) for c in s.codes)


def _all(*preds: Predicate) -> Predicate:
    return lambda s: all(p(s) for p in preds)


def _any(*preds: Predicate) -> Predicate:
    return lambda s: any(p(s) for p in preds)


def _always(_: Signals) -> bool:
    return True


_O = Outcome
_MS = ProviderType.MODELSCOPE

RULES: Final[tuple[Rule, ...]] = (
    # A 200 is OK when it is the SSE / JSON object that was asked for, whatever the
    # remaining headers say (the store exhausts the key from the remaining fields).
    Rule("ok", _O.OK, _all(_status(200), lambda s: s.well_formed_200)),
    Rule("bad_200", _O.UPSTREAM_FAILURE, _status(200)),
    # ---- 429: specific ModelScope messages first --------------------------------------
    Rule(
        "ms_model_daily_quota",
        _O.MODEL_EXHAUSTED,
        _all(_status(429), _provider(_MS), _text(r"exceeded\s+today\W{0,3}s\s+quota")),
    ),
    Rule(
        "ms_request_limit",
        _O.LIMIT_AMBIGUOUS,
        _all(_status(429), _provider(_MS), _text(r"request\s+limit\s+exceeded")),
    ),
    # ---- 429 whose headers say the key / the model is spent -----------------------------
    Rule("ratelimit_key_spent", _O.KEY_EXHAUSTED, _all(_status(429), lambda s: s.remaining == 0)),
    Rule(
        "ratelimit_model_spent",
        _O.MODEL_EXHAUSTED,
        _all(_status(429), lambda s: s.model_remaining == 0),
    ),
    # ---- 429 throttling: seconds to a minute, never a spent day -------------------------
    Rule(
        "ms_rate_limit", _O.THROTTLED, _all(_status(429), _text(r"have\s+to\s+rate\s+limit\s+you"))
    ),
    Rule(
        "bailian_throttling",
        _O.THROTTLED,
        _all(
            _status(429),
            _code(
                "Throttling",
                "Throttling.RateQuota",
                "Throttling.BurstRate",
                "limit_requests",
                "limit_burst_rate",
            ),
        ),
    ),
    Rule(
        "bailian_quota_throttling",
        _O.QUOTA_THROTTLED,
        _all(_status(429), _code("Throttling.AllocationQuota", "insufficient_quota")),
    ),
    # A retired ModelScope model answers "insufficient balance": not a key problem.
    Rule(
        "ms_insufficient_balance",
        _O.MODEL_UNAVAILABLE,
        _all(
            _status(429),
            _any(_code("insufficient_balance_error"), _text(r"insufficient[\s_]+balance")),
        ),
    ),
    Rule("throttled_other", _O.THROTTLED, _status(429)),
    # ---- 401 / 403 / 400 about the key or the account ------------------------------------
    Rule(
        "bailian_free_tier_only",
        _O.MODEL_EXHAUSTED,
        _all(_status(403), _code("AllocationQuota.FreeTierOnly")),
    ),
    Rule(
        "ms_account_not_bound",
        _O.KEY_REJECTED,
        _all(_status(401), _text(r"bind\s+your\s+alibaba\s+cloud\s+account")),
    ),
    Rule("ms_real_name_required", _O.KEY_REJECTED, _all(_status(403), _text(r"real[\s_-]*name"))),
    # A 401/403 that is not the API's JSON (an HTML page of a WAF or CDN, a proxy's text) is
    # a block in front of the API, not a verdict on the key: disabling would take every key
    # out one by one. A short cooldown, and the provider breaker (router.breaker) if it
    # repeats on several keys.
    Rule(
        "forbidden_not_json",
        _O.UPSTREAM_FAILURE,
        _all(_status(401, 403), lambda s: s.foreign_body),
    ),
    Rule("invalid_api_key", _O.KEY_REJECTED, _all(_status(401), _code("invalid_api_key"))),
    Rule("unauthorized", _O.KEY_REJECTED, _status(401)),
    # AccessDenied.Unpurchased is "model not enabled for this account": the gateway spec
    # disables the key for every 403 AccessDenied*.
    Rule("access_denied", _O.KEY_REJECTED, _all(_status(403), _code_prefix("AccessDenied"))),
    Rule("forbidden", _O.KEY_REJECTED, _status(403)),
    Rule("bailian_arrearage", _O.KEY_REJECTED, _all(_status(400), _code("Arrearage"))),
    # ---- the model is not served by this provider ---------------------------------------
    Rule(
        "ms_no_provider",
        _O.MODEL_UNAVAILABLE,
        _all(_status(400), _text(r"has\s+no\s+provider\s+supported")),
    ),
    Rule("not_found", _O.MODEL_UNAVAILABLE, _status(404)),
    # ---- the client's own mistake: returned as is ----------------------------------------
    Rule("client_error", _O.CLIENT_ERROR, _status(400, 413, 422)),
    # ---- everything else is the upstream's problem ---------------------------------------
    Rule("server_error", _O.UPSTREAM_FAILURE, lambda s: 500 <= s.status <= 599),
    Rule("unexpected_status", _O.UPSTREAM_FAILURE, _always),
)

#: (row, released) per transport failure: released when the request never went out.
TRANSPORT_ROWS: Final[Mapping[TransportFailure, tuple[str, bool]]] = {
    TransportFailure.CONNECT: ("transport_connect", True),
    TransportFailure.CONNECT_TIMEOUT: ("transport_connect_timeout", True),
    TransportFailure.READ_TIMEOUT: ("transport_read_timeout", False),
    TransportFailure.DISCONNECTED: ("transport_disconnected", False),
    TransportFailure.BAD_RESPONSE: ("transport_bad_response", False),
}

#: Every row name a Verdict can carry (metrics labels can be pre-registered from this).
ROW_NAMES: Final[tuple[str, ...]] = tuple(r.row for r in RULES) + tuple(
    row for row, _ in TRANSPORT_ROWS.values()
)


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------

_INT_RE: Final = re.compile(r"[+-]?[0-9]{1,18}")
_SECONDS_RE: Final = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """``name`` (lower case) looked up case-insensitively, in any Mapping."""
    value = headers.get(name)
    if value is None and not isinstance(headers, CIMultiDictProxy | CIMultiDict):
        # aiohttp's headers are case-insensitive already: a miss there is a miss
        for key, candidate in headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = candidate
                break
    return value if isinstance(value, str) else None


def _parse_count(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if _INT_RE.fullmatch(text) is None:
        return None
    return max(0, int(text))


def read_ratelimit_headers(headers: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(requests-remaining, model-requests-remaining); None when absent or garbage."""
    return (
        _parse_count(_header(headers, REMAINING_HEADER)),
        _parse_count(_header(headers, MODEL_REMAINING_HEADER)),
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date); None if garbage."""
    if value is None:
        return None
    text = value.strip()
    if _SECONDS_RE.fullmatch(text) is not None:
        return float(text)
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        at = when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, at - (time.time() if now is None else now))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = _header(headers, RETRY_AFTER_MS_HEADER)
    if ms is not None and _SECONDS_RE.fullmatch(ms.strip()) is not None:
        return float(ms.strip()) / 1000.0
    return parse_retry_after(_header(headers, RETRY_AFTER_HEADER))


def _media_type(headers: Mapping[str, str]) -> str:
    value = _header(headers, "content-type") or ""
    return value.split(";", 1)[0].strip().lower()


def _well_formed_200(headers: Mapping[str, str], body: bytes, stream: bool) -> bool:
    media = _media_type(headers)
    if stream:
        return media == "text/event-stream"
    if media != "application/json" and not media.endswith("+json"):
        return False
    text = body.strip()
    return text.startswith(b"{") and text.endswith(b"}")


# --------------------------------------------------------------------------------------------
# Body
# --------------------------------------------------------------------------------------------

_MESSAGE_KEYS: Final = ("message", "msg", "detail")
_NO_CODES: Final[frozenset[str]] = frozenset()
_CODE_KEYS: Final = ("code", "type")


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _error_object(data: dict[str, Any]) -> dict[str, Any]:
    """The dict that holds the error: ``error`` / ``errors`` (or their first item), else the top."""
    for key in ("error", "errors"):
        inner = data.get(key)
        if isinstance(inner, list) and inner:
            inner = inner[0]
        if isinstance(inner, dict):
            return inner
        if isinstance(inner, str):
            return {"message": inner}
    return data


def _codes(*objs: dict[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for obj in objs:
        for key in _CODE_KEYS:
            value = obj.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                found.add(str(value).strip().casefold())
    found.discard("")
    return frozenset(found)


def _first_message(obj: dict[str, Any]) -> str | None:
    for key in _MESSAGE_KEYS:
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def parse_error_body(body: bytes) -> tuple[str, frozenset[str]]:
    """(message, casefolded codes) of an error body; the raw text when it has no message."""
    message, codes, _ = _parse_error_body(body)
    return message, codes


def _parse_error_body(body: bytes) -> tuple[str, frozenset[str], bool]:
    """parse_error_body, and whether the body is foreign: neither empty nor a JSON object."""
    raw = body[:MAX_BODY_BYTES]
    data = _loads(raw)
    if not isinstance(data, dict):
        return raw.decode("utf-8", errors="replace"), frozenset(), bool(raw.strip())
    found = _error_object(data)
    message = _first_message(found)
    if message is None:
        message = raw.decode("utf-8", errors="replace")
    return message, _codes(found, data), False


# --------------------------------------------------------------------------------------------
# Log-safe messages
# --------------------------------------------------------------------------------------------

_REDACT_SCAN_CHARS: Final = 4 * MESSAGE_MAX_CHARS
_BEARER_RE: Final = re.compile(r"(?i)\bbearer(?:\s+bearer\b)*\s+[^\s\"',;]+")
_TOKEN_RE: Final = re.compile(r"\b(ms|sk)-[A-Za-z0-9][A-Za-z0-9_\-]{7,}")
_SPACE_RE: Final = re.compile(r"[\s\x00-\x1f\x7f]+")


def safe_message(text: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    """One line, tokens and Authorization values redacted, at most ``limit`` characters."""
    if not text:  # every success: nothing to scan
        return ""
    text = text[:_REDACT_SCAN_CHARS]
    text = _BEARER_RE.sub("Bearer [redacted]", text)
    text = _TOKEN_RE.sub(r"\1-[redacted]", text)
    text = _SPACE_RE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


# --------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------


def _bad_200_message(headers: Mapping[str, str], body: bytes) -> str:
    snippet = body[:200].decode("utf-8", errors="replace")
    return f"unexpected 200: content-type {_media_type(headers) or '-'!r}, body {snippet!r}"


def _signals(
    provider: ProviderType, status: int, headers: Mapping[str, str], body: bytes, stream: bool
) -> Signals:
    remaining, model_remaining = read_ratelimit_headers(headers)
    foreign = False
    if status == 200:
        message, codes = "", _NO_CODES
        well_formed = _well_formed_200(headers, body, stream)
    else:
        message, codes, foreign = _parse_error_body(body)
        well_formed = False
    return Signals(
        provider, status, codes, message, remaining, model_remaining, well_formed, foreign
    )


def match_rule(signals: Signals) -> Rule:
    """The first row of RULES that holds (the last row always does)."""
    return next(rule for rule in RULES if rule.when(signals))


def classify(
    provider: ProviderType,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    stream: bool,
) -> Verdict:
    """What an upstream HTTP answer means. Never raises."""
    signals = _signals(provider, status, headers, body, stream)
    rule = match_rule(signals)
    if rule.row == "bad_200":
        message = safe_message(_bad_200_message(headers, body))
    else:
        message = safe_message(signals.message)
    return Verdict(
        outcome=rule.outcome,
        row=rule.row,
        message=message,
        # A wait only means something on a refusal (every request path reads it then).
        retry_after_s=None if rule.outcome is Outcome.OK else _retry_after(headers),
        remaining=signals.remaining,
        model_remaining=signals.model_remaining,
        released=rule.outcome in RELEASED_OUTCOMES,
    )


def classify_transport(failure: TransportFailure, detail: str = "") -> Verdict:
    """A call that got no usable HTTP answer; released only when it never went out."""
    row, released = TRANSPORT_ROWS[failure]
    return Verdict(
        outcome=Outcome.UPSTREAM_FAILURE,
        row=row,
        message=safe_message(detail or failure.value),
        released=released,
    )


# --------------------------------------------------------------------------------------------
# settlement_for
# --------------------------------------------------------------------------------------------


def _near_zero(daily_limit: int | None) -> int:
    if not daily_limit:
        return AMBIGUOUS_NEAR_ZERO_MIN
    return max(AMBIGUOUS_NEAR_ZERO_MIN, daily_limit // AMBIGUOUS_NEAR_ZERO_DIVISOR)


def _throttle_cooldown(retry_after_s: float | None) -> Cooldown:
    if retry_after_s is None or not math.isfinite(retry_after_s):
        return THROTTLE_COOLDOWN
    ms = min(THROTTLE_RETRY_AFTER_MAX_MS, math.ceil(max(0.0, retry_after_s) * 1000))
    ms = max(THROTTLE_RETRY_AFTER_MIN_MS, ms)
    return Cooldown(scope="model", base_ms=ms, max_ms=ms, fixed=True)


def settlement_for(verdict: Verdict, *, daily_limit: int | None) -> Settlement:
    """What the quota store must record for this verdict (header sync, release, state)."""
    common = Settlement(
        release=verdict.released,
        remaining=verdict.remaining,
        model_remaining=verdict.model_remaining,
    )
    match verdict.outcome:
        case Outcome.KEY_EXHAUSTED:
            return replace(common, exhaust="key")
        case Outcome.MODEL_EXHAUSTED:
            return replace(common, exhaust="model")
        case Outcome.LIMIT_AMBIGUOUS:
            return replace(common, exhaust="ambiguous", near_zero=_near_zero(daily_limit))
        case Outcome.THROTTLED:
            return replace(common, cooldown=_throttle_cooldown(verdict.retry_after_s))
        case Outcome.QUOTA_THROTTLED:
            return replace(common, cooldown=QUOTA_THROTTLE_COOLDOWN)
        case Outcome.UPSTREAM_FAILURE:
            return replace(common, cooldown=UPSTREAM_FAILURE_COOLDOWN)
        case Outcome.KEY_REJECTED:
            reason = safe_message(f"{verdict.row}: {verdict.message}", DISABLE_REASON_MAX_CHARS)
            return replace(common, disable_reason=reason)
        case _:
            return common
