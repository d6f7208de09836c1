"""The team's web page: ``/ui/`` serves three static files (router/static: index.html, app.js,
app.css; plain JavaScript, no build step, nothing from a CDN) and ``GET /ui/api/me``, the summary
the page reads for the key it was given.

``/ui/api/me`` takes a client key (or the admin key) in ``Authorization: Bearer`` or
``X-Api-Key``, as ``/v1`` does, and answers: the pool left today per provider and per model,
the quota day and the time to its reset, the client's own calls today and yesterday with its
limits and fair share (the numbers ``/admin/quota`` and ``/admin/clients`` answer: the same
builders, router.status), the base path to paste into a client and the models the client may
call. A missing or unknown key is a 401 in OpenAI's shape. It never holds a secret, nor a key's
name: a member sees the pool, not its keys. The admin's view of the page reads the admin API
with the admin key.

Every answer under ``/ui`` carries the headers in ``SECURITY_HEADERS``: a Content-Security-Policy
that allows only the page's own files (no inline script or style), no framing, no referrer.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from router.auth import find_key, presented_key
from router.config import ProviderConfig, Settings
from router.errors import StoreUnavailable
from router.quota.store import StoreError
from router.quota.types import KeyState
from router.runtime import Runtime
from router.state import LIVE, SETTINGS
from router.status import Document, clients_document, quota_document

PAGE = "/ui/"
ME = "/ui/api/me"
STATIC_PACKAGE = "static"
#: file name -> Content-Type of the page's files (everything router/static holds).
ASSETS: Mapping[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
USABLE = (KeyState.AVAILABLE.value, KeyState.COOLING.value)


def is_ui_path(path: str) -> bool:
    return path == PAGE.rstrip("/") or path.startswith(PAGE)


def add_ui_routes(app: web.Application) -> None:
    """The page, its files, its summary endpoint; the security headers on all of them."""
    files = resources.files("router").joinpath(STATIC_PACKAGE)
    for name, content_type in ASSETS.items():
        body = files.joinpath(name).read_bytes()
        path = PAGE if name == "index.html" else PAGE + name
        app.router.add_get(path, partial(_asset, body=body, content_type=content_type))
    app.router.add_get(PAGE.rstrip("/"), _to_page)
    app.router.add_get(ME, me)
    app.on_response_prepare.append(_secure_headers)


async def _asset(request: web.Request, *, body: bytes, content_type: str) -> web.Response:
    response = web.Response(body=body, headers={"Cache-Control": "no-cache"})
    response.headers["Content-Type"] = content_type
    return response


async def _to_page(request: web.Request) -> web.Response:
    """``/ui`` -> ``ui/``: relative, so it lands right behind a proxy's path prefix too (the
    page's own links are relative to its trailing slash)."""
    raise web.HTTPPermanentRedirect("ui/")


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    if is_ui_path(request.path):
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith(PAGE + "api/"):
            response.headers["Cache-Control"] = "no-store"


# -- GET /ui/api/me ----------------------------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    runtime = request.app[LIVE].runtime
    role, client = _who(request.headers, runtime)
    root_path = request.app[SETTINGS].server.root_path  # server: as started, like the listener
    try:
        document = await me_document(runtime, role, client, root_path)
    except StoreError:
        raise StoreUnavailable("The quota store is unreachable.") from None
    return web.Response(
        body=orjson.dumps(document),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _who(headers: Mapping[str, str], runtime: Runtime) -> tuple[str, str | None]:
    """("admin", None) for the admin key; else ("client", name), or the 401 of ``/v1``."""
    admin = runtime.settings.admin.key_digest()
    key = presented_key(headers)
    if admin is not None and key is not None and find_key(key, [(admin, True)]):
        return "admin", None
    return "client", runtime.auth.authenticate(headers)


async def me_document(runtime: Runtime, role: str, client: str | None, root_path: str) -> Document:
    settings = runtime.settings
    now = runtime.clock()
    quota = await quota_document(settings, runtime.store, runtime.pool, now)
    configured = client is not None and runtime.failover.policy.client(client) is not None
    usage: Document | None = None
    yesterday: str | None = None
    if configured:
        clients = await clients_document(settings, runtime.store, now)
        usage = next(c for c in clients["clients"] if c["name"] == client)
        yesterday = clients["yesterday"]
    models = runtime.model_ids(client)
    return {
        "role": role,
        "client": usage,  # this client's entry of /admin/clients; None for the admin
        "name": client,
        "day": quota["day"],
        "yesterday": yesterday,
        "timezone": quota["timezone"],
        "now": quota["now"],
        "next_reset": quota["next_reset"],
        "fair_share": {
            "below": settings.fair_share.below,
            "count": settings.fair_share.count,
        },
        "pool": [
            _pool_view(provider, document, settings)
            for provider, document in zip(settings.providers, quota["providers"], strict=True)
        ],
        "root_path": root_path,
        "base_path": f"{root_path}/v1",
        "models": models,
    }


def _pool_view(provider: ProviderConfig, document: Document, settings: Settings) -> Document:
    """A provider's pool left today (the figures of /admin/quota), and per model."""
    return {
        "provider": provider.name,
        "paid": provider.is_paid,
        "used": document["used"],
        "limit": document["limit"],
        "remaining": document["remaining"],
        "keys": len(document["keys"]),
        "usable_keys": sum(1 for k in document["keys"] if k["state"] in USABLE),
        "models": [
            {"model": model, "remaining": model_left(provider, document, model)}
            for model in _pool_models(provider, document, settings)
        ],
    }


def _pool_models(provider: ProviderConfig, document: Document, settings: Settings) -> list[str]:
    """The models worth a line: those its aliases route to this provider, those with a limit of
    their own, and those any key has served today."""
    aliased = [r.model for a in settings.models for r in a.routes if r.provider == provider.name]
    served = sorted({m["model"] for key in document["keys"] for m in key["models"]})
    return list(dict.fromkeys([*aliased, *provider.model_limits, *served]))


def model_left(provider: ProviderConfig, document: Document, model: str) -> int | None:
    """Calls of ``model`` the provider's keys can still serve today (None: no cap).

    A key counts if it is available or cooling (as a provider's ``remaining`` does), with the
    smaller of what the key has left and what it has left for the model; a key whose model is
    spent counts for nothing. ``document`` is the provider's entry of /admin/quota.
    """
    configs = {k.name: k for k in provider.keys}
    total = 0
    for key in document["keys"]:
        if key["state"] not in USABLE:
            continue
        entry: dict[str, Any] | None = next((m for m in key["models"] if m["model"] == model), None)
        if entry is None:
            model_remaining = provider.key_model_limit(configs[key["name"]], model)
        elif entry["state"] in USABLE:
            model_remaining = entry["remaining"]
        else:
            continue
        caps = [c for c in (key["remaining"], model_remaining) if c is not None]
        if not caps:
            return None
        total += min(caps)
    return total
