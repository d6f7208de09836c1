"""Tokens and cost per quota day: what ``QuotaStore.record_usage`` adds and ``usage`` reads. Pure.

A batch of ``UsageRecord`` becomes increments, merged per field so a batch of a thousand
answers of one client and model is a handful of additions:

- the day's usage map (Redis ``{prefix}:usage:<day>``), field
  ``<client>|<provider>|<key>|<model>|<kind>``: ``p`` prompt, ``c`` completion, ``t`` total
  tokens, ``$`` cost (nanos), ``n`` answers, ``e`` of which estimated;
- the provider's day map, ``$``: its cost today, which its ``daily_budget`` is checked against;
- the clients day map, ``tk|<client>`` and ``$|<client>``: the client's tokens and cost today,
  checked against its ``daily_tokens`` and ``daily_budget``;
- the client's tokens-per-minute window (rates hash, ``t|<client>``), for clients with a tpm.

Every store applies them in one atomic step, once per batch token (Redis: ``lua/usage.lua``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from router.quota import keys as k
from router.quota.types import UsageRecord, UsageRow

KINDS = ("p", "c", "t", "$", "n", "e")


@dataclass(slots=True)
class DayChanges:
    """Increments for one quota day."""

    day_end_ms: int
    usage: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    clients: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    providers: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # cost


@dataclass(slots=True)
class Changes:
    days: dict[str, DayChanges] = field(default_factory=dict)
    # client -> [(at_ms, tokens)], in the order the answers ended
    tpm: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))


def usage_field(client: str, provider: str, key: str, model: str, kind: str) -> str:
    return k.SEP.join((client, provider, key, model, kind))


def changes_of(records: Iterable[UsageRecord]) -> Changes:
    out = Changes()
    for r in records:
        day = out.days.get(r.day)
        if day is None:
            day = out.days[r.day] = DayChanges(r.day_end_ms)
        base = k.SEP.join((r.client, r.provider, r.key, r.model, ""))
        for kind, amount in zip(
            KINDS, (r.prompt, r.completion, r.total, r.cost, 1, int(r.estimated)), strict=True
        ):
            if amount:
                day.usage[base + kind] += amount
        if r.total:
            day.clients[k.client_tokens_field(r.client)] += r.total
        if r.cost:
            day.clients[k.client_cost_field(r.client)] += r.cost
            day.providers[r.provider] += r.cost
        if r.tpm and r.total:
            out.tpm[r.client].append((r.at_ms, r.total))
    return out


def rows_of(fields: Mapping[str, str]) -> list[UsageRow]:
    """A day's usage map as rows, sorted by client, provider, key and model."""
    sums: dict[tuple[str, str, str, str], dict[str, int]] = {}
    for name, value in fields.items():
        parts = name.split(k.SEP)
        if len(parts) != 5 or parts[4] not in KINDS:
            continue
        client, provider, key, model, kind = parts
        sums.setdefault((client, provider, key, model), {})[kind] = int(value)
    return [
        UsageRow(
            client=c,
            provider=p,
            key=key,
            model=m,
            prompt=v.get("p", 0),
            completion=v.get("c", 0),
            total=v.get("t", 0),
            cost=v.get("$", 0),
            answers=v.get("n", 0),
            estimated=v.get("e", 0),
        )
        for (c, p, key, m), v in sorted(sums.items())
    ]


def add_to(fields: Mapping[str, str], increments: Mapping[str, int]) -> dict[str, str]:
    """The new values of ``fields`` after the increments (for the stores that read, add and
    write: memory, SQLite)."""
    return {f: str(int(fields.get(f, "0")) + n) for f, n in increments.items()}
