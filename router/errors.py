"""The gateway's errors, each rendered as OpenAI's error shape.

    RouterError                    -> {"error": {"message", "type", "code", "param"}}
    ├── BadRequest        400  invalid_request_error
    │   └── BodyTooLarge  413
    ├── Unauthorized      401  authentication_error
    ├── Forbidden         403  permission_error
    ├── NotFound          404  (route or model: model_not_found)
    ├── MethodNotAllowed  405
    ├── PoolExhausted     429  rate_limit_error / insufficient_quota, with Retry-After
    ├── StoreUnavailable  503  service_unavailable
    ├── UpstreamUnavailable 503  service_unavailable (provider breakers open), with Retry-After
    └── UpstreamError     502  upstream_error (every route failed transiently)
        └── UpstreamTimeout 504

On Anthropic's API (a POST to ``/v1/messages`` or below) the errors leave in Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, with Anthropic's type for the status
(``anthropic_type``: not_found_error, request_too_large, api_error, overloaded_error...).

Retrying: the openai and anthropic SDKs retry a 429 or a 5xx after ``Retry-After``; the openai
SDK sleeps up to two minutes of it, the anthropic SDK all of it (the pool spent: hours). So an
error whose Retry-After is longer than ``SDK_RETRY_MAX_S`` (60 s) also says
``x-should-retry: false``, which both SDKs obey: the pool spent until the reset
(``pool_exhausted``), a client's daily limit or fair share (``client_daily_limit``,
``client_fair_share``: until the reset too), a long cooldown (``rate_limited``), a provider
breaker open for minutes (503). The rule is the wait, not the kind: a short throttling
cooldown, or the same refusals in the last minute before the reset, keep no header and the
SDKs retry them as usual. ``Retry-After`` is always sent.

No error carries a stack trace, a secret or an upstream key to the client.
"""

from __future__ import annotations

import math
from typing import ClassVar

import orjson
from aiohttp import web

#: A Retry-After longer than this also says ``x-should-retry: false`` (see above).
SDK_RETRY_MAX_S = 60


def retry_headers(retry_after_s: int) -> dict[str, str]:
    """``Retry-After``, and ``x-should-retry: false`` when that is too long for a client to
    sleep in a retry loop."""
    if retry_after_s > SDK_RETRY_MAX_S:
        return {"Retry-After": str(retry_after_s), "x-should-retry": "false"}
    return {"Retry-After": str(retry_after_s)}


class RouterError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    anthropic_type: ClassVar[str] = "api_error"  # the type in Anthropic's error shape
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers = headers or {}
        self.anthropic = False  # answer in Anthropic's error shape (for /v1/messages)

    def body(self) -> dict[str, object]:
        if self.anthropic:
            return {
                "type": "error",
                "error": {"type": self.anthropic_type, "message": self.message},
            }
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "invalid_request"


class BodyTooLarge(BadRequest):
    status = 413
    anthropic_type = "request_too_large"
    default_code = "request_too_large"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(RouterError):
    status = 403
    type = "permission_error"
    anthropic_type = "permission_error"
    default_code = "forbidden"


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    anthropic_type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PoolExhausted(RouterError):
    """No route can serve the model now; Retry-After says when one can."""

    status = 429
    type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    default_code = "pool_exhausted"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(message, code=code, headers=retry_headers(self.retry_after_s))


class StoreUnavailable(RouterError):
    """The quota store cannot be reached: always with a short Retry-After."""

    status = 503
    type = "service_unavailable"
    anthropic_type = "overloaded_error"
    default_code = "store_unavailable"
    retry_after_s: ClassVar[int] = 5

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            message, code=code, headers={"Retry-After": str(self.retry_after_s), **(headers or {})}
        )


class ShuttingDown(RouterError):
    status = 503
    type = "service_unavailable"
    anthropic_type = "overloaded_error"
    default_code = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1", "Connection": "close"})


class UpstreamError(RouterError):
    status = 502
    type = "upstream_error"
    anthropic_type = "api_error"
    default_code = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamUnavailable(RouterError):
    """Every route that could serve is behind an open provider breaker (router.breaker)."""

    status = 503
    type = "service_unavailable"
    anthropic_type = "overloaded_error"
    default_code = "upstream_unavailable"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(message, headers=retry_headers(self.retry_after_s))


def sse_error_event(
    message: str, code: str = "upstream_stream_broken", *, anthropic: bool = False
) -> bytes:
    """The last event of a stream that broke after its first byte: never a clean [DONE].

    In the client API's shape: OpenAI's ``data: {"error": …}``, or Anthropic's ``event: error``
    (which the anthropic SDK raises as an APIError; it ignores a bare ``data:`` line there)."""
    if anthropic:
        error = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"
    payload = {
        "error": {"message": message, "type": UpstreamError.type, "param": None, "code": code}
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"
