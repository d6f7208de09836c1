"""Every Redis key name and day-map field name, shared by all three stores.

The Lua scripts build the same field names; keep ``lua/*.lua`` in step with this module.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_PREFIX = "modelscope-router"

# Redis keys. ONE hash tag per deployment, ``{<prefix>}``, on every key: a reserve counts the
# client (in the clients day map, shared by all providers) atomically with the key (in the
# provider's day map) in one script, and a script may only touch keys of one Cluster slot.
# Per-provider tags would put the clients map in another slot. So the whole deployment is
# one slot: correct on Redis Cluster (redis+cluster://, tested against a real one), just not
# spread over its shards (this load is small); every key a script touches is passed in KEYS.
# Provider maps sit under ``p:<provider>``; provider names cannot hold ':', so no
# provider (not even one named "clients" or "task") can collide with the other keys.
#   {prefix}:p:<provider>:day:<day>    a provider's day map (fields below)
#   {prefix}:p:<provider>:disabled     key name -> "fingerprint|reason"
#   {prefix}:clients:day:<day>         the clients day map (fields below)
#   {prefix}:p:<provider>:epoch        bumped by every change that can free a key (reserve.lua)
#   {prefix}:p:<provider>:pool:<day>   the pool's limit and calls left, for the fair share
#   {prefix}:p:<provider>:ix:<day>:<keyset>:<model>    available keys for a model (a sorted set)
#   {prefix}:p:<provider>:cool:<day>:<keyset>:<model>  cooling keys, by the end of the cooldown
#   {prefix}:keyset:<keyset>           one key set's names, fingerprints and limits, by position
#   {prefix}:task:<task_id>            which provider/key created an asynchronous task
#   {prefix}:replicas                  replica id -> last heartbeat (Redis time, Unix ms)
#   {prefix}:writeback:<token>         a local spending batch already written back (fail_open)
#   {prefix}:usage:<day>               tokens and cost of a day (router/quota/spending.py)
#   {prefix}:usage-batch:<token>       a batch of usage already added (so it applies once)
#   {prefix}:rates                     per-minute windows (router/quota/rates.py): client rpm
#                                      and tpm, key rpm

# Provider day map fields: per key (and model) ...
USED = "u"
MODEL_USED = "m"
EXHAUSTED = "x"
COOLING = "c"
AMBIGUOUS = "a"
CURSOR_FIELD = "rr"
# ... and, on free providers, the fair share: the pool's remaining when it first ran low
# (set once a day) and each client's calls on the provider since then.
SHARE_OUT_FIELD = "fs"
FAIR_USED = "fu"
# Clients day map fields: calls today on every provider, of which on free providers, and
# when the client was last counted (Unix ms; "active" clients in the fair share).
CLIENT_USED = "t"
CLIENT_FREE_USED = "f"
CLIENT_SEEN = "s"
# Money and tokens (written by record_usage, read by reserve for budgets): the provider's
# cost today (day map), each client's tokens and cost today (clients day map), in nanos.
COST_FIELD = "$"
CLIENT_TOKENS = "tk"
CLIENT_COST = "$"
# Rates hash fields: a client's requests and tokens per minute, a key's calls per minute.
RATE_CLIENT_RPM = "r"
RATE_CLIENT_TPM = "t"
RATE_KEY_RPM = "k"
SEP = "|"  # never part of a key, model or client name


def _tag(prefix: str) -> str:
    return f"{{{prefix}}}"


def day_key(prefix: str, provider: str, day: str) -> str:
    """Redis key of a provider's day map."""
    return f"{_tag(prefix)}:p:{provider}:day:{day}"


def disabled_key(prefix: str, provider: str) -> str:
    """Redis key of a provider's disabled map."""
    return f"{_tag(prefix)}:p:{provider}:disabled"


def clients_key(prefix: str, day: str) -> str:
    """Redis key of the clients day map (every provider's calls of the day, per client)."""
    return f"{_tag(prefix)}:clients:day:{day}"


def epoch_key(prefix: str, provider: str) -> str:
    """Redis key of a provider's epoch: a change that can free a key bumps it (reserve.lua)."""
    return f"{_tag(prefix)}:p:{provider}:epoch"


def pool_key(prefix: str, provider: str, day: str) -> str:
    """Redis key of a provider's pool totals of a day (limit, calls left), for the fair share."""
    return f"{_tag(prefix)}:p:{provider}:pool:{day}"


def index_key(prefix: str, provider: str, day: str, keyset: str, model: str) -> str:
    """Redis key of the sorted set of a key set's keys available for ``model`` today."""
    return f"{_tag(prefix)}:p:{provider}:ix:{day}:{keyset}:{model}"


def cooling_index_key(prefix: str, provider: str, day: str, keyset: str, model: str) -> str:
    """Redis key of the sorted set of a key set's keys cooling for ``model``, by cooldown end."""
    return f"{_tag(prefix)}:p:{provider}:cool:{day}:{keyset}:{model}"


def keyset_key(prefix: str, keyset: str) -> str:
    """Redis key of a key set: position -> "name|fingerprint|daily_limit|model_limit"."""
    return f"{_tag(prefix)}:keyset:{keyset}"


def task_key(prefix: str, task_id: str) -> str:
    """Redis key remembering an asynchronous task."""
    return f"{_tag(prefix)}:task:{task_id}"


def replicas_key(prefix: str) -> str:
    """Redis key of the replicas' heartbeats (fail_open counts the live gateways)."""
    return f"{_tag(prefix)}:replicas"


def writeback_key(prefix: str, token: str) -> str:
    """Redis key marking one written-back batch of local spending (so it applies once)."""
    return f"{_tag(prefix)}:writeback:{token}"


def usage_key(prefix: str, day: str) -> str:
    """Redis key of a day's tokens and cost, per client, provider, key and model."""
    return f"{_tag(prefix)}:usage:{day}"


def usage_batch_key(prefix: str, token: str) -> str:
    """Redis key marking one batch of usage already added (a retried batch adds nothing)."""
    return f"{_tag(prefix)}:usage-batch:{token}"


def rates_key(prefix: str) -> str:
    """Redis key of the per-minute windows (not per day: a minute spans a reset)."""
    return f"{_tag(prefix)}:rates"


def client_tokens_field(client: str) -> str:
    return f"{CLIENT_TOKENS}{SEP}{client}"


def client_cost_field(client: str) -> str:
    return f"{CLIENT_COST}{SEP}{client}"


def client_rpm_field(client: str) -> str:
    return f"{RATE_CLIENT_RPM}{SEP}{client}"


def client_tpm_field(client: str) -> str:
    return f"{RATE_CLIENT_TPM}{SEP}{client}"


def key_rpm_field(provider: str, key: str) -> str:
    return f"{RATE_KEY_RPM}{SEP}{provider}{SEP}{key}"


def fair_used_field(client: str) -> str:
    return f"{FAIR_USED}{SEP}{client}"


def client_used_field(client: str) -> str:
    return f"{CLIENT_USED}{SEP}{client}"


def client_free_used_field(client: str) -> str:
    return f"{CLIENT_FREE_USED}{SEP}{client}"


def client_seen_field(client: str) -> str:
    return f"{CLIENT_SEEN}{SEP}{client}"


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
