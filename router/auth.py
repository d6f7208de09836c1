"""Who is calling: client keys from ``Authorization: Bearer`` or ``X-Api-Key``."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import TypeVar

from router.config import ClientConfig, secret_digest
from router.errors import Unauthorized

OPEN_CLIENT = "anonymous"
ACCEPTED_MAX = 1024
T = TypeVar("T")


def matches(presented: str, expected: bytes) -> bool:
    """Constant-time: is ``presented`` the key whose digest is ``expected``?"""
    return hmac.compare_digest(secret_digest(presented), expected)


def find_key(presented: str, candidates: Iterable[tuple[bytes, T]]) -> T | None:
    """The value whose key digest matches, comparing against every candidate (constant time)."""
    digest = secret_digest(presented)
    found: T | None = None
    for expected, value in candidates:
        if hmac.compare_digest(digest, expected):
            found = value
    return found


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
        # Keys already accepted, as presented: a dict lookup instead of a digest and a compare
        # per client on every request. Only keys that matched get in (at most a few per
        # client), and str hashing is keyed per process, so a lookup's timing tells a guesser
        # nothing; every other key still goes through the constant-time comparison.
        self._accepted: dict[str, str] = {}

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
        found = self._accepted.get(key)
        if found is not None:
            return found
        found = find_key(key, self._clients)
        if found is None:
            raise Unauthorized("Invalid API key.", code="invalid_api_key")
        if len(self._accepted) < ACCEPTED_MAX:
            self._accepted[key] = found
        return found
