"""A QuotaStore in one SQLite file: exact across processes that share the file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

from router.quota import logic
from router.quota.store import StoreError
from router.quota.types import (
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_day (
    provider TEXT NOT NULL,
    day TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (provider, day, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_disabled (
    provider TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (provider, key)
) WITHOUT ROWID;
"""

_UPSERT_DAY = (
    "INSERT INTO quota_day (provider, day, field, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (provider, day, field) DO UPDATE SET value = excluded.value"
)
_UPSERT_DISABLED = (
    "INSERT INTO quota_disabled (provider, key, value) VALUES (?, ?, ?) "
    "ON CONFLICT (provider, key) DO UPDATE SET value = excluded.value"
)


def _connect(path: str, busy_timeout_ms: int, retain_days: int) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves. Opened on the worker
    # thread that will use it, so the default same-thread check guards the design.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        # Quota days are local dates in some zone; a 3-day margin in UTC is safe for any.
        cutoff = (datetime.now(UTC) - timedelta(days=retain_days)).strftime("%Y%m%d")
        with _immediate(conn):
            conn.execute("DELETE FROM quota_day WHERE day < ?", (cutoff,))
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the lock up front, so read-decide-write is atomic."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _load(
    conn: sqlite3.Connection, provider: str, day: str
) -> tuple[dict[str, str], dict[str, str]]:
    rows = conn.execute(
        "SELECT field, value FROM quota_day WHERE provider = ? AND day = ?", (provider, day)
    )
    fields = dict(rows.fetchall())
    rows = conn.execute("SELECT key, value FROM quota_disabled WHERE provider = ?", (provider,))
    return fields, dict(rows.fetchall())


def _write(
    conn: sqlite3.Connection,
    provider: str,
    day: str,
    changed: Mapping[str, str],
    changed_disabled: Mapping[str, str],
) -> None:
    conn.executemany(_UPSERT_DAY, [(provider, day, f, v) for f, v in changed.items()])
    conn.executemany(_UPSERT_DISABLED, [(provider, k, v) for k, v in changed_disabled.items()])


def _reserve(conn: sqlite3.Connection, req: ReserveRequest) -> Reservation | NoCapacity:
    with _immediate(conn):
        fields, disabled = _load(conn, req.provider, req.day)
        outcome, changed = logic.reserve_on(fields, disabled, req)
        _write(conn, req.provider, req.day, changed, {})
    return outcome


def _settle(
    conn: sqlite3.Connection, res: Reservation, settlement: Settlement, now_ms: int
) -> SettleResult:
    with _immediate(conn):
        fields, disabled = _load(conn, res.provider, res.day)
        result, changed, changed_disabled = logic.settle_on(
            fields, disabled, res, settlement, now_ms
        )
        _write(conn, res.provider, res.day, changed, changed_disabled)
    return result


def _read(
    conn: sqlite3.Connection, provider: str, day: str
) -> tuple[dict[str, str], dict[str, str]]:
    conn.execute("BEGIN")  # one read snapshot for both tables
    try:
        return _load(conn, provider, day)
    finally:
        conn.execute("COMMIT")


def _enable(conn: sqlite3.Connection, provider: str, key: str) -> None:
    conn.execute("DELETE FROM quota_disabled WHERE provider = ? AND key = ?", (provider, key))


class SqliteStore:
    """Each reserve/settle is one BEGIN IMMEDIATE transaction over the provider's day rows.

    Calls run on one worker thread that owns the connection, never on the event loop: a
    transaction is short, but BEGIN IMMEDIATE may wait up to busy_timeout for another process
    holding the file, and that wait must not stall every other request. One thread also
    serialises this process's transactions without a lock. A cancelled caller does not cancel
    its transaction: the call may still be counted (never the other way round).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 5000,
        retain_days: int = 3,
    ) -> None:
        self._path = os.fspath(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quota-sqlite")
        try:
            self._conn = self._executor.submit(
                _connect, self._path, busy_timeout_ms, retain_days
            ).result()
        except sqlite3.Error as exc:
            self._executor.shutdown(wait=False)
            raise StoreError(f"sqlite {self._path}: {exc}") from exc
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteStore({self._path!r})"

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreError(f"sqlite {self._path}: store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self._path}: {exc}") from exc

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        return await self._run(partial(_reserve, self._conn, req))

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        return await self._run(partial(_settle, self._conn, res, settlement, now_ms))

    async def snapshot(
        self,
        provider: str,
        keys: Sequence[KeySpec],
        day: str,
        now_ms: int,
        model_limits: Mapping[str, int] | None = None,
    ) -> list[KeyUsage]:
        fields, disabled = await self._run(partial(_read, self._conn, provider, day))
        return logic.summarize(provider, fields, disabled, keys, now_ms, model_limits)

    async def enable(self, provider: str, key: str) -> None:
        await self._run(partial(_enable, self._conn, provider, key))

    async def ping(self) -> None:
        await self._run(partial(self._conn.execute, "SELECT 1"))

    async def aclose(self) -> None:
        if self._closed:
            return
        await self._run(self._conn.close)
        self._closed = True
        self._executor.shutdown(wait=False)
