"""The floor: a bare aiohttp pass-through proxy (no auth, no quota, no failover, no logging).

``python -m bench.passthrough --upstream http://127.0.0.1:9001 --port 8090`` forwards every
POST under /v1/ to the upstream with the client's body and Authorization. JSON answers are read
whole and returned with a Content-Length (as the gateway does); SSE answers are relayed chunk by
chunk as they arrive.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str) -> web.Application:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        body = await request.read()
        async with request.app[SESSION].post(
            upstream + request.path, data=body, headers=headers
        ) as up:
            content_type = up.headers.get("Content-Type", "application/json")
            if not content_type.startswith("text/event-stream"):
                data = await up.read()
                return web.Response(status=up.status, body=data, content_type=content_type)
            response = web.StreamResponse(status=up.status)
            response.content_type = "text/event-stream"
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/{tail:.*}", forward)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="bare aiohttp pass-through proxy (bench floor)")
    parser.add_argument("--upstream", required=True, help="upstream root: http://127.0.0.1:9001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    loop = None
    try:  # the gateway runs on uvloop: the floor gets the same event loop
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        pass
    app = create_app(args.upstream.rstrip("/"))
    # the gateway listens with a backlog of 1024 (router/serve.py): the floor too, so a burst of
    # new connections (--slow-streams) meets the same accept queue on both
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
        backlog=1024,
    )


if __name__ == "__main__":
    main()
