"""A QuotaStore in one SQLite file: exact across processes that share the file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import TypeVar

from router.quota import keys as k
from router.quota import logic, rates, spending, sqlite_reserve
from router.quota.days import wall_clock_ms
from router.quota.keysets import KeySet, KeySets
from router.quota.store import StoreError
from router.quota.types import (
    ClientUsage,
    FairShare,
    KeySpec,
    KeyUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
    UsageRecord,
    UsageRow,
)

T = TypeVar("T")
USAGE_BATCH_TTL_MS = 3_600_000  # a usage batch is retried within seconds, never an hour later

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
CREATE TABLE IF NOT EXISTS quota_client (
    day TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (day, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_task (
    task_id TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quota_task_expiry ON quota_task (expires_ms);
CREATE TABLE IF NOT EXISTS quota_usage (      -- router/quota/spending.py
    day TEXT NOT NULL,
    field TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (day, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_usage_batch (  -- usage batches already added
    token TEXT NOT NULL PRIMARY KEY,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quota_usage_batch_expiry ON quota_usage_batch (expires_ms);
"""

_UPSERT_DAY = (
    "INSERT INTO quota_day (provider, day, field, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (provider, day, field) DO UPDATE SET value = excluded.value"
)
_UPSERT_DISABLED = (
    "INSERT INTO quota_disabled (provider, key, value) VALUES (?, ?, ?) "
    "ON CONFLICT (provider, key) DO UPDATE SET value = excluded.value"
)
_UPSERT_CLIENT = (
    "INSERT INTO quota_client (day, field, value) VALUES (?, ?, ?) "
    "ON CONFLICT (day, field) DO UPDATE SET value = excluded.value"
)
_UPSERT_RATE = (
    "INSERT INTO quota_rate (field, value) VALUES (?, ?) "
    "ON CONFLICT (field) DO UPDATE SET value = excluded.value"
)
_ADD_USAGE = (
    "INSERT INTO quota_usage (day, field, value) VALUES (?, ?, ?) "
    "ON CONFLICT (day, field) DO UPDATE SET value = value + excluded.value"
)
_UPSERT_TASK = (
    "INSERT INTO quota_task (task_id, value, expires_ms) VALUES (?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET value = excluded.value, expires_ms = excluded.expires_ms"
)


def _connect(path: str, busy_timeout_ms: int, retain_days: int, now_ms: int) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves. Opened on the worker
    # thread that will use it, so the default same-thread check guards the design.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA + sqlite_reserve.SCHEMA)
        with _immediate(conn):
            # Old days go by the newest day on record, not by a clock: the quota day comes from
            # the gateway's clock, which need not be this process's (a test's injected clock).
            (newest,) = conn.execute(
                "SELECT max(day) FROM (SELECT day FROM quota_day UNION ALL "
                "SELECT day FROM quota_client)"
            ).fetchone()
            if newest is not None:
                newest_day = datetime.strptime(newest, "%Y%m%d")
                cutoff = (newest_day - timedelta(days=retain_days)).strftime("%Y%m%d")
                tables = ("quota_day", "quota_client", "quota_usage", *sqlite_reserve.DAY_TABLES)
                for table in tables:
                    # The table names are this module's constants.
                    conn.execute(f"DELETE FROM {table} WHERE day < ?", (cutoff,))  # noqa: S608
            conn.execute("DELETE FROM quota_task WHERE expires_ms <= ?", (now_ms,))
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


def _load_clients(conn: sqlite3.Connection, day: str) -> dict[str, str]:
    rows = conn.execute("SELECT field, value FROM quota_client WHERE day = ?", (day,))
    return dict(rows.fetchall())


def _write(
    conn: sqlite3.Connection,
    provider: str,
    day: str,
    changed: Mapping[str, str],
    changed_disabled: Mapping[str, str],
    changed_clients: Mapping[str, str],
) -> None:
    conn.executemany(_UPSERT_DAY, [(provider, day, f, v) for f, v in changed.items()])
    conn.executemany(_UPSERT_DISABLED, [(provider, k, v) for k, v in changed_disabled.items()])
    conn.executemany(_UPSERT_CLIENT, [(day, f, v) for f, v in changed_clients.items()])


def _reserve(conn: sqlite3.Connection, req: ReserveRequest, ks: KeySet) -> Reservation | NoCapacity:
    with _immediate(conn):
        outcome, changed, changed_clients, changed_rates = sqlite_reserve.reserve(
            conn, req, ks, partial(_load, conn, req.provider, req.day)
        )
        _write(conn, req.provider, req.day, changed, {}, changed_clients)
        conn.executemany(_UPSERT_RATE, list(changed_rates.items()))
    return outcome


def _record_usage(
    conn: sqlite3.Connection, token: str, records: Sequence[UsageRecord], ttl_ms: int
) -> None:
    changes = spending.changes_of(records)
    now_ms = max(r.at_ms for r in records)
    with _immediate(conn):
        row = conn.execute("SELECT 1 FROM quota_usage_batch WHERE token = ?", (token,)).fetchone()
        if row is not None:
            return
        # Expired by the records' own clock (the gateway's), never this machine's.
        conn.execute("DELETE FROM quota_usage_batch WHERE expires_ms <= ?", (now_ms,))
        conn.execute("INSERT INTO quota_usage_batch VALUES (?, ?)", (token, now_ms + ttl_ms))
        for day, c in changes.days.items():
            conn.executemany(_ADD_USAGE, [(day, f, n) for f, n in c.usage.items()])
            clients = _load_clients(conn, day)
            _write(conn, "", day, {}, {}, spending.add_to(clients, c.clients))
            for provider, cost in c.providers.items():
                (value,) = conn.execute(
                    "SELECT coalesce(max(value), '0') FROM quota_day "
                    "WHERE provider = ? AND day = ? AND field = ?",
                    (provider, day, k.COST_FIELD),
                ).fetchone()
                conn.execute(_UPSERT_DAY, (provider, day, k.COST_FIELD, str(int(value) + cost)))
        for client, added in changes.tpm.items():
            field = k.client_tpm_field(client)
            for at_ms, tokens in added:
                raw = conn.execute(
                    "SELECT value FROM quota_rate WHERE field = ?", (field,)
                ).fetchone()
                kept, _ = rates.window(None if raw is None else raw[0], at_ms)
                conn.execute(_UPSERT_RATE, (field, rates.add(kept, at_ms, tokens)))


def _read_usage(conn: sqlite3.Connection, day: str) -> list[UsageRow]:
    rows = conn.execute("SELECT field, value FROM quota_usage WHERE day = ?", (day,))
    return spending.rows_of({field: str(value) for field, value in rows.fetchall()})


def _settle(
    conn: sqlite3.Connection, res: Reservation, settlement: Settlement, now_ms: int
) -> SettleResult:
    with _immediate(conn):
        fields, disabled = _load(conn, res.provider, res.day)
        clients = {} if res.client is None else _load_clients(conn, res.day)
        result, changed, changed_disabled, changed_clients = logic.settle_on(
            fields, disabled, clients, res, settlement, now_ms
        )
        _write(conn, res.provider, res.day, changed, changed_disabled, changed_clients)
        if logic.may_free_a_key(fields, changed, settlement):
            sqlite_reserve.bump_epoch(conn, res.provider)
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
    with _immediate(conn):
        conn.execute("DELETE FROM quota_disabled WHERE provider = ? AND key = ?", (provider, key))
        sqlite_reserve.bump_epoch(conn, provider)


def _disable(conn: sqlite3.Connection, provider: str, key: str, fp: str, reason: str) -> bool:
    with _immediate(conn):
        row = conn.execute(
            "SELECT value FROM quota_disabled WHERE provider = ? AND key = ?", (provider, key)
        ).fetchone()
        newly, record = logic.disable_on({} if row is None else {key: row[0]}, key, fp, reason)
        conn.execute(_UPSERT_DISABLED, (provider, key, record))
        sqlite_reserve.bump_epoch(conn, provider)
    return newly


def _reset_key(conn: sqlite3.Connection, provider: str, key: str, day: str) -> None:
    with _immediate(conn):
        rows = conn.execute(
            "SELECT field FROM quota_day WHERE provider = ? AND day = ?", (provider, day)
        )
        fields = logic.key_fields((field for (field,) in rows.fetchall()), key)
        conn.executemany(
            "DELETE FROM quota_day WHERE provider = ? AND day = ? AND field = ?",
            [(provider, day, field) for field in fields],
        )
        sqlite_reserve.bump_epoch(conn, provider)


def _read_clients(
    conn: sqlite3.Connection, day: str, providers: Sequence[str]
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The clients day map and the fair-share fields (fs, fu|) of each provider's day map."""
    conn.execute("BEGIN")  # one read snapshot
    try:
        shares = {}
        for provider in providers:
            rows = conn.execute(
                "SELECT field, value FROM quota_day WHERE provider = ? AND day = ? "
                "AND (field = ? OR substr(field, 1, ?) = ?)",
                (provider, day, k.SHARE_OUT_FIELD, len(k.FAIR_USED) + 1, k.FAIR_USED + k.SEP),
            )
            shares[provider] = dict(rows.fetchall())
        return _load_clients(conn, day), shares
    finally:
        conn.execute("COMMIT")


def _remember(conn: sqlite3.Connection, task_id: str, value: str, now_ms: int, ttl_ms: int) -> None:
    with _immediate(conn):
        conn.execute("DELETE FROM quota_task WHERE expires_ms <= ?", (now_ms,))
        conn.execute(_UPSERT_TASK, (task_id, value, now_ms + ttl_ms))


def _recall(conn: sqlite3.Connection, task_id: str, now_ms: int) -> str | None:
    row = conn.execute(
        "SELECT value FROM quota_task WHERE task_id = ? AND expires_ms > ?", (task_id, now_ms)
    ).fetchone()
    return None if row is None else str(row[0])


class SqliteStore:
    """Each reserve/settle is one BEGIN IMMEDIATE transaction over the provider's day rows.

    Calls run on one worker thread that owns the connection, never on the event loop: a
    transaction is short, but BEGIN IMMEDIATE may wait up to busy_timeout for another process
    holding the file, and that wait must not stall every other request. One thread also
    serialises this process's transactions without a lock. A cancelled caller does not cancel
    its transaction: the call may still be counted (never the other way round).

    ``clock`` (Unix ms) decides when a remembered task expires and is the default ``now``
    of client_usage.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 5000,
        retain_days: int = 3,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._path = os.fspath(path)
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quota-sqlite")
        try:
            self._conn = self._executor.submit(
                _connect, self._path, busy_timeout_ms, retain_days, clock()
            ).result()
        except sqlite3.Error as exc:
            self._executor.shutdown(wait=False)
            raise StoreError(f"sqlite {self._path}: {exc}") from exc
        self._closed = False
        self._keysets = KeySets()

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
        ks = self._keysets.of(req.keys, req.strategy)
        return await self._run(partial(_reserve, self._conn, req, ks))

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        return await self._run(partial(_settle, self._conn, res, settlement, now_ms))

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        if records:
            ttl = USAGE_BATCH_TTL_MS
            await self._run(partial(_record_usage, self._conn, token, list(records), ttl))

    async def usage(self, day: str) -> list[UsageRow]:
        return await self._run(partial(_read_usage, self._conn, day))

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

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        return await self._run(partial(_disable, self._conn, provider, key, fingerprint, reason))

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        await self._run(partial(_reset_key, self._conn, provider, key, day))

    async def client_usage(
        self,
        day: str,
        clients: Sequence[str],
        free: Mapping[str, FairShare] | None = None,
        now_ms: int | None = None,
    ) -> list[ClientUsage]:
        free = free or {}
        now = self._clock() if now_ms is None else now_ms
        client_map, providers = await self._run(partial(_read_clients, self._conn, day, list(free)))
        return logic.client_usages(client_map, providers, clients, free, now)

    async def remember_task(self, task_id: str, value: str, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, not {ttl_ms}")
        await self._run(partial(_remember, self._conn, task_id, value, self._clock(), ttl_ms))

    async def recall_task(self, task_id: str) -> str | None:
        return await self._run(partial(_recall, self._conn, task_id, self._clock()))

    async def ping(self) -> None:
        await self._run(partial(self._conn.execute, "SELECT 1"))

    async def aclose(self) -> None:
        if self._closed:
            return
        await self._run(self._conn.close)
        self._closed = True
        self._executor.shutdown(wait=False)
