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

No error carries a stack trace, a secret or an upstream key to the client.
"""

from __future__ import annotations

import math
from typing import ClassVar

import orjson
from aiohttp import web


class RouterError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
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
            return {"type": "error", "error": {"type": self.type, "message": self.message}}
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
    default_code = "invalid_request"


class BodyTooLarge(BadRequest):
    status = 413
    default_code = "request_too_large"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(RouterError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PoolExhausted(RouterError):
    """No route can serve the model now; Retry-After says when one can."""

    status = 429
    type = "rate_limit_error"
    default_code = "pool_exhausted"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(message, code=code, headers={"Retry-After": str(self.retry_after_s)})


class StoreUnavailable(RouterError):
    """The quota store cannot be reached: always with a short Retry-After."""

    status = 503
    type = "service_unavailable"
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
    default_code = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1", "Connection": "close"})


class UpstreamError(RouterError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamUnavailable(RouterError):
    """Every route that could serve is behind an open provider breaker (router.breaker)."""

    status = 503
    type = "service_unavailable"
    default_code = "upstream_unavailable"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(message, headers={"Retry-After": str(self.retry_after_s)})


def sse_error_event(message: str, code: str = "upstream_stream_broken") -> bytes:
    """The last event of a stream that broke after its first byte: never a clean [DONE]."""
    payload = {
        "error": {"message": message, "type": UpstreamError.type, "param": None, "code": code}
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"
