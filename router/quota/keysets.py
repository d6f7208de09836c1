"""A key set's identity: which keys, limits and strategy an index of available keys is for.

The Redis and SQLite stores keep, per day and model, an index of the keys that may serve
(reserve.lua, sqlite_reserve.py). The index is named by a digest of the key set and the
strategy, so a reload that changes a key, a limit or the strategy starts a new one; the pool
totals of the fair share depend only on the names, fingerprints and daily limits (the stamp).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from router.quota import keys as k
from router.quota.types import KeySpec, Strategy


class KeySet(NamedTuple):
    keys: tuple[KeySpec, ...]  # the tuple it was made from (held, so its id stays its own)
    strategy: Strategy
    digest: str  # names the key set and its indexes: the entries and the strategy
    pool_stamp: str  # the names, fingerprints and daily limits: what the pool totals depend on
    entries: dict[Any, str]  # position -> "name|fingerprint|daily_limit|model_limit|rpm", "n"


def _cap(limit: int | None) -> int:
    return -1 if limit is None else limit


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def keyset(keys: tuple[KeySpec, ...], strategy: Strategy) -> KeySet:
    entries: dict[Any, str] = {"n": str(len(keys))}
    for i, spec in enumerate(keys):
        limits = k.SEP.join(str(_cap(x)) for x in (spec.daily_limit, spec.model_limit, spec.rpm))
        entries[str(i)] = f"{spec.name}{k.SEP}{spec.fingerprint}{k.SEP}{limits}"
    digest = _digest("\n".join([strategy.value, *(entries[str(i)] for i in range(len(keys)))]))
    pool = "\n".join(f"{s.name}{k.SEP}{s.fingerprint}{k.SEP}{_cap(s.daily_limit)}" for s in keys)
    return KeySet(keys, strategy, digest, _digest(pool), entries)


class KeySets:
    """Each tuple's key set, made once: the request path reuses its tuples (router/pool.py),
    so a reserve does no work per key to name its index."""

    def __init__(self) -> None:
        self._known: dict[int, KeySet] = {}

    def of(self, keys: tuple[KeySpec, ...], strategy: Strategy) -> KeySet:
        known = self._known.get(id(keys))
        if known is None or known.keys is not keys or known.strategy is not strategy:
            if len(self._known) >= 10_000:  # bounded: a reload makes new tuples
                self._known.clear()
            known = self._known[id(keys)] = keyset(keys, strategy)
        return known
