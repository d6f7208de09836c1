"""The quota decisions on a provider's day map and the clients day map, in pure Python (no I/O).

The memory and SQLite stores run these functions inside their own atomic sections;
``lua/reserve.lua`` and ``lua/settle.lua`` make the same decisions inside Redis.
Functions never mutate their inputs: they return the fields to write.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

from router.quota import keys as k
from router.quota import rates
from router.quota.selection import KeyView, select_key
from router.quota.types import (
    ClientQuota,
    ClientUsage,
    Cooldown,
    FairShare,
    KeySpec,
    KeyState,
    KeyUsage,
    ModelUsage,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)

REASON_UPSTREAM_ZERO = "upstream-remaining-0"  # the remaining header said 0
REASON_429 = "429"  # upstream refused with a quota error
REASON_LIMIT = "limit"  # the configured limit is used up (not stored; snapshot only)
MAX_BACKOFF_EXPONENT = 60  # 2**60 ms outlasts any cap; keeps the Lua doubles finite
DEFAULT_WEIGHT = 1.0  # fair-share weight of a client missing from FairShare.weights

Fields = Mapping[str, str]
Scope = Literal["key", "model"]


class _Changes:
    """A read-through overlay on a day map that records what must be written back."""

    def __init__(self, fields: Fields) -> None:
        self._fields = fields
        self.changed: dict[str, str] = {}

    def get(self, field: str) -> str | None:
        if field in self.changed:
            return self.changed[field]
        return self._fields.get(field)

    def count(self, field: str) -> int:
        value = self.get(field)
        return 0 if value is None else int(value)

    def set(self, field: str, value: str | int) -> None:
        self.changed[field] = str(value)


def parse_cooldown(value: str | None) -> tuple[int, int] | None:
    """`"until_ms:strike"` -> (until_ms, strike)."""
    if value is None:
        return None
    until, _, strike = value.partition(":")
    return int(until), int(strike or "1")


def format_cooldown(until_ms: int, strike: int) -> str:
    return f"{until_ms}:{strike}"


def disabled_record(fingerprint: str, reason: str) -> str:
    return f"{fingerprint}{k.SEP}{reason}"


def disabled_reason(record: str | None, fingerprint: str) -> str | None:
    """The reason a key is disabled, or None when it is not (or was, with another secret)."""
    if record is None:
        return None
    stored_fp, _, reason = record.partition(k.SEP)
    return reason if stored_fp == fingerprint else None


def _until(value: str | None) -> int | None:
    cooldown = parse_cooldown(value)
    return None if cooldown is None else cooldown[0]


def key_view(
    fields: Fields,
    disabled: Fields,
    spec: KeySpec,
    model: str,
    rate: str | None = None,
    now_ms: int = 0,
) -> KeyView:
    """What selection needs to know about ``spec`` for ``model``, read from the maps;
    ``rate`` is the key's calls-per-minute window (rates hash), read at ``now_ms``."""
    name = spec.name
    return KeyView(
        used=int(fields.get(k.used_field(name), "0")),
        limit=spec.daily_limit,
        model_used=int(fields.get(k.model_used_field(name, model), "0")),
        model_limit=spec.model_limit,
        exhausted=k.exhausted_field(name) in fields,
        model_exhausted=k.model_exhausted_field(name, model) in fields,
        cooling_until_ms=_until(fields.get(k.cooling_field(name))),
        model_cooling_until_ms=_until(fields.get(k.model_cooling_field(name, model))),
        disabled=disabled_reason(disabled.get(name), spec.fingerprint) is not None,
        rpm_until_ms=rates.blocked_until(rate, spec.rpm, now_ms),
    )


def key_rate(read: Callable[[str], str | None], provider: str, spec: KeySpec) -> str | None:
    """The key's calls-per-minute window (``read``: a rates field), read only when the key has
    an rpm."""
    return None if spec.rpm is None else read(k.key_rpm_field(provider, spec.name))


class Pool(NamedTuple):
    limit: int  # sum of the daily limits of the keys that are not disabled
    remaining: int  # their calls left today (0 for a spent or exhausted key)


def pool_of(views: Sequence[KeyView]) -> Pool | None:
    """A provider's pool today; None when a usable key has no cap (no fair share then)."""
    limit = remaining = 0
    for view in views:
        if view.disabled:
            continue
        if view.limit is None:
            return None
        limit += view.limit
        if not view.exhausted:
            remaining += max(0, view.limit - view.used)
    return Pool(limit, remaining)


def _seen_within(clients: Fields, client: str, since_ms: int) -> bool:
    seen = clients.get(k.client_seen_field(client))
    return seen is not None and int(seen) >= since_ms


def fair_share(clients: Fields, fair: FairShare, client: str, share_out: int, now_ms: int) -> int:
    """``client``'s calls out of ``share_out``: its weight over those of the counted clients.

    Counted: every client in the weights, or with an active window only those seen within
    it; ``client`` itself always counts. Summed in the weights' order (reserve.lua too), so
    the float arithmetic is the same on both sides.
    """
    window = fair.active_window_ms
    own: float | None = None
    total = 0.0
    for name, weight in fair.weights:
        w = float(weight)
        if name == client:
            if own is None:
                own = w
            total += w
        elif window is None or _seen_within(clients, name, now_ms - window):
            total += w
    if own is None:
        own = DEFAULT_WEIGHT
        total += own
    if total <= 0:
        return 0
    return math.floor(share_out * own / total)


def _count(fields: Fields, field: str) -> int:
    return int(fields.get(field, "0"))


def over_limit(clients: Fields, client: ClientQuota) -> bool:
    """Whether the client's own daily limit is reached (checked before anything is touched)."""
    limit = client.daily_limit
    return limit is not None and _count(clients, k.client_used_field(client.name)) >= limit


def refusal_before(
    fields: Fields, clients: Fields, rates_map: Fields, req: ReserveRequest
) -> NoCapacity | None:
    """The refusal that comes before any key is looked at, or None: the client's daily calls,
    daily tokens, requests and tokens per minute (once per request), budget, then the
    provider's budget. Nothing is counted when one refuses."""
    client = req.client

    def refuse(reason: Refusal, limit: int | None, retry_at: int | None = None) -> NoCapacity:
        return NoCapacity(req.provider, req.model, retry_at, reason, limit)

    if client is not None:
        if over_limit(clients, client):
            return refuse(Refusal.CLIENT_LIMIT, client.daily_limit)
        tokens = client.daily_tokens
        if tokens is not None and _count(clients, k.client_tokens_field(client.name)) >= tokens:
            return refuse(Refusal.CLIENT_TOKENS, tokens)
        if client.count_rate:
            for reason, limit, field in (
                (Refusal.CLIENT_RPM, client.rpm, k.client_rpm_field(client.name)),
                (Refusal.CLIENT_TPM, client.tpm, k.client_tpm_field(client.name)),
            ):
                if limit is not None:
                    kept, total = rates.window(rates_map.get(field), req.now_ms)
                    if total >= limit:
                        return refuse(reason, limit, rates.retry_at(kept, total, limit))
        budget = client.daily_budget
        if budget is not None and _count(clients, k.client_cost_field(client.name)) >= budget:
            return refuse(Refusal.CLIENT_BUDGET, budget)
    if req.budget is not None and _count(fields, k.COST_FIELD) >= req.budget:
        return refuse(Refusal.PROVIDER_BUDGET, req.budget)
    return None


def count_rates(
    rates_map: Fields, req: ReserveRequest, spec: KeySpec, changed: dict[str, str]
) -> None:
    """Count the call in the client's requests-per-minute window (once per request) and in
    the key's calls-per-minute window, where those limits are set."""
    client = req.client
    if client is not None and client.count_rate and client.rpm is not None:
        field = k.client_rpm_field(client.name)
        kept, _ = rates.window(rates_map.get(field), req.now_ms)
        changed[field] = rates.add(kept, req.now_ms, 1)
    if spec.rpm is not None:
        field = k.key_rpm_field(req.provider, spec.name)
        kept, _ = rates.window(rates_map.get(field), req.now_ms)
        changed[field] = rates.add(kept, req.now_ms, 1)


def reserve_on(
    fields: Fields,
    disabled: Fields,
    clients: Fields,
    req: ReserveRequest,
    rates_map: Fields | None = None,
) -> tuple[Reservation | NoCapacity, dict[str, str], dict[str, str], dict[str, str]]:
    """Check the client and the budgets, pick a key for ``req`` and count one call.

    ``clients`` is the clients day map, ``rates_map`` the per-minute windows. Returns the
    outcome and the fields to write to the provider's day map, the clients day map and the
    rates map.
    """
    client = req.client
    rates_map = rates_map or {}
    refusal = refusal_before(fields, clients, rates_map, req)
    if refusal is not None:
        return refusal, {}, {}, {}
    views = [
        key_view(
            fields,
            disabled,
            spec,
            req.model,
            key_rate(rates_map.get, req.provider, spec),
            req.now_ms,
        )
        for spec in req.keys
    ]
    changed: dict[str, str] = {}
    fair_counted = False
    over_share: int | None = None
    if client is not None and client.fair_share is not None:
        fair = client.fair_share
        share = _share_now(fields, clients, views, client.name, fair, req.now_ms, changed)
        if share is not None and _count(fields, k.fair_used_field(client.name)) >= share:
            over_share = share
        fair_counted = share is not None
    cursor = int(fields.get(k.CURSOR_FIELD, "0"))
    picked = select_key(views, req.strategy, cursor, req.now_ms)
    if picked.chosen is None:  # a spent pool says so before a client's share does
        return NoCapacity(req.provider, req.model, picked.retry_at_ms), changed, {}, {}
    if over_share is not None:
        refusal = NoCapacity(req.provider, req.model, None, Refusal.CLIENT_SHARE, over_share)
        return refusal, changed, {}, {}
    index = picked.chosen
    spec, view = req.keys[index], views[index]
    changed[k.used_field(spec.name)] = str(view.used + 1)
    changed[k.model_used_field(spec.name, req.model)] = str(view.model_used + 1)
    if picked.cursor != cursor:
        changed[k.CURSOR_FIELD] = str(picked.cursor)
    changed_clients: dict[str, str] = {}
    if client is not None:
        changed_clients = count_client(clients, client, req.now_ms)
        if fair_counted:
            field = k.fair_used_field(client.name)
            changed[field] = str(_count(fields, field) + 1)
    changed_rates: dict[str, str] = {}
    count_rates(rates_map, req, spec, changed_rates)
    reservation = reservation_for(req, index, view.used + 1, view.model_used + 1, fair_counted)
    return reservation, changed, changed_clients, changed_rates


def _share_now(
    fields: Fields,
    clients: Fields,
    views: Sequence[KeyView],
    client: str,
    fair: FairShare,
    now_ms: int,
    changed: dict[str, str],
) -> int | None:
    """The client's share of the pool, or None while the pool is not shared out."""
    share_out = share_out_now(
        fields.get(k.SHARE_OUT_FIELD), lambda: pool_of(views), fair.below, changed
    )
    return None if share_out is None else fair_share(clients, fair, client, share_out, now_ms)


def share_out_now(
    raw: str | None, pool: Callable[[], Pool | None], below: float, changed: dict[str, str]
) -> int | None:
    """The pool's calls to share out today (``fs``), or None while it is not shared out.

    ``raw`` is the stored ``fs``. Without one, the share-out starts (in ``changed``) the first
    time the pool's remaining is below ``below`` of its limit, and keeps that remaining for
    the rest of the day. A pool with a key that has no cap (``pool()`` None) is never shared
    out. ``pool`` is asked only when needed: the SQLite store keeps its totals apart.
    """
    if raw is not None:
        return int(raw)
    totals = pool()
    if totals is None or not totals.remaining < below * totals.limit:
        return None
    changed[k.SHARE_OUT_FIELD] = str(totals.remaining)
    return totals.remaining


def count_client(clients: Fields, client: ClientQuota, now_ms: int) -> dict[str, str]:
    used = k.client_used_field(client.name)
    changed = {used: str(_count(clients, used) + 1), k.client_seen_field(client.name): str(now_ms)}
    if client.fair_share is not None:
        free_used = k.client_free_used_field(client.name)
        changed[free_used] = str(_count(clients, free_used) + 1)
    return changed


def reservation_for(
    req: ReserveRequest, index: int, used: int, model_used: int, fair_counted: bool = False
) -> Reservation:
    """The Reservation of ``req.keys[index]``, given its counts after this call."""
    spec = req.keys[index]
    client = req.client
    return Reservation(
        provider=req.provider,
        key=spec.name,
        fingerprint=spec.fingerprint,
        model=req.model,
        day=req.day,
        day_end_ms=req.day_end_ms,
        daily_limit=spec.daily_limit,
        model_limit=spec.model_limit,
        remaining=None if spec.daily_limit is None else spec.daily_limit - used,
        model_remaining=None if spec.model_limit is None else spec.model_limit - model_used,
        client=None if client is None else client.name,
        fair_counted=fair_counted,
        free=client is not None and client.fair_share is not None,
    )


def _worst(a: Scope | None, b: Scope | None) -> Scope | None:
    """A key-wide exhaustion outranks a model one."""
    return "key" if "key" in (a, b) else a or b


def _give_back(fields: _Changes, field: str) -> None:
    fields.set(field, max(fields.count(field) - 1, 0))


def _release(day: _Changes, clients: _Changes, res: Reservation) -> None:
    """Give the call back to the key and to the client, never below zero."""
    _give_back(day, k.used_field(res.key))
    _give_back(day, k.model_used_field(res.key, res.model))
    if res.client is None:
        return
    if res.fair_counted:
        _give_back(day, k.fair_used_field(res.client))
    _give_back(clients, k.client_used_field(res.client))
    if res.free:
        _give_back(clients, k.client_free_used_field(res.client))


def _sync_header(
    day: _Changes, remaining: int | None, limit: int | None, used_field: str, exhausted_field: str
) -> bool:
    """Trust upstream's remaining header over our count; True when it says nothing is left."""
    if remaining is None:
        return False
    if limit is not None:
        day.set(used_field, max(day.count(used_field), limit - remaining))
    if remaining > 0:
        return False
    day.set(exhausted_field, REASON_UPSTREAM_ZERO)
    return True


def _sync_headers(day: _Changes, res: Reservation, s: Settlement) -> Scope | None:
    key, model = res.key, res.model
    key_out = _sync_header(
        day, s.remaining, res.daily_limit, k.used_field(key), k.exhausted_field(key)
    )
    model_out = _sync_header(
        day,
        s.model_remaining,
        res.model_limit,
        k.model_used_field(key, model),
        k.model_exhausted_field(key, model),
    )
    return "key" if key_out else "model" if model_out else None


def _ambiguous_scope(day: _Changes, res: Reservation, near_zero: int) -> Scope:
    """Decide whether "Request limit exceeded" meant the key or only this model."""
    first_model = day.get(k.ambiguous_field(res.key))
    key_nearly_out = (
        res.daily_limit is not None
        and res.daily_limit - day.count(k.used_field(res.key)) <= near_zero
    )
    # A second model refused on the same day means the key itself is out.
    if key_nearly_out or first_model not in (None, res.model):
        return "key"
    if first_model is None:
        day.set(k.ambiguous_field(res.key), res.model)
    return "model"


def _exhaust(day: _Changes, res: Reservation, s: Settlement) -> Scope | None:
    """Mark what a quota refusal used up."""
    if s.exhaust is None:
        return None
    scope = _ambiguous_scope(day, res, s.near_zero) if s.exhaust == "ambiguous" else s.exhaust
    if scope == "key":
        day.set(k.exhausted_field(res.key), REASON_429)
    else:
        day.set(k.model_exhausted_field(res.key, res.model), REASON_429)
    return scope


def _cool(day: _Changes, res: Reservation, cooldown: Cooldown, now_ms: int) -> int:
    """Start (or extend) a cooldown; repeats within max_ms double it. Returns its end."""
    if cooldown.scope == "key":
        field = k.cooling_field(res.key)
    else:
        field = k.model_cooling_field(res.key, res.model)
    prev = parse_cooldown(day.get(field))
    if cooldown.fixed:
        strike = 1 if prev is None else prev[1]
        until = now_ms + cooldown.base_ms
    else:
        repeat = prev is not None and now_ms - prev[0] < cooldown.max_ms
        strike = prev[1] + 1 if prev is not None and repeat else 1
        exponent = min(strike - 1, MAX_BACKOFF_EXPONENT)
        until = now_ms + min(cooldown.base_ms * 2**exponent, cooldown.max_ms)
    until = min(until, res.day_end_ms)  # the reset frees the key anyway
    day.set(field, format_cooldown(until, strike))
    return until


def disable_on(disabled: Fields, key: str, fingerprint: str, reason: str) -> tuple[bool, str]:
    """(newly disabled, the record to store) for disabling ``key`` with this secret."""
    newly = disabled_reason(disabled.get(key), fingerprint) is None
    return newly, disabled_record(fingerprint, reason)


def settle_on(
    fields: Fields,
    disabled: Fields,
    clients: Fields,
    res: Reservation,
    settlement: Settlement,
    now_ms: int,
) -> tuple[SettleResult, dict[str, str], dict[str, str], dict[str, str]]:
    """Apply an upstream answer.

    Returns the result and the fields to write to the day map, the disabled map and the
    clients day map (``clients`` is that map as it is now).
    """
    day = _Changes(fields)
    client_map = _Changes(clients)
    if settlement.release:
        _release(day, client_map, res)
    exhausted = _worst(_sync_headers(day, res, settlement), _exhaust(day, res, settlement))
    until = None
    if settlement.cooldown is not None:
        until = _cool(day, res, settlement.cooldown, now_ms)
    changed_disabled: dict[str, str] = {}
    newly_disabled = False
    if settlement.disable_reason is not None:
        newly_disabled, record = disable_on(
            disabled, res.key, res.fingerprint, settlement.disable_reason
        )
        changed_disabled[res.key] = record
    result = SettleResult(
        exhausted=exhausted,
        cooldown_until_ms=until,
        newly_disabled=newly_disabled,
    )
    return result, day.changed, changed_disabled, client_map.changed


def may_free_a_key(fields: Fields, changed: Mapping[str, str], settlement: Settlement) -> bool:
    """Whether a settle may have given a key back, or changed the pool's totals: anything but
    a cooldown that ends no sooner than the one before. The indexes of available keys
    (reserve.lua, sqlite_reserve.py) are rebuilt after such a change; settle.lua decides
    the same."""
    s = settlement
    if s.release or s.remaining is not None or s.model_remaining is not None:
        return True
    if s.exhaust is not None or s.disable_reason is not None:
        return True
    for field, value in changed.items():
        before = parse_cooldown(fields.get(field))
        parsed = k.parse_field(field)
        after = parse_cooldown(value)
        cooling = parsed is not None and parsed.kind == k.COOLING
        if cooling and before and after and after[0] < before[0]:  # a cooldown made shorter
            return True
    return False


def key_fields(fields: Iterable[str], key: str) -> list[str]:
    """The day-map fields of ``key``: its counters, exhaustion, cooldowns (what reset_key drops)."""
    found = []
    for field in fields:
        parsed = k.parse_field(field)
        if parsed is not None and parsed.key == key:
            found.append(field)
    return found


def client_usages(
    clients: Fields,
    providers: Mapping[str, Fields],
    names: Sequence[str],
    free: Mapping[str, FairShare],
    now_ms: int,
) -> list[ClientUsage]:
    """Usage of each client in ``names`` from the clients day map and the free providers' maps.

    ``providers[p]`` needs only ``fs`` and the clients' ``fu|`` fields of provider ``p``.
    """
    usages = []
    for name in names:
        shares = []
        for provider, fair in free.items():
            fields = providers.get(provider, {})
            raw = fields.get(k.SHARE_OUT_FIELD)
            if raw is None:
                continue
            share = fair_share(clients, fair, name, int(raw), now_ms)
            shares.append((provider, share, _count(fields, k.fair_used_field(name))))
        usages.append(
            ClientUsage(
                client=name,
                used=_count(clients, k.client_used_field(name)),
                free_used=_count(clients, k.client_free_used_field(name)),
                shares=tuple(shares),
            )
        )
    return usages


def _key_state(
    fields: Fields, disabled: Fields, spec: KeySpec, used: int, now_ms: int
) -> tuple[KeyState, int | None, str | None]:
    """(state, cooling until, reason) of a key from its key-level fields only."""
    reason = disabled_reason(disabled.get(spec.name), spec.fingerprint)
    if reason is not None:
        return KeyState.DISABLED, None, reason
    reason = fields.get(k.exhausted_field(spec.name))
    if reason is None and spec.daily_limit is not None and used >= spec.daily_limit:
        reason = REASON_LIMIT
    if reason is not None:
        return KeyState.EXHAUSTED, None, reason
    until = _until(fields.get(k.cooling_field(spec.name)))
    if until is not None and until > now_ms:
        return KeyState.COOLING, until, None
    return KeyState.AVAILABLE, None, None


def _model_usage(
    fields: Fields, key: str, model: str, limit: int | None, now_ms: int
) -> ModelUsage:
    used = int(fields.get(k.model_used_field(key, model), "0"))
    if k.model_exhausted_field(key, model) in fields or (limit is not None and used >= limit):
        return ModelUsage(model, used, KeyState.EXHAUSTED)
    until = _until(fields.get(k.model_cooling_field(key, model)))
    if until is not None and until > now_ms:
        return ModelUsage(model, used, KeyState.COOLING, until)
    return ModelUsage(model, used, KeyState.AVAILABLE)


def _models_by_key(fields: Fields) -> dict[str, set[str]]:
    models: dict[str, set[str]] = {}
    for field in fields:
        parsed = k.parse_field(field)
        if parsed is not None and parsed.model is not None:
            models.setdefault(parsed.key, set()).add(parsed.model)
    return models


def summarize(
    provider: str,
    fields: Fields,
    disabled: Fields,
    keys: Sequence[KeySpec],
    now_ms: int,
    model_limits: Mapping[str, int] | None = None,
) -> list[KeyUsage]:
    """Usage and state of every key in ``keys`` (in that order) from the two maps."""
    limits = model_limits or {}
    models = _models_by_key(fields)
    usages = []
    for spec in keys:
        used = int(fields.get(k.used_field(spec.name), "0"))
        state, until, reason = _key_state(fields, disabled, spec, used, now_ms)
        per_model = tuple(
            _model_usage(fields, spec.name, model, limits.get(model, spec.model_limit), now_ms)
            for model in sorted(models.get(spec.name, ()))
        )
        usages.append(
            KeyUsage(provider, spec.name, used, spec.daily_limit, state, until, reason, per_model)
        )
    return usages
