"""The classification table, row by row, with the upstream answers seen in the wild.

Expected settlements are written out with literal durations on purpose: they pin the gateway
spec, so a change of a constant in router.classify has to be a deliberate change here too.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from router.classify import (
    OUTCOME_ACTION,
    ROW_NAMES,
    RULES,
    Action,
    Outcome,
    ProviderType,
    TransportFailure,
    Verdict,
    classify,
    classify_transport,
    parse_retry_after,
    read_ratelimit_headers,
    settlement_for,
)
from router.quota.types import Cooldown, Settlement

MS = ProviderType.MODELSCOPE
BL = ProviderType.BAILIAN
OA = ProviderType.OPENAI

THROTTLE = Cooldown(scope="model", base_ms=2_000, max_ms=300_000)
QUOTA = Cooldown(scope="model", base_ms=60_000, max_ms=86_400_000)
FAIL = Cooldown(scope="key", base_ms=1_000, max_ms=30_000)


def fixed(ms: int) -> Cooldown:
    return Cooldown(scope="model", base_ms=ms, max_ms=ms, fixed=True)


# ---- real bodies (upstream-facts.md) -----------------------------------------------------


def ms_errors(message: str) -> bytes:
    """ModelScope's first shape: {"errors": {...}}."""
    return orjson.dumps({"errors": {"message": message, "request_id": "0b5e7c1a-8f7d"}})


def ms_error(message: str, type_: str | None = None, code: Any = None) -> bytes:
    """ModelScope's second shape: {"error": {...}, "request_id": ...}."""
    err: dict[str, Any] = {"message": message}
    if type_ is not None:
        err["type"] = type_
    if code is not None:
        err["code"] = code
    return orjson.dumps({"error": err, "request_id": "9c1d2e3f"})


def bailian(code: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "error": {"message": message, "type": code, "param": None, "code": code},
            "request_id": "b2c1f9e0-4a3d-9d1e-8f55-0c2b1a7e6d42",
        }
    )


DAILY_QUOTA = "You have exceeded today's quota for model Qwen/Qwen3-32B, please try again tomorrow"
RATE_LIMIT = (
    "We have to rate limit you for model deepseek-ai/DeepSeek-V3.1. If you need higher "
    "limits, please consider other (commercial) API providers."
)
INSUFFICIENT_BALANCE = orjson.dumps(
    {
        "error": {
            "http_code": "429",
            "message": "insufficient balance (1008)",
            "type": "insufficient_balance_error",
        },
        "request_id": "7f2a",
    }
)
NO_PROVIDER = "Model id : foo/Retired-Model , has no provider supported"
THINKING = "enable thinking can not be support when stream=False."
BAD_TOKEN = "Authentication failed, please make sure that a valid ModelScope token is supplied."
NOT_BOUND = "Please bind your Alibaba Cloud account before use."
NOT_VERIFIED = (
    "Access denied, please make sure your associated Aliyun account is real name verified."
)
HTML_429 = b"<html><head><title>429 Too Many Requests</title></head><body></body></html>"
HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
HTML_401 = b"<html><head><title>401 Authorization Required</title></head><body></body></html>"
WAF_403 = (
    b"<!DOCTYPE html><html><head><title>Access Denied</title></head><body><h1>Sorry, your "
    b"request has been blocked</h1><p>Request ID: 0b7a3c12</p></body></html>"
)

# Rate-limit headers as seen on real answers, in mixed case as a plain dict would carry them.
RL = {
    "Modelscope-Ratelimit-Requests-Limit": "2000",
    "ModelScope-RateLimit-Requests-Remaining": "1895",
    "modelscope-ratelimit-model-requests-limit": "500",
    "MODELSCOPE-RATELIMIT-MODEL-REQUESTS-REMAINING": "477",
}
JSON = {"Content-Type": "application/json; charset=utf-8"}
SSE = {"content-type": "text/event-stream;charset=UTF-8"}


def rl(remaining: int | str, model_remaining: int | str | None = None) -> dict[str, str]:
    headers = {"Modelscope-Ratelimit-Requests-Remaining": str(remaining)}
    if model_remaining is not None:
        headers["modelscope-ratelimit-MODEL-requests-remaining"] = str(model_remaining)
    return headers


@dataclass(frozen=True)
class Case:
    id: str
    provider: ProviderType
    status: int
    body: bytes
    row: str
    outcome: Outcome
    action: Action
    settlement: Settlement
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    daily_limit: int | None = 2000


def C(*args: Any, **kwargs: Any) -> Any:
    case = Case(*args, **kwargs)
    return pytest.param(case, id=case.id)


S = Settlement
OK, RET = Outcome.OK, Action.RETURN
NK, NR, RT = Action.NEXT_KEY, Action.NEXT_ROUTE, Action.RETRY

# fmt: off
CASES = [
    # ---- 200 --------------------------------------------------------------------------
    C("ok_json", MS, 200, b'{"id":"chatcmpl-1","choices":[]}', "ok", OK, RET,
      S(remaining=1895, model_remaining=477), headers={**JSON, **RL}),
    C("ok_json_whitespace", BL, 200, b' \n{"id":"x"}\r\n', "ok", OK, RET, S(), headers=JSON),
    C("ok_json_suffix_type", OA, 200, b'{"a":1}', "ok", OK, RET, S(),
      headers={"CONTENT-TYPE": "application/vnd.api+json"}),
    C("ok_sse", MS, 200, b"", "ok", OK, RET, S(remaining=1895, model_remaining=477),
      headers={**SSE, **RL}, stream=True),
    C("ok_remaining_zero", MS, 200, b'{"id":"x"}', "ok", OK, RET,
      S(remaining=0, model_remaining=3), headers={**JSON, **rl(0, 3)}),
    C("ok_sse_model_remaining_zero", MS, 200, b"data: {}\n\n", "ok", OK, RET,
      S(remaining=10, model_remaining=0), headers={**SSE, **rl(10, 0)}, stream=True),
    C("bad_200_stream_got_json", MS, 200, b'{"id":"x"}', "bad_200", Outcome.UPSTREAM_FAILURE,
      RT, S(cooldown=FAIL), headers=JSON, stream=True),
    C("bad_200_html", MS, 200, b"<html>maintenance</html>", "bad_200",
      Outcome.UPSTREAM_FAILURE, RT, S(cooldown=FAIL), headers={"Content-Type": "text/html"}),
    C("bad_200_json_array", BL, 200, b"[]", "bad_200", Outcome.UPSTREAM_FAILURE, RT,
      S(cooldown=FAIL), headers=JSON),
    C("bad_200_truncated_json", BL, 200, b'{"id": "chatcmpl-1", "choi', "bad_200",
      Outcome.UPSTREAM_FAILURE, RT, S(cooldown=FAIL), headers=JSON),
    C("bad_200_no_content_type", MS, 200, b'{"id":"x"}', "bad_200", Outcome.UPSTREAM_FAILURE,
      RT, S(cooldown=FAIL)),
    C("bad_200_sse_when_json_wanted", MS, 200, b"data: {}\n\n", "bad_200",
      Outcome.UPSTREAM_FAILURE, RT, S(cooldown=FAIL), headers=SSE),
    C("bad_200_empty_json", MS, 200, b"", "bad_200", Outcome.UPSTREAM_FAILURE, RT,
      S(remaining=0, cooldown=FAIL), headers={**JSON, **rl(0)}),
    # ---- 429 ModelScope per-model daily cap -------------------------------------------
    C("ms_model_quota_text", MS, 429, DAILY_QUOTA.encode(), "ms_model_daily_quota",
      Outcome.MODEL_EXHAUSTED, NK, S(exhaust="model"), headers={"Content-Type": "text/plain"}),
    C("ms_model_quota_errors", MS, 429, ms_errors(DAILY_QUOTA), "ms_model_daily_quota",
      Outcome.MODEL_EXHAUSTED, NK, S(remaining=1895, model_remaining=477, exhaust="model"),
      headers=RL),
    C("ms_model_quota_error_curly", MS, 429,
      ms_error(DAILY_QUOTA.replace("'", "\u2019"), "rate_limit_error", "429"),
      "ms_model_daily_quota", Outcome.MODEL_EXHAUSTED, NK,
      S(remaining=5, model_remaining=0, exhaust="model"), headers=rl(5, 0)),
    # A model quota message beats the key headers: the store still sees remaining=0.
    C("ms_model_quota_with_key_zero", MS, 429, ms_errors(DAILY_QUOTA), "ms_model_daily_quota",
      Outcome.MODEL_EXHAUSTED, NK, S(remaining=0, model_remaining=0, exhaust="model"),
      headers=rl(0, 0)),
    # ---- 429 ModelScope "Request limit exceeded." (key or model: the store decides) -----
    C("ms_request_limit_errors", MS, 429, ms_errors("Request limit exceeded."),
      "ms_request_limit", Outcome.LIMIT_AMBIGUOUS, NK, S(exhaust="ambiguous", near_zero=20)),
    C("ms_request_limit_error_headers", MS, 429,
      ms_error("Request limit exceeded.", "rate_limit_error"), "ms_request_limit",
      Outcome.LIMIT_AMBIGUOUS, NK,
      S(remaining=0, model_remaining=12, exhaust="ambiguous", near_zero=2),
      headers=rl(0, 12), daily_limit=None),
    C("ms_request_limit_text_small_limit", MS, 429, b"Request limit exceeded.",
      "ms_request_limit", Outcome.LIMIT_AMBIGUOUS, NK, S(exhaust="ambiguous", near_zero=2),
      daily_limit=150),
    C("ms_request_limit_limit_300", MS, 429, ms_errors("Request limit exceeded."),
      "ms_request_limit", Outcome.LIMIT_AMBIGUOUS, NK, S(exhaust="ambiguous", near_zero=3),
      daily_limit=300),
    # ---- 429 whose headers say something is spent ------------------------------------
    C("ratelimit_key_spent_unknown_body", MS, 429, ms_errors("Too many requests"),
      "ratelimit_key_spent", Outcome.KEY_EXHAUSTED, NK,
      S(remaining=0, model_remaining=12, exhaust="key"), headers=rl(0, 12)),
    C("ratelimit_key_and_model_spent", MS, 429, b"", "ratelimit_key_spent",
      Outcome.KEY_EXHAUSTED, NK, S(remaining=0, model_remaining=0, exhaust="key"),
      headers=rl(0, 0)),
    C("ratelimit_key_spent_beats_rate_limit_text", MS, 429, ms_errors(RATE_LIMIT),
      "ratelimit_key_spent", Outcome.KEY_EXHAUSTED, NK, S(remaining=0, exhaust="key"),
      headers={"modelscope-ratelimit-requests-remaining": " 0 "}),
    C("ratelimit_model_spent_html", MS, 429, HTML_429, "ratelimit_model_spent",
      Outcome.MODEL_EXHAUSTED, NK, S(remaining=40, model_remaining=0, exhaust="model"),
      headers=rl(40, 0)),
    C("ratelimit_negative_means_zero", MS, 429, b"", "ratelimit_model_spent",
      Outcome.MODEL_EXHAUSTED, NK, S(remaining=7, model_remaining=0, exhaust="model"),
      headers=rl(7, -1)),
    # ---- 429 throttling -----------------------------------------------------------------
    C("ms_rate_limit_errors", MS, 429, ms_errors(RATE_LIMIT), "ms_rate_limit",
      Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE)),
    C("ms_rate_limit_error_retry_after", MS, 429, ms_error(RATE_LIMIT, "rate_limit_error"),
      "ms_rate_limit", Outcome.THROTTLED, NK,
      S(release=True, remaining=1895, model_remaining=477, cooldown=fixed(7_000)),
      headers={**RL, "Retry-After": "7"}),
    C("ms_rate_limit_text", MS, 429, RATE_LIMIT.encode(), "ms_rate_limit", Outcome.THROTTLED,
      NK, S(release=True, cooldown=THROTTLE)),
    *[
        C(f"bailian_{code}", BL, 429, bailian(code, "Requests rate limit exceeded."),
          "bailian_throttling", Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE))
        for code in (
            "Throttling", "Throttling.RateQuota", "Throttling.BurstRate",
            "limit_requests", "limit_burst_rate",
        )
    ],
    C("bailian_throttling_retry_after_capped", BL, 429, bailian("Throttling", "slow down"),
      "bailian_throttling", Outcome.THROTTLED, NK,
      S(release=True, cooldown=fixed(3_600_000)), headers={"RETRY-AFTER": "86400"}),
    C("bailian_throttling_retry_after_zero_floor", BL, 429, bailian("Throttling", "x"),
      "bailian_throttling", Outcome.THROTTLED, NK, S(release=True, cooldown=fixed(1_000)),
      headers={"retry-after": "0"}),
    C("bailian_throttling_retry_after_ms", OA, 429, bailian("limit_requests", "x"),
      "bailian_throttling", Outcome.THROTTLED, NK, S(release=True, cooldown=fixed(1_500)),
      headers={"Retry-After-Ms": "1500", "Retry-After": "9"}),
    C("bailian_throttling_retry_after_fraction", BL, 429, bailian("Throttling", "x"),
      "bailian_throttling", Outcome.THROTTLED, NK, S(release=True, cooldown=fixed(2_501)),
      headers={"Retry-After": "2.5001"}),
    C("bailian_throttling_retry_after_garbage", BL, 429, bailian("Throttling", "x"),
      "bailian_throttling", Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE),
      headers={"Retry-After": "soon"}),
    C("bailian_allocation_quota", BL, 429,
      bailian("Throttling.AllocationQuota",
              "Allocated quota exceeded, please increase your quota limit."),
      "bailian_quota_throttling", Outcome.QUOTA_THROTTLED, NK, S(release=True, cooldown=QUOTA)),
    C("bailian_insufficient_quota", BL, 429,
      bailian("insufficient_quota",
              "You exceeded your current quota, please check your plan and billing details."),
      "bailian_quota_throttling", Outcome.QUOTA_THROTTLED, NK, S(release=True, cooldown=QUOTA)),
    C("bailian_quota_code_only_in_code_field", BL, 429,
      orjson.dumps({"error": {"message": "quota", "code": "Throttling.AllocationQuota"}}),
      "bailian_quota_throttling", Outcome.QUOTA_THROTTLED, NK, S(release=True, cooldown=QUOTA)),
    C("dashscope_native_top_level_code", BL, 429,
      orjson.dumps({"code": "Throttling.RateQuota", "message": "rate", "request_id": "r"}),
      "bailian_throttling", Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE)),
    C("ms_insufficient_balance", MS, 429, INSUFFICIENT_BALANCE, "ms_insufficient_balance",
      Outcome.MODEL_UNAVAILABLE, NR, S(remaining=1895, model_remaining=477), headers=RL),
    C("ms_insufficient_balance_text", MS, 429, b"insufficient balance (1008)",
      "ms_insufficient_balance", Outcome.MODEL_UNAVAILABLE, NR, S()),
    C("throttled_other_html", MS, 429, HTML_429, "throttled_other", Outcome.THROTTLED, NK,
      S(release=True, cooldown=THROTTLE)),
    C("throttled_other_empty_with_headers", MS, 429, b"", "throttled_other", Outcome.THROTTLED,
      NK, S(release=True, remaining=5, model_remaining=1, cooldown=THROTTLE),
      headers=rl(5, 1)),
    C("throttled_other_openai_code", OA, 429, bailian("rate_limit_exceeded", "Rate limit"),
      "throttled_other", Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE)),
    # The day-quota messages only mean a spent day on ModelScope.
    C("request_limit_not_modelscope", OA, 429, ms_errors("Request limit exceeded."),
      "throttled_other", Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE)),
    C("daily_quota_not_modelscope", BL, 429, DAILY_QUOTA.encode(), "throttled_other",
      Outcome.THROTTLED, NK, S(release=True, cooldown=THROTTLE)),
    # ---- 403 free tier only --------------------------------------------------------------
    C("bailian_free_tier_only", BL, 403,
      bailian("AllocationQuota.FreeTierOnly", "The free tier of the model has been exhausted."),
      "bailian_free_tier_only", Outcome.MODEL_EXHAUSTED, NK, S(exhaust="model")),
    # ---- the key or the account is refused -------------------------------------------------
    C("ms_bad_token_errors", MS, 401, ms_errors(BAD_TOKEN), "unauthorized",
      Outcome.KEY_REJECTED, NK, S(disable_reason=f"unauthorized: {BAD_TOKEN}")),
    C("ms_bad_token_error_headers", MS, 401, ms_error(BAD_TOKEN, "authentication_error"),
      "unauthorized", Outcome.KEY_REJECTED, NK,
      S(remaining=1895, model_remaining=477, disable_reason=f"unauthorized: {BAD_TOKEN}"),
      headers=RL),
    C("unauthorized_empty", OA, 401, b"", "unauthorized", Outcome.KEY_REJECTED, NK,
      S(disable_reason="unauthorized:")),
    C("ms_not_bound_errors", MS, 401, ms_errors(NOT_BOUND), "ms_account_not_bound",
      Outcome.KEY_REJECTED, NK, S(disable_reason=f"ms_account_not_bound: {NOT_BOUND}")),
    C("ms_not_bound_text", MS, 401, NOT_BOUND.encode(), "ms_account_not_bound",
      Outcome.KEY_REJECTED, NK, S(disable_reason=f"ms_account_not_bound: {NOT_BOUND}")),
    C("bailian_invalid_api_key", BL, 401,
      bailian("invalid_api_key", "Incorrect API key provided."), "invalid_api_key",
      Outcome.KEY_REJECTED, NK, S(disable_reason="invalid_api_key: Incorrect API key provided.")),
    C("ms_not_verified_errors", MS, 403, ms_errors(NOT_VERIFIED), "ms_real_name_required",
      Outcome.KEY_REJECTED, NK, S(disable_reason=f"ms_real_name_required: {NOT_VERIFIED}")),
    C("ms_not_verified_error", MS, 403, ms_error(NOT_VERIFIED, "permission_error"),
      "ms_real_name_required", Outcome.KEY_REJECTED, NK,
      S(disable_reason=f"ms_real_name_required: {NOT_VERIFIED}")),
    C("bailian_access_denied", BL, 403, bailian("AccessDenied", "Access denied."),
      "access_denied", Outcome.KEY_REJECTED, NK,
      S(disable_reason="access_denied: Access denied.")),
    C("bailian_access_denied_unpurchased", BL, 403,
      bailian("AccessDenied.Unpurchased", "Access to model denied."), "access_denied",
      Outcome.KEY_REJECTED, NK, S(disable_reason="access_denied: Access to model denied.")),
    C("forbidden_other", MS, 403, ms_error("Forbidden", "permission_error"), "forbidden",
      Outcome.KEY_REJECTED, NK, S(disable_reason="forbidden: Forbidden")),
    C("forbidden_empty", OA, 403, b"", "forbidden", Outcome.KEY_REJECTED, NK,
      S(disable_reason="forbidden:")),
    # ---- a block in front of the API (WAF, CDN, proxy): not the key's fault ------------------
    C("forbidden_waf_html", MS, 403, WAF_403, "forbidden_not_json", Outcome.UPSTREAM_FAILURE,
      RT, S(cooldown=FAIL), headers={"Content-Type": "text/html"}),
    C("forbidden_text", BL, 403, b"Forbidden", "forbidden_not_json", Outcome.UPSTREAM_FAILURE,
      RT, S(cooldown=FAIL)),
    C("unauthorized_html", OA, 401, HTML_401, "forbidden_not_json", Outcome.UPSTREAM_FAILURE,
      RT, S(remaining=1895, model_remaining=477, cooldown=FAIL), headers={**RL}),
    C("forbidden_json_array", MS, 403, b'["blocked"]', "forbidden_not_json",
      Outcome.UPSTREAM_FAILURE, RT, S(cooldown=FAIL)),
    # the API's own words still win over the shape of the body
    C("ms_not_verified_html", MS, 403, f"<p>{NOT_VERIFIED}</p>".encode(),
      "ms_real_name_required", Outcome.KEY_REJECTED, NK,
      S(disable_reason=f"ms_real_name_required: <p>{NOT_VERIFIED}</p>")),
    C("bailian_arrearage", BL, 400,
      bailian("Arrearage", "Access denied, please make sure your account is in good standing."),
      "bailian_arrearage", Outcome.KEY_REJECTED, NK,
      S(disable_reason="bailian_arrearage: Access denied, please make sure your account is in "
                       "good standing.")),
    # ---- model not served ------------------------------------------------------------------
    C("ms_no_provider_errors", MS, 400, ms_errors(NO_PROVIDER), "ms_no_provider",
      Outcome.MODEL_UNAVAILABLE, NR, S()),
    C("ms_no_provider_error_headers", MS, 400, ms_error(NO_PROVIDER, "invalid_request_error"),
      "ms_no_provider", Outcome.MODEL_UNAVAILABLE, NR,
      S(remaining=1895, model_remaining=477), headers=RL),
    C("bailian_model_not_found", BL, 404,
      bailian("model_not_found",
              "The model `qwen-foo` does not exist or you do not have access to it."),
      "not_found", Outcome.MODEL_UNAVAILABLE, NR, S()),
    C("ms_404_text", MS, 404, b"404 page not found", "not_found", Outcome.MODEL_UNAVAILABLE,
      NR, S()),
    # ---- the client's own mistake ------------------------------------------------------------
    C("ms_thinking_non_stream", MS, 400, ms_error(THINKING, "invalid_request_error"),
      "client_error", Outcome.CLIENT_ERROR, RET, S()),
    C("ms_thinking_errors_headers", MS, 400, ms_errors(THINKING), "client_error",
      Outcome.CLIENT_ERROR, RET, S(remaining=1895, model_remaining=477), headers=RL),
    C("bailian_invalid_parameter", BL, 400, bailian("InvalidParameter", "messages is empty"),
      "client_error", Outcome.CLIENT_ERROR, RET, S()),
    C("payload_too_large", OA, 413, b"Request Entity Too Large", "client_error",
      Outcome.CLIENT_ERROR, RET, S()),
    C("unprocessable", OA, 422, b'{"detail":[{"msg":"field required"}]}', "client_error",
      Outcome.CLIENT_ERROR, RET, S()),
    # ---- the upstream's problem ------------------------------------------------------------------
    C("server_500", MS, 500, ms_errors("Internal Server Error"), "server_error",
      Outcome.UPSTREAM_FAILURE, RT, S(cooldown=FAIL)),
    C("server_502_html", BL, 502, HTML_502, "server_error", Outcome.UPSTREAM_FAILURE, RT,
      S(cooldown=FAIL)),
    C("server_503_retry_after", MS, 503, b"", "server_error", Outcome.UPSTREAM_FAILURE, RT,
      S(remaining=100, cooldown=FAIL), headers={"Retry-After": "30", **rl(100)}),
    C("server_503_key_zero_not_429", MS, 503, b"", "server_error", Outcome.UPSTREAM_FAILURE,
      RT, S(remaining=0, cooldown=FAIL), headers=rl(0)),
    *[
        C(f"unexpected_{status}", MS, status, b"whatever", "unexpected_status",
          Outcome.UPSTREAM_FAILURE, RT, S(cooldown=FAIL))
        for status in (408, 409, 302, 418, 201, 204, 402, 100)
    ],
]
# fmt: on


@pytest.mark.parametrize("case", CASES)
def test_table_row(case: Case) -> None:
    verdict = classify(case.provider, case.status, case.headers, case.body, stream=case.stream)
    assert verdict.row == case.row
    assert verdict.outcome is case.outcome
    assert verdict.action is case.action
    assert verdict.released is case.settlement.release
    assert len(verdict.message) <= 300
    assert settlement_for(verdict, daily_limit=case.daily_limit) == case.settlement


@pytest.mark.parametrize("case", CASES)
def test_table_row_with_multidict_headers(case: Case) -> None:
    """aiohttp hands over a CIMultiDictProxy: same verdict as with the plain dict."""
    proxy = CIMultiDictProxy(CIMultiDict(case.headers))
    plain = classify(case.provider, case.status, case.headers, case.body, stream=case.stream)
    multi = classify(case.provider, case.status, proxy, case.body, stream=case.stream)
    assert multi.row == case.row
    assert (multi.remaining, multi.model_remaining) == (plain.remaining, plain.model_remaining)


def test_every_rule_row_has_a_case() -> None:
    covered = {p.values[0].row for p in CASES}
    assert covered == {rule.row for rule in RULES}


def test_row_names_are_unique_metric_labels() -> None:
    assert len(ROW_NAMES) == len(set(ROW_NAMES)) == 30
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", row) for row in ROW_NAMES)


def test_every_outcome_has_an_action() -> None:
    assert set(OUTCOME_ACTION) == set(Outcome)
    assert OUTCOME_ACTION == {
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
    for outcome in Outcome:
        assert Verdict(outcome, "ok", "").action is OUTCOME_ACTION[outcome]


def test_enum_values_are_stable() -> None:
    assert [p.value for p in ProviderType] == ["modelscope", "bailian", "openai"]
    assert [f.value for f in TransportFailure] == [
        "connect",
        "connect_timeout",
        "read_timeout",
        "disconnected",
        "bad_response",
    ]


# ---- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, (None, None)),
        (RL, (1895, 477)),
        (rl(" 12 ", "\t3"), (12, 3)),
        (rl("-3", "-0"), (0, 0)),
        (rl("+7", "0"), (7, 0)),
        (rl("abc", "1.5"), (None, None)),
        (rl("", " "), (None, None)),
        (rl("1_000", "0x10"), (None, None)),
        (rl("\u0661\u0662", "12abc"), (None, None)),  # Arabic-Indic digits are not a count
        (rl("9" * 40, "1e3"), (None, None)),
        ({"modelscope-ratelimit-requests-limit": "2000"}, (None, None)),
        ({"x-modelscope-ratelimit-requests-remaining": "5"}, (None, None)),
        ({"modelscope-ratelimit-model-requests-remaining": "4"}, (None, 4)),
    ],
)
def test_read_ratelimit_headers(
    headers: dict[str, str], expected: tuple[int | None, int | None]
) -> None:
    assert read_ratelimit_headers(headers) == expected


def test_read_ratelimit_headers_multidict() -> None:
    md = CIMultiDict([("ModelScope-RateLimit-Requests-Remaining", "41")])
    md.add("modelscope-ratelimit-model-requests-remaining", "9")
    assert read_ratelimit_headers(CIMultiDictProxy(md)) == (41, 9)


NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (formatdate(NOW + 120, usegmt=True), 120.0),
        (formatdate(NOW + 3600), 3600.0),  # numeric zone "-0000"
        ("Tue, 14 Nov 2023 22:15:20 +0000", 120.0),
        ("Tue, 14 Nov 2023 23:15:20 +0100", 120.0),
        (formatdate(NOW - 60, usegmt=True), 0.0),  # already past
        ("soon", None),
        ("-5", None),
        ("", None),
        ("1e3", None),
        ("inf", None),
        ("nan", None),
        ("Mon, 99 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_retry_after_http_date_uses_the_clock() -> None:
    date = formatdate(time.time() + 120, usegmt=True)
    verdict = classify(MS, 429, {"Retry-After": date}, ms_errors(RATE_LIMIT), stream=True)
    assert verdict.retry_after_s is not None
    assert 100.0 <= verdict.retry_after_s <= 121.0
    cooldown = settlement_for(verdict, daily_limit=2000).cooldown
    assert cooldown is not None
    assert cooldown.fixed is True
    assert cooldown.scope == "model"
    assert 100_000 <= cooldown.base_ms == cooldown.max_ms <= 121_000


def test_retry_after_past_date_gets_the_floor() -> None:
    date = formatdate(time.time() - 3600, usegmt=True)
    verdict = classify(BL, 429, {"Retry-After": date}, bailian("Throttling", "x"), stream=False)
    assert verdict.retry_after_s == 0.0
    assert settlement_for(verdict, daily_limit=None).cooldown == fixed(1_000)


def test_retry_after_is_reported_on_other_rows() -> None:
    verdict = classify(MS, 503, {"retry-after": "30"}, b"", stream=False)
    assert verdict.retry_after_s == 30.0
    verdict = classify(MS, 429, {}, ms_errors(RATE_LIMIT), stream=False)
    assert verdict.retry_after_s is None


# ---- bodies -------------------------------------------------------------------------------


def test_message_from_both_modelscope_shapes() -> None:
    for body in (ms_errors(NO_PROVIDER), ms_error(NO_PROVIDER, "invalid_request_error")):
        assert classify(MS, 400, {}, body, stream=False).message == NO_PROVIDER


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error":"Request limit exceeded."}', "Request limit exceeded."),
        (b'{"errors":[{"message":"Request limit exceeded."}]}', "Request limit exceeded."),
        (b'{"message":"Request limit exceeded.","code":429}', "Request limit exceeded."),
        (b'{"error":{"message":42}}', '{"error":{"message":42}}'),
        (b'{"error":{}}', '{"error":{}}'),
        (b"[1,2,3]", "[1,2,3]"),
        (b"Request limit\n  exceeded.", "Request limit exceeded."),
    ],
)
def test_message_extraction(body: bytes, message: str) -> None:
    verdict = classify(MS, 429, {}, body, stream=False)
    assert verdict.message == message


def test_odd_request_limit_shapes_still_match() -> None:
    for body in (
        b'{"error":"Request limit exceeded."}',
        b'{"errors":[{"message":"Request limit exceeded."}]}',
        b"Request limit\n  exceeded.",
    ):
        assert classify(MS, 429, {}, body, stream=False).row == "ms_request_limit"


def test_invalid_utf8_body() -> None:
    body = b'{"errors":{"message":"\xff\xfe Request limit exceeded."}}'
    verdict = classify(MS, 429, {}, body, stream=False)
    assert verdict.row == "ms_request_limit"  # raw text fallback still matches
    assert "\ufffd" in verdict.message
    verdict = classify(MS, 500, {}, b"\x80\x81\x82", stream=False)
    assert verdict.row == "server_error"


def test_deeply_nested_json_does_not_raise() -> None:
    verdict = classify(MS, 400, {}, b"[" * 100_000, stream=False)
    assert verdict.row == "client_error"
    assert len(verdict.message) <= 300


def test_huge_body_message_is_truncated() -> None:
    body = ("x" * 70_000).encode()
    verdict = classify(MS, 500, {}, body, stream=False)
    assert len(verdict.message) == 300
    assert verdict.message.endswith("…")


def test_message_is_one_line() -> None:
    verdict = classify(MS, 500, {}, b"line one\r\nline two\x00\x1b[31m", stream=False)
    assert verdict.message == "line one line two [31m"


def test_bad_200_message_names_the_content_type() -> None:
    verdict = classify(MS, 200, {"Content-Type": "text/html"}, b"<html>", stream=True)
    assert verdict.message == "unexpected 200: content-type 'text/html', body '<html>'"


TOKEN = "ms-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@pytest.mark.parametrize(
    "body",
    [
        ms_errors(f"Authentication failed for token {TOKEN}"),
        ms_errors(f"bad header Authorization: Bearer {TOKEN}"),
        ms_errors("Authorization: Bearer abcdefSECRET123"),
        bailian("invalid_api_key", "Incorrect API key provided: sk-abcdef1234567890."),
    ],
)
def test_secrets_are_redacted(body: bytes) -> None:
    verdict = classify(MS, 401, {"Authorization": f"Bearer {TOKEN}"}, body, stream=False)
    reason = settlement_for(verdict, daily_limit=None).disable_reason
    assert reason is not None
    for text in (verdict.message, reason):
        assert TOKEN not in text
        assert "0f1e2d3c" not in text
        assert "SECRET" not in text
        assert "abcdef1234567890" not in text
        assert "[redacted]" in text


def test_secrets_are_redacted_from_a_foreign_body() -> None:
    body = f"<html><body>Authentication failed for token {TOKEN}</body></html>".encode()
    verdict = classify(MS, 401, {}, body, stream=False)
    assert verdict.row == "forbidden_not_json"
    assert settlement_for(verdict, daily_limit=None).disable_reason is None
    assert TOKEN not in verdict.message
    assert "ms-[redacted]" in verdict.message


def test_disable_reason_is_short() -> None:
    verdict = classify(MS, 401, {}, ms_errors("y" * 1000), stream=False)
    reason = settlement_for(verdict, daily_limit=None).disable_reason
    assert reason is not None
    assert reason.startswith("unauthorized: yyy")
    assert len(reason) == 160


# ---- transport ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "row", "released"),
    [
        (TransportFailure.CONNECT, "transport_connect", True),
        (TransportFailure.CONNECT_TIMEOUT, "transport_connect_timeout", True),
        (TransportFailure.READ_TIMEOUT, "transport_read_timeout", False),
        (TransportFailure.DISCONNECTED, "transport_disconnected", False),
        (TransportFailure.BAD_RESPONSE, "transport_bad_response", False),
    ],
)
def test_transport_failure(failure: TransportFailure, row: str, released: bool) -> None:
    verdict = classify_transport(failure, "Cannot connect to host api-inference.modelscope.cn")
    assert verdict.outcome is Outcome.UPSTREAM_FAILURE
    assert verdict.action is Action.RETRY
    assert verdict.row == row
    assert verdict.released is released
    assert verdict.message == "Cannot connect to host api-inference.modelscope.cn"
    assert (verdict.remaining, verdict.model_remaining, verdict.retry_after_s) == (
        None,
        None,
        None,
    )
    assert settlement_for(verdict, daily_limit=2000) == S(release=released, cooldown=FAIL)


def test_transport_detail_defaults_and_is_sanitised() -> None:
    assert classify_transport(TransportFailure.READ_TIMEOUT).message == "read_timeout"
    verdict = classify_transport(
        TransportFailure.DISCONNECTED, f"reset\nheaders: Authorization: Bearer {TOKEN} " + "z" * 500
    )
    assert TOKEN not in verdict.message
    assert "\n" not in verdict.message
    assert len(verdict.message) == 300


# ---- settlement_for details ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("daily_limit", "near_zero"),
    [(None, 2), (0, 2), (100, 2), (199, 2), (299, 2), (300, 3), (2000, 20), (10_000, 100)],
)
def test_ambiguous_near_zero(daily_limit: int | None, near_zero: int) -> None:
    verdict = classify(MS, 429, rl(3, 1), ms_errors("Request limit exceeded."), stream=False)
    assert settlement_for(verdict, daily_limit=daily_limit) == S(
        remaining=3, model_remaining=1, exhaust="ambiguous", near_zero=near_zero
    )


def test_throttle_cooldown_from_verdict_retry_after() -> None:
    base = Verdict(Outcome.THROTTLED, "throttled_other", "", released=True)
    cases = [(None, THROTTLE), (12.0, fixed(12_000)), (0.0001, fixed(1_000))]
    cases += [(1e12, fixed(3_600_000)), (math.inf, THROTTLE), (math.nan, THROTTLE)]
    cases += [(-5.0, fixed(1_000))]
    for retry_after, cooldown in cases:
        verdict = Verdict(base.outcome, base.row, "", retry_after_s=retry_after, released=True)
        assert settlement_for(verdict, daily_limit=None) == S(release=True, cooldown=cooldown)


def test_no_state_outcomes_only_sync_headers() -> None:
    for outcome in (Outcome.OK, Outcome.CLIENT_ERROR, Outcome.MODEL_UNAVAILABLE):
        verdict = Verdict(outcome, "ok", "msg", retry_after_s=5.0, remaining=4, model_remaining=2)
        assert settlement_for(verdict, daily_limit=2000) == S(remaining=4, model_remaining=2)


# ---- never raises ---------------------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(
    [
        "modelscope-ratelimit-requests-remaining",
        "ModelScope-RateLimit-Model-Requests-Remaining",
        "Retry-After",
        "retry-after-ms",
        "Content-Type",
    ]
) | st.text(max_size=30)
_HEADER_VALUES = st.sampled_from(
    ["0", "-1", "12", "text/event-stream", "application/json", "Wed, 21 Oct 2015 07:28:00 GMT"]
) | st.text(max_size=60)
_BODIES = (
    st.sampled_from(
        [
            ms_errors("Request limit exceeded."),
            ms_errors(DAILY_QUOTA),
            INSUFFICIENT_BALANCE,
            bailian("Throttling.AllocationQuota", "x"),
            b'{"error":{"message":null,"code":[1],"type":{"a":1}}}',
            b'{"errors":[]}',
            b"{}",
            b"",
        ]
    )
    | st.binary(max_size=4096)
    | st.text(max_size=2000).map(str.encode)
)


@settings(max_examples=400, deadline=None)
@given(
    provider=st.sampled_from(list(ProviderType)),
    status=st.integers(min_value=100, max_value=599),
    headers=st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=6),
    body=_BODIES,
    stream=st.booleans(),
    daily_limit=st.none() | st.integers(min_value=0, max_value=100_000),
)
def test_classify_never_raises(
    provider: ProviderType,
    status: int,
    headers: dict[str, str],
    body: bytes,
    stream: bool,
    daily_limit: int | None,
) -> None:
    verdict = classify(provider, status, headers, body, stream=stream)
    assert len(verdict.message) <= 300
    assert verdict.row in ROW_NAMES
    assert verdict.action is OUTCOME_ACTION[verdict.outcome]
    assert verdict.remaining is None or verdict.remaining >= 0
    assert verdict.retry_after_s is None or verdict.retry_after_s >= 0
    if status == 200:
        assert verdict.outcome in (Outcome.OK, Outcome.UPSTREAM_FAILURE)
    else:
        assert verdict.outcome is not Outcome.OK
    if status == 429:  # a 429 is never the client's fault, a failure or a dead key
        assert verdict.action is Action.NEXT_KEY or verdict.row == "ms_insufficient_balance"
    settlement = settlement_for(verdict, daily_limit=daily_limit)
    assert settlement.release is verdict.released
    if settlement.cooldown is not None:
        assert 0 < settlement.cooldown.base_ms <= settlement.cooldown.max_ms <= 86_400_000
    if settlement.disable_reason is not None:
        assert len(settlement.disable_reason) <= 160


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(max_size=50).map(lambda s: s + " "),
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=40),
    suffix=st.text(max_size=50).map(lambda s: " " + s),
    status=st.sampled_from([400, 401, 403, 429, 500]),
)
def test_tokens_never_reach_the_message(prefix: str, secret: str, suffix: str, status: int) -> None:
    assume(secret not in prefix + suffix)
    for token in (f"ms-{secret}", f"sk-{secret}", f"Bearer {secret}"):
        body = (prefix + token + suffix).encode()
        verdict = classify(MS, status, {}, body, stream=False)
        assert secret not in verdict.message
        reason = settlement_for(verdict, daily_limit=None).disable_reason
        if reason is not None:
            row, _, text = reason.partition(": ")
            assert row == verdict.row
            assert secret not in text


@given(value=st.text(max_size=80))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, now=NOW)
    assert result is None or (math.isfinite(result) and result >= 0)
