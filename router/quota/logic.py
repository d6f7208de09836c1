"""The quota decisions on one provider's day map, in pure Python (no I/O).

The memory and SQLite stores run these functions inside their own atomic sections;
``lua/reserve.lua`` and ``lua/settle.lua`` make the same decisions inside Redis.
Functions never mutate their inputs: they return the fields to write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from router.quota import keys as k
from router.quota.selection import KeyView, select_key
from router.quota.types import (
    Cooldown,
    KeySpec,
    KeyState,
    KeyUsage,
    ModelUsage,
    NoCapacity,
    Reservation,
    ReserveRequest,
    Settlement,
    SettleResult,
)

REASON_UPSTREAM_ZERO = "upstream-remaining-0"  # the remaining header said 0
REASON_429 = "429"  # upstream refused with a quota error
REASON_LIMIT = "limit"  # the configured limit is used up (not stored; snapshot only)
MAX_BACKOFF_EXPONENT = 60  # 2**60 ms outlasts any cap; keeps the Lua doubles finite

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


def key_view(fields: Fields, disabled: Fields, spec: KeySpec, model: str) -> KeyView:
    """What selection needs to know about ``spec`` for ``model``, read from the maps."""
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
    )


def reserve_on(
    fields: Fields, disabled: Fields, req: ReserveRequest
) -> tuple[Reservation | NoCapacity, dict[str, str]]:
    """Pick a key for ``req`` and count one call on it; returns the outcome and fields to write."""
    views = [key_view(fields, disabled, spec, req.model) for spec in req.keys]
    cursor = int(fields.get(k.CURSOR_FIELD, "0"))
    picked = select_key(views, req.strategy, cursor, req.now_ms)
    if picked.chosen is None:
        return NoCapacity(req.provider, req.model, picked.retry_at_ms), {}
    index = picked.chosen
    spec, view = req.keys[index], views[index]
    changed = {
        k.used_field(spec.name): str(view.used + 1),
        k.model_used_field(spec.name, req.model): str(view.model_used + 1),
    }
    if picked.cursor != cursor:
        changed[k.CURSOR_FIELD] = str(picked.cursor)
    return reservation_for(req, index, view.used + 1, view.model_used + 1), changed


def reservation_for(req: ReserveRequest, index: int, used: int, model_used: int) -> Reservation:
    """The Reservation of ``req.keys[index]``, given its counts after this call."""
    spec = req.keys[index]
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
    )


def _worst(a: Scope | None, b: Scope | None) -> Scope | None:
    """A key-wide exhaustion outranks a model one."""
    return "key" if "key" in (a, b) else a or b


def _release(day: _Changes, res: Reservation) -> None:
    for field in (k.used_field(res.key), k.model_used_field(res.key, res.model)):
        day.set(field, max(day.count(field) - 1, 0))


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


def settle_on(
    fields: Fields, disabled: Fields, res: Reservation, settlement: Settlement, now_ms: int
) -> tuple[SettleResult, dict[str, str], dict[str, str]]:
    """Apply an upstream answer; returns the result, day fields and disabled fields to write."""
    day = _Changes(fields)
    if settlement.release:
        _release(day, res)
    exhausted = _worst(_sync_headers(day, res, settlement), _exhaust(day, res, settlement))
    until = None
    if settlement.cooldown is not None:
        until = _cool(day, res, settlement.cooldown, now_ms)
    changed_disabled: dict[str, str] = {}
    newly_disabled = False
    if settlement.disable_reason is not None:
        was = disabled_reason(disabled.get(res.key), res.fingerprint)
        newly_disabled = was is None
        changed_disabled[res.key] = disabled_record(res.fingerprint, settlement.disable_reason)
    result = SettleResult(
        exhausted=exhausted,
        cooldown_until_ms=until,
        newly_disabled=newly_disabled,
    )
    return result, day.changed, changed_disabled


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
