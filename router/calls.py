"""One client request as the gateway sees it: its id, its trace, and its body parsed only as deep
as routing needs (``parse_call``). Pure: the HTTP layer (router.gateway) builds a ``Call`` from a
request and the failover engine (router.failover) routes it; neither owns this shape.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from router.endpoints import Endpoint
from router.errors import BadRequest
from router.quota.types import Reservation
from router.routing import Route
from router.usage import Usage

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-Id`` when it is a safe token, else a new one (32 hex digits)."""
    given = headers.get("X-Request-Id")
    return given if given is not None and _REQUEST_ID.match(given) else uuid.uuid4().hex


@dataclass(slots=True)
class Trace:
    """What one request did and where its time went: for the access log and the metrics."""

    request_id: str
    started: float
    client: str = "unknown"
    model: str = "none"  # a bounded label: alias, listed model, or "other"
    provider: str = "none"
    key: str = "none"
    status: int = 500
    attempts: int = 0
    upstream_s: float = 0.0  # waiting on upstreams
    client_s: float = 0.0  # waiting on the client to take a stream
    # The tokens the answer reported (router.usage), None when it reported none: counted in
    # the metrics and, with its cost, in the store (router.ledger) on the reservation's day.
    usage: Usage | None = None
    reservation: Reservation | None = None  # the one that served


@dataclass(slots=True)
class Call:
    """One client request, parsed only as deep as routing needs."""

    endpoint: Endpoint
    model: str  # "" for a passthrough body without one
    stream: bool
    payload: dict[str, Any]
    raw: bytes
    trace: Trace
    headers: Mapping[str, str]  # the client's, read only for an endpoint's forward_headers
    # The gateway asks the upstream for the stream's usage the client did not ask for (and
    # the relay takes that chunk out of the client's stream).
    adds_usage: bool = False

    @property
    def request_id(self) -> str:
        return self.trace.request_id

    def body_for(self, route: Route) -> bytes:
        """The client's body, unchanged but for ``model`` and, when the gateway asks for the
        stream's usage, ``stream_options.include_usage``."""
        renamed = route.model != self.model and bool(self.model)
        if self.adds_usage:
            options = self.payload.get("stream_options")
            if not renamed and "stream_options" not in self.payload:
                # The common case: the body's bytes with one member spliced in after its "{".
                at = self.raw.index(b"{") + 1
                return self.raw[:at] + _INCLUDE_USAGE + self.raw[at:]
            changed = {**self.payload, "stream_options": {**(options or {}), "include_usage": True}}
            if renamed:
                changed["model"] = route.model
            return orjson.dumps(changed)
        if not renamed:
            return self.raw
        return orjson.dumps({**self.payload, "model": route.model})


def parse_call(
    raw: bytes,
    endpoint: Endpoint,
    trace: Trace,
    headers: Mapping[str, str] | None = None,
    reads_usage: bool = True,
) -> Call:
    """The call in ``raw``; BadRequest when the body cannot be routed as it is. ``reads_usage``
    False (usage.record off): a stream's body goes upstream as it is, never asking for usage."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    if _model_given_twice(raw):
        raise BadRequest(
            "The request body gives 'model' more than once; send it once.",
            code="duplicate_model",
            param="model",
        )
    model = payload.get("model", "" if not endpoint.needs_model else None)
    if (
        not isinstance(model, str)
        or len(model) > 256
        or (endpoint.needs_model and not model.strip())
    ):
        raise BadRequest("'model' is required: a model id or alias.", param="model")
    endpoint.check(payload)
    stream = payload.get("stream", False)
    if not endpoint.streams:
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    adds_usage = reads_usage and stream and endpoint.asks_stream_usage and _usage_not_asked(payload)
    return Call(endpoint, model, stream, payload, raw, trace, headers or {}, adds_usage)


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def _usage_not_asked(payload: dict[str, Any]) -> bool:
    """Whether a stream's body does not ask for its usage, so the gateway may: no
    ``stream_options``, or one without ``include_usage: true`` (one that is not an object is
    left for the upstream to judge)."""
    options = payload.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is not True


# The bytes of the key "model" (a second one is looked for), and a JSON escape of one of its
# letters (m o d e l: U+006D 006F 0064 0065 006C), the other way to spell the key.
_MODEL_KEY = b'"model"'
_ESCAPED_MODEL_LETTER = re.compile(rb"\\u006[45cdfCDF]")


def _model_given_twice(raw: bytes) -> bool:
    """Whether the body's top level has the key ``model`` more than once (BadRequest when
    the body cannot be checked).

    orjson keeps the last silently, an upstream's parser may keep the first: the allow-list
    and the counters would judge one model and the upstream serve another. The body is parsed
    a second time (by the standard library, keeping every key of the top level) only when its
    bytes hold ``"model"`` twice or an escaped letter of it.
    """
    if raw.count(_MODEL_KEY) < 2 and _ESCAPED_MODEL_LETTER.search(raw) is None:
        return False
    try:
        # The hook keeps an object's pairs as a list: the top level's is the result.
        pairs = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    except (ValueError, RecursionError):  # orjson took it, the standard library did not
        raise BadRequest(
            "The request body could not be checked for a repeated 'model'.", code="invalid_json"
        ) from None
    return sum(1 for name, _ in pairs if name == "model") > 1
