"""Who is calling: client keys from ``Authorization: Bearer`` or ``X-Api-Key``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from router.config import ClientConfig
from router.errors import Unauthorized

OPEN_CLIENT = "anonymous"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent; Cherry Studio sends the same one in both headers."""
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = headers.get("X-Api-Key", "").strip()
    return api_key or None


class ClientAuth:
    """Maps a presented key to a client name.

    Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every
    configured client, so timing says nothing about how close a guess was.
    """

    def __init__(self, clients: list[ClientConfig]) -> None:
        self._clients = [(c.key_digest(), c.name) for c in clients]

    @property
    def open(self) -> bool:
        return not self._clients

    def authenticate(self, headers: Mapping[str, str]) -> str:
        if not self._clients:
            return OPEN_CLIENT
        key = presented_key(headers)
        if key is None:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.",
                code="missing_api_key",
            )
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for expected, name in self._clients:
            if hmac.compare_digest(digest, expected):
                found = name
        if found is None:
            raise Unauthorized("Invalid API key.", code="invalid_api_key")
        return found
