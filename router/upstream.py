"""Talking to upstreams: one aiohttp ClientSession per provider, transport errors named once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from yarl import URL

from router.classify import TransportFailure
from router.config import ProviderConfig

log = logging.getLogger("router.upstream")

ERROR_BODY_LIMIT = 64 * 1024
USER_AGENT = "modelscope-router/0.1"


@dataclass(slots=True)
class UpstreamReply:
    """An upstream answer whose status and headers have arrived; the body may still be flowing."""

    response: aiohttp.ClientResponse
    body: bytes | None = None  # read for errors and non-stream answers
    first_chunk: bytes | None = None  # read for streams, before the client sees anything

    @property
    def status(self) -> int:
        return self.response.status

    def close(self) -> None:
        self.response.close()


class UpstreamBodyTooLarge(Exception):
    """A non-stream answer larger than the bound: dropped unread, its connection closed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upstream answer is larger than {limit} bytes")
        self.limit = limit


class TransportError(Exception):
    """The exchange failed below HTTP; ``failure`` says whether the request went out."""

    def __init__(self, failure: TransportFailure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


def transport_failure(exc: BaseException) -> TransportFailure:
    """Name an aiohttp/asyncio failure once, most specific first."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransportFailure.CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransportFailure.CONNECT
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return TransportFailure.READ_TIMEOUT
    return TransportFailure.DISCONNECTED


class Upstreams:
    """The HTTP clients of every provider, opened and closed together."""

    def __init__(self, providers: list[ProviderConfig]) -> None:
        self._providers = {p.name: p for p in providers}
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def open(self) -> None:
        for provider in self._providers.values():
            # ssl=True: certificates and host names are verified against the system CAs
            # (aiohttp's default, spelled out; tests/test_canary.py checks a self-signed
            # upstream is refused). Never pass ssl=False here.
            connector = aiohttp.TCPConnector(
                limit=0, ttl_dns_cache=300, enable_cleanup_closed=True, ssl=True
            )
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=provider.connect_timeout_seconds,
                sock_read=provider.timeout_seconds,
            )
            self._sessions[provider.name] = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                headers={"User-Agent": USER_AGENT},
                auto_decompress=True,
            )

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(s.close() for s in sessions.values()), return_exceptions=True)

    def _url(self, provider: ProviderConfig, path: str) -> str:
        return provider.base_url.rstrip("/") + "/" + path.lstrip("/")

    async def send(
        self,
        provider: ProviderConfig,
        url: str | URL,
        secret: str,
        body: bytes,
        *,
        stream: bool,
        extra_headers: Mapping[str, str] | None = None,
        max_body: int | None = None,
    ) -> UpstreamReply:
        """POST ``body`` and wait for the answer's head; read what classification needs.

        A 200 stream has its first chunk read here, so failover stays possible until then.
        A 200 non-stream answer is read whole, but never more than ``max_body`` bytes (after
        decompression): past that it raises UpstreamBodyTooLarge. Raises TransportError.
        """
        headers = {
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            **(extra_headers or {}),
        }
        session = self._sessions[provider.name]
        response: aiohttp.ClientResponse | None = None
        try:
            response = await session.post(url, data=body, headers=headers)
            reply = UpstreamReply(response)
            if response.status != 200:
                reply.body = await response.content.read(ERROR_BODY_LIMIT)
            elif stream:
                reply.first_chunk = await _first_chunk(response)
            else:
                reply.body = await _read_bounded(response, max_body)
            return reply
        except UpstreamBodyTooLarge:
            if response is not None:
                response.close()  # the rest is never read: the connection is not reused
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if response is not None:
                response.close()
            raise TransportError(transport_failure(exc), _describe(exc)) from exc

    async def get_json(self, provider: ProviderConfig, path: str, secret: str | None) -> object:
        """GET a small JSON document (``/models``); raises on any failure."""
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        session = self._sessions[provider.name]
        async with session.get(self._url(provider, path), headers=headers) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def get(
        self, provider: ProviderConfig, path: str, secret: str, headers: Mapping[str, str]
    ) -> tuple[int, str, bytes]:
        """GET ``path`` with a key: (status, content type, body). Raises TransportError."""
        session = self._sessions[provider.name]
        try:
            async with session.get(
                self._url(provider, path),
                headers={"Authorization": f"Bearer {secret}", **headers},
            ) as response:
                body = await response.content.read(ERROR_BODY_LIMIT * 16)
                return response.status, response.headers.get("Content-Type", ""), body
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(transport_failure(exc), _describe(exc)) from exc


async def _read_bounded(response: aiohttp.ClientResponse, limit: int | None) -> bytes:
    """The whole body, or UpstreamBodyTooLarge as soon as it is known to exceed ``limit``.

    A declared Content-Length over the limit is refused before any byte is read (unless the
    body is compressed: the limit counts decompressed bytes); otherwise the chunks are summed
    as they arrive, so at most ``limit`` bytes plus one chunk are ever held.
    """
    if limit is None:
        return await response.read()
    declared = response.content_length
    if declared is not None and declared > limit and "Content-Encoding" not in response.headers:
        raise UpstreamBodyTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > limit:
            raise UpstreamBodyTooLarge(limit)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _first_chunk(response: aiohttp.ClientResponse) -> bytes:
    chunk = await response.content.readany()
    if not chunk:
        raise aiohttp.ServerDisconnectedError("stream ended before its first byte")
    return chunk


def _describe(exc: BaseException) -> str:
    # The exception text of aiohttp names host and port, never headers: safe to log.
    return f"{type(exc).__name__}: {exc}"[:300]
