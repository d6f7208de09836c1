"""The app's one middleware: every error leaves in its API's shape (OpenAI's, or Anthropic's on
/v1/messages) and never as a stack trace; every answer carries ``x-request-id``; each handler is
tracked for the shutdown (router.state.InFlight); a path mangled by a client's base URL is served
as the path it meant (``mended_path``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

from router.calls import request_id
from router.errors import BadRequest, BodyTooLarge, MethodNotAllowed, NotFound, RouterError
from router.state import SETTINGS, InFlight

log = logging.getLogger("router.middleware")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_middleware(inflight: InFlight) -> Middleware:
    """Errors in the API's shape, ``x-request-id`` on every answer, handlers tracked in
    ``inflight``, mangled paths mended (see the module's docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()  # the handler's (request.task is the connection's)
        assert task is not None  # aiohttp runs every handler in a task
        inflight.enter(task)
        try:
            return await _answer(request, handler)
        finally:
            inflight.leave(task)

    return middleware


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer, or its failure as a RouterError in the API's shape (aiohttp's own
    HTTP exceptions other than 404, 405 and 413 pass through)."""
    error: RouterError
    try:
        if _maybe_mangled(request.rel_url.raw_path):
            request, handler = await _mended(request, handler)
        response = await handler(request)
        if "x-request-id" not in response.headers and not response.prepared:
            response.headers["x-request-id"] = request_id(request.headers)
        return response
    except RouterError as exc:
        error = exc
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].server.max_body_bytes
        error = BodyTooLarge(f"The request body is larger than {limit} bytes.")
    except web.HTTPNotFound:
        error = NotFound(f"No route for {request.method} {request.path}.")
    except web.HTTPMethodNotAllowed:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}.")
    except web.HTTPException as exc:
        if "x-request-id" not in exc.headers:
            exc.headers["x-request-id"] = request_id(request.headers)
        raise
    except ConnectionResetError:  # the client left mid-body (an admin POST): not our fault
        error = BadRequest(
            "The connection closed before the whole request body arrived.",
            code="incomplete_body",
        )
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        error = RouterError("Internal error in the gateway.")
    # on the mended request, when there is one: its path says which API's shape
    return _error_response(request, error)


def _error_response(request: web.Request, error: RouterError) -> web.Response:
    """``error`` in its API's shape, with the request's id (the gateway's, when it named one)."""
    if _is_anthropic(request.path):  # every answer on Anthropic's paths, a 405 included
        error.anthropic = True
    if "x-request-id" in error.headers:
        return error.to_response()
    return error.to_response({"x-request-id": request_id(request.headers)})


def _is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# -- paths as clients mangle them ----------------------------------------------------------------
# A base URL with /v1 where the client appends /v1 itself (the anthropic SDK: /v1/v1/messages),
# doubled slashes (a base URL ending in one: //v1//chat/completions), a trailing slash
# (/v1/models/): each is served as the path it meant. Not a redirect: a client sends a POST
# body again only on a 307/308, and many follow no redirect at all. The path is rewritten
# before routing and never decoded: a dot segment or any percent-escape (an encoded slash or
# dot) leaves the path as it came, refused as before (404, or the passthrough's own check in
# router.gateway).


def _maybe_mangled(raw_path: str) -> bool:
    """Whether ``mended_path`` could change this path (most paths need no second look). The web
    page's paths are served as they come: the page's relative links need its trailing slash."""
    if raw_path.startswith("/ui/"):
        return False
    return "//" in raw_path or raw_path.startswith("/v1/v1") or raw_path[-1:] == "/"


def mended_path(raw_path: str) -> str | None:
    """The path a mangled raw path meant; None when there is nothing (safe) to mend."""
    if not raw_path.startswith("/"):
        return None
    segments = [segment for segment in raw_path.split("/") if segment]
    if any(segment in (".", "..") or "%" in segment or "\\" in segment for segment in segments):
        return None
    while segments[:2] == ["v1", "v1"]:
        del segments[0]
    mended = "/" + "/".join(segments)
    return None if mended == raw_path else mended


async def _mended(request: web.Request, handler: Handler) -> tuple[web.Request, Handler]:
    """The request on its mended path, routed again, and that route's handler (the same
    request and handler when there is nothing to mend). The body is not read yet: it goes on
    with the new request."""
    url = request.rel_url
    path = mended_path(url.raw_path)
    if path is None:
        return request, handler
    mended = request.clone(
        rel_url=URL.build(
            path=path, query_string=url.raw_query_string, fragment=url.raw_fragment, encoded=True
        )
    )
    match_info = await request.app.router.resolve(mended)
    match_info.add_app(request.app)
    match_info.freeze()
    mended._match_info = match_info
    # The route's own handler: this is the app's only middleware, so nothing is skipped.
    return mended, match_info.handler
