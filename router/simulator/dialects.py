"""How each simulated upstream words its errors (bodies, statuses, headers).

Bodies follow /work/shared/reference/upstream-facts.md: ModelScope mixes
``{"errors": {"message", "request_id"}}`` and ``{"error": {...}, "request_id"}``;
Bailian always answers ``{"error": {"message", "type": code, "param": null, "code"},
"request_id"}``.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from router.simulator.config import BailianConfig, ModelScopeConfig
from router.simulator.state import Account, Provider, ProviderState, Quota

MS_AUTH_FAILED = (
    "Authentication failed, please make sure that a valid ModelScope token is supplied."
)
MS_UNBOUND = "Please bind your Alibaba Cloud account before use."
MS_UNVERIFIED = (
    "Access denied, please make sure your associated Aliyun account is real name verified."
)
MS_DAILY = "Request limit exceeded."
MS_THINKING = "enable thinking can not be support when stream=False."
BAILIAN_THINKING = "parameter.enable_thinking must be set to false for non-streaming calls"

# Bailian code -> (HTTP status, message)
BAILIAN_CODES: dict[str, tuple[int, str]] = {
    "Throttling": (429, "Requests throttling triggered."),
    "Throttling.RateQuota": (429, "Requests rate limit exceeded, please try again later."),
    "limit_requests": (429, "You exceeded your current requests list."),
    "Throttling.BurstRate": (
        429,
        "Request rate increased too quickly. To ensure system stability, please adjust "
        "your client logic to scale requests more smoothly over time.",
    ),
    "limit_burst_rate": (
        429,
        "Request rate increased too quickly. To ensure system stability, please adjust "
        "your client logic to scale requests more smoothly over time.",
    ),
    "Throttling.AllocationQuota": (
        429,
        "Allocated quota exceeded, please increase your quota limit.",
    ),
    "insufficient_quota": (
        429,
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "AllocationQuota.FreeTierOnly": (
        403,
        "The free tier of the model has been exhausted. If you wish to continue access the "
        'model on a paid basis, please disable the "use free tier only" mode in the '
        "management console.",
    ),
    "AccessDenied.Unpurchased": (
        403,
        "Access to model denied. Please make sure you are eligible for using the model.",
    ),
    "Arrearage": (
        400,
        "Access denied, please make sure your account is in good standing.",
    ),
    "invalid_api_key": (401, "Incorrect API key provided. "),
    "model_not_found": (404, "The model does not exist or you do not have access to it."),
    "invalid_parameter_error": (400, "The request parameters are invalid."),
    "InvalidParameter": (400, "The request parameters are invalid."),
    "InternalError": (500, "An internal error has occured, please try again later."),
    "BadGateway": (502, "Bad gateway, please try again later."),
    "ServiceUnavailable": (503, "The service is unavailable, please try again later."),
}
BAILIAN_SERVER_CODES = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable"}
MS_SERVER_MESSAGES = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
ModelScopeHeaders = (
    "modelscope-ratelimit-requests-limit",
    "modelscope-ratelimit-requests-remaining",
    "modelscope-ratelimit-model-requests-limit",
    "modelscope-ratelimit-model-requests-remaining",
)


def request_id() -> str:
    return str(uuid.uuid4())


def json_response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def ms_errors(status: int, message: str) -> web.Response:
    """ModelScope's ``{"errors": {...}}`` shape."""
    return json_response(status, {"errors": {"message": message, "request_id": request_id()}})


def ms_error(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    """ModelScope's ``{"error": {...}, "request_id": ...}`` shape."""
    body = {
        "error": {"message": message, "type": type_, "param": None, "code": code},
        "request_id": request_id(),
    }
    return json_response(status, body)


def ms_insufficient_balance() -> web.Response:
    body = {
        "error": {
            "http_code": "429",
            "message": "insufficient balance (1008)",
            "type": "insufficient_balance_error",
        },
        "request_id": request_id(),
    }
    return json_response(429, body)


def ms_model_quota_message(model: str) -> str:
    return f"You have exceeded today's quota for model {model}, please try again tomorrow"


def ms_throttle_message(model: str | None) -> str:
    return (
        f"We have to rate limit you for model {model or ''}. If you need higher limits, "
        "please consider other (commercial) API providers."
    )


def bailian_error(code: str, message: str | None = None, status: int | None = None) -> web.Response:
    """A Bailian error; status and message default to the facts table (unknown code: 400)."""
    known_status, known_message = BAILIAN_CODES.get(code, (400, f"{code}"))
    body = {
        "error": {
            "message": message if message is not None else known_message,
            "type": code,
            "param": None,
            "code": code,
        },
        "request_id": request_id(),
    }
    return json_response(status if status is not None else known_status, body)


class Dialect:
    """The part of an upstream's behaviour that differs between ModelScope and Bailian."""

    provider: Provider
    models: list[str]
    concurrency_limit: int | None = None

    def auth_error(self, secret: str | None, account: Account | None) -> web.Response | None:
        raise NotImplementedError

    def model_error(self, model: str) -> web.Response | None:
        raise NotImplementedError

    def bad_request(self, message: str) -> web.Response:
        raise NotImplementedError

    def not_found(self, message: str) -> web.Response:
        raise NotImplementedError

    def thinking_error(self) -> web.Response:
        raise NotImplementedError

    def quota_error(self, quota: Quota, model: str) -> web.Response:
        raise NotImplementedError

    def throttle(self, model: str | None) -> web.Response:
        raise NotImplementedError

    def server_error(self, status: int) -> web.Response:
        raise NotImplementedError

    def owned_by(self, model: str) -> str:
        return "system"

    def decorate(
        self,
        response: web.StreamResponse,
        provider: ProviderState,
        account: Account | None,
        model: str | None,
    ) -> None:
        """Add provider headers to an answer that is about to be sent."""


class ModelScopeDialect(Dialect):
    provider: Provider = "modelscope"

    def __init__(self, config: ModelScopeConfig):
        self.config = config
        self.models = list(config.models)
        self.concurrency_limit = config.throttle_concurrency

    def auth_error(self, secret: str | None, account: Account | None) -> web.Response | None:
        if account is None:
            return ms_errors(401, MS_AUTH_FAILED)
        if account.status == "unbound":
            return ms_error(401, MS_UNBOUND, "authentication_error", "401")
        if account.status == "unverified":
            return ms_error(403, MS_UNVERIFIED, "permission_error", "403")
        return None

    def model_error(self, model: str) -> web.Response | None:
        if model in self.config.retired_models:
            return ms_insufficient_balance()
        if model not in self.models:
            return ms_errors(400, f"Model id : {model} , has no provider supported")
        return None

    def bad_request(self, message: str) -> web.Response:
        return ms_errors(400, message)

    def not_found(self, message: str) -> web.Response:
        return ms_errors(404, message)

    def thinking_error(self) -> web.Response:
        return ms_error(400, MS_THINKING, "invalid_request_error")

    def quota_error(self, quota: Quota, model: str) -> web.Response:
        if quota == "daily":
            return ms_errors(429, MS_DAILY)
        return ms_errors(429, ms_model_quota_message(model))

    def throttle(self, model: str | None) -> web.Response:
        return ms_errors(429, ms_throttle_message(model))

    def server_error(self, status: int) -> web.Response:
        return ms_errors(status, MS_SERVER_MESSAGES.get(status, "Server Error"))

    def owned_by(self, model: str) -> str:
        org, sep, _ = model.partition("/")
        return org if sep else "modelscope"

    def decorate(
        self,
        response: web.StreamResponse,
        provider: ProviderState,
        account: Account | None,
        model: str | None,
    ) -> None:
        if not self.config.ratelimit_headers or account is None or model is None:
            return
        if account.status != "ok" or response.status >= 500:
            return
        rl = provider.rate_limit(account, model)
        values = (rl.limit, rl.remaining, rl.model_limit, rl.model_remaining)
        for header, value in zip(ModelScopeHeaders, values, strict=True):
            response.headers[header] = str(value)


class BailianDialect(Dialect):
    provider: Provider = "bailian"

    def __init__(self, config: BailianConfig):
        self.config = config
        self.models = list(config.models)

    def auth_error(self, secret: str | None, account: Account | None) -> web.Response | None:
        if account is None or account.status == "invalid":
            return bailian_error("invalid_api_key")
        if account.status == "arrears":
            return bailian_error("Arrearage")
        return None

    def model_error(self, model: str) -> web.Response | None:
        if model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return bailian_error("model_not_found", message)
        return None

    def bad_request(self, message: str) -> web.Response:
        return bailian_error("invalid_parameter_error", message)

    def not_found(self, message: str) -> web.Response:
        return bailian_error("NotFound", message, 404)

    def thinking_error(self) -> web.Response:
        return bailian_error("invalid_parameter_error", BAILIAN_THINKING)

    def quota_error(self, quota: Quota, model: str) -> web.Response:
        if self.config.free_tier_only:
            return bailian_error("AllocationQuota.FreeTierOnly")
        return bailian_error("Throttling.AllocationQuota")

    def throttle(self, model: str | None) -> web.Response:
        return bailian_error("Throttling.RateQuota")

    def server_error(self, status: int) -> web.Response:
        code = BAILIAN_SERVER_CODES.get(status, "InternalError")
        return bailian_error(code, status=status)
