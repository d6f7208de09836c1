"""The SQLite reservation: reserve.lua's index of available keys, kept in tables.

The same steps as reserve.lua, so a reserve costs about the same with 2 or 2,000 keys (see
that script's header for why the index is exact): per (provider, day, key set, model) the
keys that may serve (kind 0, ordered by score then position) and those cooling (kind 1,
ordered by the end of their cooldown); rebuilt from the day's rows when the provider's
epoch has moved; each candidate checked on its real rows before it is counted. Runs inside
the caller's BEGIN IMMEDIATE transaction, so several processes sharing the file see one
index. The decisions are logic.py's (tests/test_index_parity.py compares them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping

from router.quota import keys as k
from router.quota import logic
from router.quota.keysets import KeySet
from router.quota.selection import KeyView
from router.quota.types import (
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Strategy,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_index (
    provider TEXT NOT NULL,
    day TEXT NOT NULL,
    keyset TEXT NOT NULL,
    model TEXT NOT NULL,
    kind INTEGER NOT NULL,      -- 0: may serve (score: position, or minus the calls left)
    member INTEGER NOT NULL,    -- 1: cooling (score: end of the cooldown, Unix ms)
    score REAL NOT NULL,
    PRIMARY KEY (provider, day, keyset, model, kind, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quota_index_order
    ON quota_index (provider, day, keyset, model, kind, score, member);
CREATE TABLE IF NOT EXISTS quota_index_built (
    provider TEXT NOT NULL,
    day TEXT NOT NULL,
    keyset TEXT NOT NULL,
    model TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (provider, day, keyset, model)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_epoch (
    provider TEXT NOT NULL PRIMARY KEY,
    epoch INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_pool (
    provider TEXT NOT NULL,
    day TEXT NOT NULL,
    stamp TEXT NOT NULL,
    lim INTEGER,                -- NULL: a key has no cap (no fair share)
    remaining INTEGER,
    PRIMARY KEY (provider, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_rate (   -- the per-minute windows (router/quota/rates.py)
    field TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""
DAY_TABLES = ("quota_index", "quota_index_built", "quota_pool")  # purged with old days
LIVE, COOL = 0, 1
Fields = dict[str, str]
_FAR = float(2**60)  # above every score


def bump_epoch(conn: sqlite3.Connection, provider: str) -> None:
    """A change that can give a key back: the indexes of ``provider`` are rebuilt."""
    conn.execute(
        "INSERT INTO quota_epoch (provider, epoch) VALUES (?, 1) "
        "ON CONFLICT (provider) DO UPDATE SET epoch = epoch + 1",
        (provider,),
    )


def _get(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> object | None:
    row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]


class _Index:
    """One (provider, day, key set, model) index: the two sorted sets of reserve.lua."""

    def __init__(self, conn: sqlite3.Connection, req: ReserveRequest, ks: KeySet) -> None:
        self.conn = conn
        self.where = (req.provider, req.day, ks.digest, req.model)

    def built_at(self) -> int | None:
        sql = (
            "SELECT epoch FROM quota_index_built "
            "WHERE provider = ? AND day = ? AND keyset = ? AND model = ?"
        )
        value = _get(self.conn, sql, self.where)
        return None if value is None else int(str(value))

    def clear(self) -> None:
        self.conn.execute(
            "DELETE FROM quota_index WHERE provider = ? AND day = ? AND keyset = ? AND model = ?",
            self.where,
        )

    def mark(self, epoch: int) -> None:
        self.conn.execute(
            "INSERT INTO quota_index_built VALUES (?, ?, ?, ?, ?) ON CONFLICT "
            "(provider, day, keyset, model) DO UPDATE SET epoch = excluded.epoch",
            (*self.where, epoch),
        )

    def put(self, kind: int, member: int, score: float) -> None:
        self.conn.execute(
            "INSERT INTO quota_index VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
            "(provider, day, keyset, model, kind, member) DO UPDATE SET score = excluded.score",
            (*self.where, kind, member, score),
        )

    def drop(self, kind: int, member: int) -> None:
        self.conn.execute(
            "DELETE FROM quota_index WHERE provider = ? AND day = ? AND keyset = ? "
            "AND model = ? AND kind = ? AND member = ?",
            (*self.where, kind, member),
        )

    def first(self, kind: int, low: float, high: float) -> tuple[int, float] | None:
        """The first (member, score) of ``kind`` with low <= score <= high."""
        row = self.conn.execute(
            "SELECT member, score FROM quota_index WHERE provider = ? AND day = ? "
            "AND keyset = ? AND model = ? AND kind = ? AND score BETWEEN ? AND ? "
            "ORDER BY score, member LIMIT 1",
            (*self.where, kind, low, high),
        ).fetchone()
        return None if row is None else (int(row[0]), float(row[1]))

    def ended(self, now_ms: int) -> list[int]:
        rows = self.conn.execute(
            "SELECT member FROM quota_index WHERE provider = ? AND day = ? AND keyset = ? "
            "AND model = ? AND kind = ? AND score <= ? ORDER BY score, member",
            (*self.where, COOL, now_ms),
        )
        return [int(member) for (member,) in rows.fetchall()]


def _dead(view: KeyView) -> bool:
    return view.disabled or view.is_exhausted()


def reserve(
    conn: sqlite3.Connection,
    req: ReserveRequest,
    ks: KeySet,
    load: Callable[[], tuple[dict[str, str], dict[str, str]]],
) -> tuple[Reservation | NoCapacity, dict[str, str], dict[str, str], Fields]:
    """reserve.lua's steps on SQLite. Returns the outcome and the fields to write to the day
    map, the clients day map and the rates (the index and the pool totals are written here).
    ``load`` reads the whole day map and disabled map (for a build)."""
    return _Reserve(conn, req, ks, load).run()


class _Reserve:
    """One reserve, step by step as in reserve.lua: (a) client limit, (b) index, (c) fair
    share, (d) selection, (e) count."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        req: ReserveRequest,
        ks: KeySet,
        load: Callable[[], tuple[dict[str, str], dict[str, str]]],
    ) -> None:
        self.conn, self.req, self.ks, self.load = conn, req, ks, load
        self.index = _Index(conn, req, ks)
        self.clients = _client_fields(conn, req.day, req)
        self.changed: dict[str, str] = {}
        self.whole: tuple[dict[str, str], dict[str, str]] | None = None
        self.epoch = 0
        self.rates: dict[str, str] = {}  # the per-minute windows read so far

    def run(self) -> tuple[Reservation | NoCapacity, dict[str, str], dict[str, str], Fields]:
        req = self.req
        cost = self.day_value(k.COST_FIELD)
        day = {} if cost is None else {k.COST_FIELD: cost}
        client = req.client
        if client is not None and client.count_rate:
            for field in (k.client_rpm_field(client.name), k.client_tpm_field(client.name)):
                self.rate(field)
        refusal = logic.refusal_before(day, self.clients, self.rates, req)  # (a)
        if refusal is not None:
            return refusal, {}, {}, {}
        self.build()  # (b)
        over_share, fair_counted = self.fair_share()  # (c)
        picked, retry_at = self.select()  # (d)
        if picked is None:
            return NoCapacity(req.provider, req.model, retry_at), self.changed, {}, {}
        if over_share is not None:
            refusal = NoCapacity(req.provider, req.model, None, Refusal.CLIENT_SHARE, over_share)
            return refusal, self.changed, {}, {}
        return self.count(*picked, fair_counted)  # (e)

    # -- reading --------------------------------------------------------------------------

    def day_value(self, field: str) -> str | None:
        value = _get(
            self.conn,
            "SELECT value FROM quota_day WHERE provider = ? AND day = ? AND field = ?",
            (self.req.provider, self.req.day, field),
        )
        return None if value is None else str(value)

    def rate(self, field: str) -> str | None:
        if field not in self.rates:
            value = _get(self.conn, "SELECT value FROM quota_rate WHERE field = ?", (field,))
            if value is None:
                return None
            self.rates[field] = str(value)
        return self.rates[field]

    def key_rate(self, spec: KeySpec) -> str | None:
        return logic.key_rate(self.rate, self.req.provider, spec)

    def view(self, i: int) -> KeyView:
        spec, model = self.req.keys[i], self.req.model
        names = (
            k.used_field(spec.name),
            k.model_used_field(spec.name, model),
            k.exhausted_field(spec.name),
            k.model_exhausted_field(spec.name, model),
            k.cooling_field(spec.name),
            k.model_cooling_field(spec.name, model),
        )
        fields = _day_fields(self.conn, self.req.provider, self.req.day, names)
        record = _get(
            self.conn,
            "SELECT value FROM quota_disabled WHERE provider = ? AND key = ?",
            (self.req.provider, spec.name),
        )
        disabled = {} if record is None else {spec.name: str(record)}
        return logic.key_view(fields, disabled, spec, model, self.key_rate(spec), self.req.now_ms)

    def score(self, i: int, v: KeyView) -> float:
        return float(-v.remaining() if self.req.strategy is Strategy.MOST_REMAINING else i)

    def place(self, i: int, v: KeyView) -> None:
        """Put key i where its view says it belongs: the index, the cooling index or neither."""
        index = self.index
        if _dead(v):
            index.drop(LIVE, i)
            index.drop(COOL, i)
            return
        at = v.available_at(self.req.now_ms)
        if at is not None:
            index.drop(LIVE, i)
            index.put(COOL, i, at)
        else:
            index.drop(COOL, i)
            index.put(LIVE, i, self.score(i, v))

    def whole_day(self) -> tuple[dict[str, str], dict[str, str]]:
        """The whole day map and disabled map: read once, only for a build or pool totals."""
        if self.whole is None:
            self.whole = self.load()
        return self.whole

    # -- (b) the index: built when missing or older than the epoch ---------------------------

    def build(self) -> None:
        req = self.req
        epoch = _get(self.conn, "SELECT epoch FROM quota_epoch WHERE provider = ?", (req.provider,))
        self.epoch = 0 if epoch is None else int(str(epoch))
        if self.index.built_at() != self.epoch:
            fields, disabled = self.whole_day()
            self.index.clear()
            for i, spec in enumerate(req.keys):
                rate = self.key_rate(spec)
                v = logic.key_view(fields, disabled, spec, req.model, rate, req.now_ms)
                if not _dead(v):
                    self.place(i, v)
            self.index.mark(self.epoch)
        for i in self.index.ended(req.now_ms):  # cooldowns that ended
            self.place(i, self.view(i))

    # -- (c) the fair share, with the pool totals kept for this epoch and key set ------------

    @property
    def stamp(self) -> str:
        return f"{self.epoch}:{self.ks.pool_stamp}"

    def fair_share(self) -> tuple[int | None, bool]:
        """(the share, when the client used it up; whether the call counts against it)."""
        client = self.req.client
        if client is None or client.fair_share is None:
            return None, False
        fair = client.fair_share
        share_out = logic.share_out_now(
            self.day_value(k.SHARE_OUT_FIELD),
            lambda: _pool(self.conn, self.req, self.stamp, self.whole_day),
            fair.below,
            self.changed,
        )
        if share_out is None:
            return None, False
        share = logic.fair_share(self.clients, fair, client.name, share_out, self.req.now_ms)
        field = k.fair_used_field(client.name)
        self.clients[field] = self.day_value(field) or "0"  # for the count below
        return (share if int(self.clients[field]) >= share else None), True

    # -- (d) select the key: the first candidate that really can serve -----------------------

    def select(self) -> tuple[tuple[int, KeyView] | None, int | None]:
        retry_at: int | None = None
        for _ in range(len(self.req.keys) + 1):
            picked = self.pick()
            if picked is not None:
                return picked, None
            retry_at, again = self.earliest()
            if not again:
                break
        return None, retry_at

    def start(self) -> int:
        n = len(self.req.keys)
        if self.req.strategy is not Strategy.ROUND_ROBIN or n == 0:
            return 0
        return int(self.day_value(k.CURSOR_FIELD) or 0) % n

    def candidate(self, start: int) -> tuple[int, float] | None:
        if self.req.strategy is not Strategy.ROUND_ROBIN:
            return self.index.first(LIVE, -_FAR, _FAR)
        found = self.index.first(LIVE, start, _FAR)
        if found is None and start > 0:
            found = self.index.first(LIVE, -_FAR, start - 0.5)
        return found

    def pick(self) -> tuple[int, KeyView] | None:
        start = self.start()
        while (found := self.candidate(start)) is not None:
            i, stored = found
            v = self.view(i)
            if _dead(v) or v.available_at(self.req.now_ms) is not None:
                self.place(i, v)
            elif self.score(i, v) != stored:
                self.index.put(LIVE, i, self.score(i, v))  # stale: sort it again, look again
            else:
                return i, v
        return None

    def earliest(self) -> tuple[int | None, bool]:
        """The earliest end of a cooldown of a key that can still serve; True: a key there
        is not cooling after all (another caller's clock is ahead), pick again."""
        while (found := self.index.first(COOL, -_FAR, _FAR)) is not None:
            i, stored = found
            v = self.view(i)
            at = v.available_at(self.req.now_ms)
            if not _dead(v) and at == stored:
                return at, False
            self.place(i, v)
            if not _dead(v) and at is None:
                return None, True
        return None, False

    # -- (e) count the call on the key and on the client -------------------------------------

    def count(
        self, best: int, v: KeyView, fair_counted: bool
    ) -> tuple[Reservation, dict[str, str], dict[str, str], Fields]:
        req, client, changed = self.req, self.req.client, self.changed
        spec = req.keys[best]
        changed[k.used_field(spec.name)] = str(v.used + 1)
        changed[k.model_used_field(spec.name, req.model)] = str(v.model_used + 1)
        if req.strategy is Strategy.MOST_REMAINING:
            self.index.put(LIVE, best, self.score(best, v) + 1)  # one call fewer left
        elif req.strategy is Strategy.ROUND_ROBIN:
            changed[k.CURSOR_FIELD] = str(best + 1)
        _count_in_pool(self.conn, req.provider, req.day, self.stamp)
        changed_clients: dict[str, str] = {}
        if client is not None:
            changed_clients = logic.count_client(self.clients, client, req.now_ms)
            if fair_counted:
                field = k.fair_used_field(client.name)
                changed[field] = str(int(self.clients[field]) + 1)
        changed_rates: dict[str, str] = {}
        logic.count_rates(self.rates, req, spec, changed_rates)
        outcome = logic.reservation_for(req, best, v.used + 1, v.model_used + 1, fair_counted)
        return outcome, changed, changed_clients, changed_rates


def _day_fields(
    conn: sqlite3.Connection, provider: str, day: str, names: tuple[str, ...]
) -> dict[str, str]:
    marks = ",".join("?" * len(names))
    rows = conn.execute(
        # Only placeholders are joined in: the values are bound.
        f"SELECT field, value FROM quota_day WHERE provider = ? AND day = ? AND field IN ({marks})",  # noqa: S608
        (provider, day, *names),
    )
    return dict(rows.fetchall())


def _client_fields(conn: sqlite3.Connection, day: str, req: ReserveRequest) -> dict[str, str]:
    """The clients day map's fields this reserve reads: the client's counts, and the last
    seen time of every client in its fair share's weights."""
    client = req.client
    if client is None:
        return {}
    names = [
        k.client_used_field(client.name),
        k.client_free_used_field(client.name),
        k.client_seen_field(client.name),
        k.client_tokens_field(client.name),
        k.client_cost_field(client.name),
    ]
    if client.fair_share is not None:
        names += [k.client_seen_field(name) for name, _ in client.fair_share.weights]
    marks = ",".join("?" * len(names))
    rows = conn.execute(
        f"SELECT field, value FROM quota_client WHERE day = ? AND field IN ({marks})",  # noqa: S608
        (day, *names),
    )
    return dict(rows.fetchall())


def _pool(
    conn: sqlite3.Connection,
    req: ReserveRequest,
    stamp: str,
    whole_day: Callable[[], tuple[Mapping[str, str], Mapping[str, str]]],
) -> logic.Pool | None:
    row = conn.execute(
        "SELECT stamp, lim, remaining FROM quota_pool WHERE provider = ? AND day = ?",
        (req.provider, req.day),
    ).fetchone()
    if row is not None and row[0] == stamp:
        return None if row[1] is None else logic.Pool(int(row[1]), int(row[2]))
    fields, disabled = whole_day()
    views = [logic.key_view(fields, disabled, spec, req.model) for spec in req.keys]
    pool = logic.pool_of(views)
    conn.execute(
        "INSERT INTO quota_pool VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider, day) DO UPDATE "
        "SET stamp = excluded.stamp, lim = excluded.lim, remaining = excluded.remaining",
        (
            req.provider,
            req.day,
            stamp,
            None if pool is None else pool.limit,
            None if pool is None else pool.remaining,
        ),
    )
    return pool


def _count_in_pool(conn: sqlite3.Connection, provider: str, day: str, stamp: str) -> None:
    """The pool totals lose the call; totals of another key set are dropped instead."""
    conn.execute(
        "UPDATE quota_pool SET remaining = remaining - 1 "
        "WHERE provider = ? AND day = ? AND stamp = ? AND remaining IS NOT NULL",
        (provider, day, stamp),
    )
    conn.execute(
        "DELETE FROM quota_pool WHERE provider = ? AND day = ? AND stamp != ?",
        (provider, day, stamp),
    )
