"""Every Redis key name and day-map field name, shared by all three stores.

The Lua scripts build the same field names; keep ``lua/*.lua`` in step with this module.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_PREFIX = "modelscope-router"

USED = "u"
MODEL_USED = "m"
EXHAUSTED = "x"
COOLING = "c"
AMBIGUOUS = "a"
CURSOR_FIELD = "rr"
SEP = "|"  # never part of a key name or a model name


def day_key(prefix: str, provider: str, day: str) -> str:
    """Redis key of a provider's day map; the hash tag keeps both maps in one cluster slot."""
    return f"{prefix}:{{{provider}}}:day:{day}"


def disabled_key(prefix: str, provider: str) -> str:
    """Redis key of a provider's disabled map."""
    return f"{prefix}:{{{provider}}}:disabled"


def used_field(key: str) -> str:
    return f"{USED}{SEP}{key}"


def model_used_field(key: str, model: str) -> str:
    return f"{MODEL_USED}{SEP}{key}{SEP}{model}"


def exhausted_field(key: str) -> str:
    return f"{EXHAUSTED}{SEP}{key}"


def model_exhausted_field(key: str, model: str) -> str:
    return f"{EXHAUSTED}{SEP}{key}{SEP}{model}"


def cooling_field(key: str) -> str:
    return f"{COOLING}{SEP}{key}"


def model_cooling_field(key: str, model: str) -> str:
    return f"{COOLING}{SEP}{key}{SEP}{model}"


def ambiguous_field(key: str) -> str:
    return f"{AMBIGUOUS}{SEP}{key}"


class ParsedField(NamedTuple):
    kind: str
    key: str
    model: str | None


def parse_field(field: str) -> ParsedField | None:
    """Split a day-map field into (kind, key, model); None for the cursor or unknown fields."""
    parts = field.split(SEP, 2)
    if len(parts) < 2 or parts[0] not in (USED, MODEL_USED, EXHAUSTED, COOLING, AMBIGUOUS):
        return None
    return ParsedField(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
