"""The configuration: a YAML file, ``${VAR}`` expansion, ``ROUTER_*`` environment overrides.

Every default lives in these models. Errors name the file, the field path
(``providers[0].keys[1].secret``) and what is wrong; secrets are ``SecretStr`` and never printed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from router.classify import ProviderType
from router.quota.types import Strategy
from router.quota.urls import split_scheme, store_url_problem

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
DEFAULT_STORE_URL = "sqlite:///modelscope-router.sqlite3"
MODELSCOPE_DAILY_LIMIT = 2000
MODELSCOPE_MODEL_DAILY_LIMIT = 500
# Numbers are finite (allow_inf_nan=False on every model) and never negative. A limit is at
# most a billion calls a day (omit it for no cap): sums of limits stay exact in Lua's doubles.
MAX_DAILY_LIMIT = 10**9
MAX_SHARE = 1e6  # fair-share weights are relative; a bound keeps their sum finite
MAX_ACTIVE_WINDOW_SECONDS = 86_400  # a quota day: the clients day map lives no longer
DailyLimit = Annotated[int, Field(ge=0, le=MAX_DAILY_LIMIT)]
# Per-minute limits: a window holds 61 per-second counts whatever the limit (quota/rates.py).
MAX_PER_MINUTE = 10**9
PerMinute = Annotated[int, Field(ge=1, le=MAX_PER_MINUTE)]
# Money: prices per million tokens and daily budgets, counted in nanos of the currency
# (router.pricing). A million currency units a day keeps the sums exact in Lua's doubles.
MAX_BUDGET = 1e6
MAX_PRICE = 1e6
Budget = Annotated[float, Field(ge=0, le=MAX_BUDGET)]
RESET_TIME_HINT = 'write it as a quoted string, "HH:MM" (YAML reads unquoted 25:00 as a number)'
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is the message for the operator."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    # A non-stream upstream answer larger than this is not read: the client gets a 502.
    max_upstream_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    workers: int = Field(1, ge=1, le=64)  # processes sharing the port (SO_REUSEPORT)
    shutdown_grace_seconds: float = Field(30, ge=0)  # for requests in flight at SIGTERM
    drain_seconds: float = Field(1, ge=0)  # at SIGTERM: not ready (503) this long, then close
    # The path prefix a reverse proxy serves the gateway under ("/team-router"; "" for none).
    # The proxy strips it; the web page shows it in the base URL to paste into a client.
    root_path: str = ""

    @field_validator("root_path")
    @classmethod
    def _a_path_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*", value) or "/." in value:
            raise ValueError(
                "a path prefix such as '/team-router': it starts with '/', does not end with "
                "one, and holds only letters, digits and . _ ~ - (no dot segment)"
            )
        return value


class StoreSettings(_Model):
    url: str = DEFAULT_STORE_URL
    prefix: str = Field("modelscope-router", pattern=NAME_PATTERN)
    # What a Redis store does while Redis cannot be reached (other stores are local).
    # fail_closed (default): every proxied request gets 503 store_unavailable until Redis is
    # back. Exact daily quotas are the product's promise, and a replica that cannot reach the
    # shared counts cannot know what the other replicas spent.
    # fail_open: keep serving from a local allowance, at most what was left at the last
    # answer divided by the live replicas, and write it back to Redis when it returns
    # (router/quota/resilient_store.py). Availability first; exact only if every replica
    # lost Redis at the same time.
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"

    @field_validator("url")
    @classmethod
    def _opens_a_store(cls, url: str) -> str:
        """The schemes router.quota.factory opens; the scheme in lower case."""
        problem = store_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        scheme, rest = split_scheme(url)
        return f"{scheme}://{rest}"


class QuotaSettings(_Model):
    timezone: str = "Asia/Shanghai"
    reset_time: time = time(0, 0)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("reset_time", mode="before")
    @classmethod
    def _hh_mm(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 12:00:00 as the int 43200 and 25:00 as 1500: only a
        # string is what the operator wrote.
        if isinstance(value, time):
            return value
        if not isinstance(value, str) or not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError(RESET_TIME_HINT)
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class KeyConfig(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    secret: SecretStr | None = None
    secret_file: Path | None = None
    daily_limit: DailyLimit | None = None
    model_daily_limit: DailyLimit | None = None
    rpm: PerMinute | None = None  # calls per minute on this key (default: the provider's rpm)

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of 'secret' or 'secret_file'")
        if self.secret is not None and not self.secret.get_secret_value().strip():
            raise ValueError("'secret' is empty")
        return self

    def resolved_secret(self) -> str:
        if self.secret is not None:
            return self.secret.get_secret_value().strip()
        assert self.secret_file is not None
        return self.secret_file.read_text(encoding="utf-8").strip()


class Price(_Model):
    """Prices per million tokens, in the provider's currency."""

    input: float = Field(ge=0, le=MAX_PRICE)
    output: float = Field(ge=0, le=MAX_PRICE)
    # Anthropic's cache reads and writes, counted apart from input_tokens (default: input).
    cache_read: float | None = Field(None, ge=0, le=MAX_PRICE)
    cache_write: float | None = Field(None, ge=0, le=MAX_PRICE)


class ProviderConfig(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    type: ProviderType
    base_url: str = Field(pattern=r"^https?://[^\s]+$")
    daily_limit: DailyLimit | None = None
    model_daily_limit: DailyLimit | None = None
    model_limits: dict[str, DailyLimit] = Field(default_factory=dict)
    strategy: Strategy = Strategy.MOST_REMAINING
    timeout_seconds: float = Field(120, gt=0)
    connect_timeout_seconds: float = Field(5, gt=0)
    models: list[str] | None = None  # a fixed list instead of asking the upstream's /models
    paid: bool | None = None  # default: Bailian and generic OpenAI-compatible are paid
    anthropic_base_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    passthrough: list[str] = Field(default_factory=list)  # other /v1 paths it serves
    # Money (paid providers only): prices per million tokens by model id or glob pattern
    # (an exact id first, then the patterns in order), and a budget per quota day.
    currency: str = Field("CNY", pattern=r"^[A-Z]{3}$")
    prices: dict[str, Price] = Field(default_factory=dict)
    daily_budget: Budget | None = None
    rpm: PerMinute | None = None  # calls per minute per key, unless a key says otherwise
    keys: list[KeyConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_keys(self) -> Self:
        _require_unique([k.name for k in self.keys], "key name")
        return self

    @model_validator(mode="after")
    def _money_on_paid_only(self) -> Self:
        if not self.is_paid and (self.prices or self.daily_budget is not None):
            field = "prices" if self.prices else "daily_budget"
            raise ValueError(
                f"{field}: the provider {self.name!r} is free (its calls cost nothing); "
                "prices and budgets are for paid providers (set paid: true if it bills)"
            )
        return self

    @property
    def is_priced(self) -> bool:
        """Whether its calls can cost money (client budgets apply on it)."""
        return self.is_paid and bool(self.prices)

    def key_rpm(self, key: KeyConfig) -> int | None:
        return key.rpm if key.rpm is not None else self.rpm

    @field_validator("passthrough")
    @classmethod
    def _safe_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not re.fullmatch(r"[a-z0-9_-]+(/[a-z0-9_-]+)*", path):
                raise ValueError(f"{path!r}: a path below /v1 such as 'audio/speech'")
        return paths

    @property
    def anthropic_base(self) -> str | None:
        """Where ``/v1/messages`` lives: given, or ModelScope's base without ``/v1``."""
        if self.anthropic_base_url is not None:
            return self.anthropic_base_url.rstrip("/")
        if self.type is ProviderType.MODELSCOPE:
            return self.base_url.rstrip("/").removesuffix("/v1")
        return None

    @property
    def is_paid(self) -> bool:
        if self.paid is not None:
            return self.paid
        return self.type is not ProviderType.MODELSCOPE

    def key_daily_limit(self, key: KeyConfig) -> int | None:
        if key.daily_limit is not None:
            return key.daily_limit
        if self.daily_limit is not None:
            return self.daily_limit
        return MODELSCOPE_DAILY_LIMIT if self.type is ProviderType.MODELSCOPE else None

    def key_model_limit(self, key: KeyConfig, model: str) -> int | None:
        if model in self.model_limits:
            return self.model_limits[model]
        return self.default_model_limit(key)

    def default_model_limit(self, key: KeyConfig) -> int | None:
        if key.model_daily_limit is not None:
            return key.model_daily_limit
        if self.model_daily_limit is not None:
            return self.model_daily_limit
        return MODELSCOPE_MODEL_DAILY_LIMIT if self.type is ProviderType.MODELSCOPE else None


class RouteConfig(_Model):
    provider: str
    model: str = Field(min_length=1)


class ModelAlias(_Model):
    id: str = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)


def secret_digest(text: str) -> bytes:
    """SHA-256 of a key as sent or configured; keys are only ever compared as these digests.

    surrogateescape: a header with invalid UTF-8 is still a (wrong) key, never an error.
    """
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _digest_of(key: SecretStr | None, key_sha256: str | None) -> bytes:
    if key_sha256 is not None:
        return bytes.fromhex(key_sha256)
    assert key is not None
    return secret_digest(key.get_secret_value())


class _KeyHolder(_Model):
    """Something that authenticates with a key, given plainly or as its SHA-256 (hex)."""

    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' or 'key_sha256'")
        if self.key is not None and not self.key.get_secret_value().strip():
            raise ValueError("'key' is empty")
        return self

    def key_digest(self) -> bytes:
        return _digest_of(self.key, self.key_sha256)


class ClientConfig(_KeyHolder):
    name: str = Field(pattern=NAME_PATTERN)
    daily_limit: DailyLimit | None = None  # calls per quota day, every provider together
    share: float = Field(1.0, gt=0, le=MAX_SHARE)  # weight in the fair share of the free pool
    models: list[str] | None = None  # allowed model ids or aliases (glob patterns); None = all
    fallback: bool = True  # may spill to paid providers
    rpm: PerMinute | None = None  # requests per minute (any 60 s)
    tpm: PerMinute | None = None  # tokens per minute (any 60 s), checked before each request
    daily_tokens: Annotated[int, Field(ge=0, le=10**15)] | None = None  # every provider
    daily_budget: Budget | None = None  # money per quota day on paid providers


class FairShareSettings(_Model):
    below: float = Field(0.3, ge=0, le=1)  # share out once less than this of a free pool remains
    count: Literal["configured", "active"] = "configured"  # which clients get a part
    # "active": seen this recently
    active_window_seconds: float = Field(3600, gt=0, le=MAX_ACTIVE_WINDOW_SECONDS)


class AdminSettings(_Model):
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    def key_digest(self) -> bytes | None:
        if self.key is None and self.key_sha256 is None:
            return None
        return _digest_of(self.key, self.key_sha256)


class MetricsSettings(_Model):
    token: SecretStr | None = None  # when set, GET /metrics needs "Authorization: Bearer <token>"
    refresh_seconds: float = Field(15, gt=0)  # how often quota gauges are read from the store

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value


class UsageSettings(_Model):
    # Read the tokens of every answer, count them and their cost per quota day in the store
    # (router.ledger). Off: calls are counted, tokens and money are not (no budgets, tpm or
    # daily_tokens then), and streams go upstream exactly as the client sent them.
    record: bool = True
    # How long answers gather before one store write (a budget check writes at once).
    flush_seconds: float = Field(0.2, ge=0, le=10)


class RetrySettings(_Model):
    max_attempts: int = Field(4, ge=1, le=50)
    deadline_seconds: float = Field(300, gt=0)


class Settings(BaseSettings):
    """The whole configuration. Server and store may be overridden by ROUTER_SERVER__PORT etc."""

    model_config = SettingsConfigDict(
        env_prefix="ROUTER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    quota: QuotaSettings = QuotaSettings()
    providers: list[ProviderConfig] = Field(min_length=1)
    models: list[ModelAlias] = Field(default_factory=list)
    clients: list[ClientConfig] = Field(default_factory=list)
    retry: RetrySettings = RetrySettings()
    usage: UsageSettings = UsageSettings()
    metrics: MetricsSettings = MetricsSettings()
    fair_share: FairShareSettings = FairShareSettings()
    admin: AdminSettings = AdminSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: an operator's ROUTER_SERVER__PORT beats the file.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _workers_share_a_store(self) -> Self:
        if self.server.workers > 1 and split_scheme(self.store.url)[0] == "memory":
            raise ValueError(
                "server.workers: several workers need a shared store (sqlite or redis), "
                "not memory://, or each would count its own quota"
            )
        return self

    @model_validator(mode="after")
    def _cross_references(self) -> Self:
        _require_unique([p.name for p in self.providers], "provider name")
        _require_unique([m.id for m in self.models], "model id")
        _require_unique([c.name for c in self.clients], "client name")
        declared = {p.name for p in self.providers}
        for i, alias in enumerate(self.models):
            for j, route in enumerate(alias.routes):
                if route.provider not in declared:
                    raise ValueError(
                        f"models[{i}].routes[{j}].provider: provider {route.provider!r} "
                        f"is not declared (declared: {', '.join(sorted(declared))})"
                    )
        return self

    @model_validator(mode="after")
    def _one_currency_for_client_budgets(self) -> Self:
        """A client's daily_budget adds up the cost on every paid provider: one currency."""
        budgets = [i for i, c in enumerate(self.clients) if c.daily_budget is not None]
        currencies = sorted({p.currency for p in self.providers if p.is_paid})
        if budgets and len(currencies) > 1:
            raise ValueError(
                f"clients[{budgets[0]}].daily_budget: the paid providers bill in several "
                f"currencies ({', '.join(currencies)}); a client budget needs them all in one"
            )
        return self

    @model_validator(mode="after")
    def _token_limits_need_usage(self) -> Self:
        if self.usage.record:
            return self
        for i, p in enumerate(self.providers):
            if p.daily_budget is not None:
                raise ValueError(f"providers[{i}].daily_budget: needs usage.record: true")
        for i, c in enumerate(self.clients):
            for name in ("daily_budget", "daily_tokens", "tpm"):
                if getattr(c, name) is not None:
                    raise ValueError(f"clients[{i}].{name}: needs usage.record: true")
        return self

    @property
    def budget_currency(self) -> str:
        """The currency client budgets are in: the paid providers' (CNY when there is none)."""
        return next((p.currency for p in self.providers if p.is_paid), "CNY")

    @model_validator(mode="after")
    def _one_use_per_secret(self) -> Self:
        """The admin key, the metrics token and the client keys keep their planes apart; two
        upstream keys with one secret are one account, whose quota would be counted twice."""
        seen: dict[bytes, str] = {}
        for path, digest in self._secret_digests():
            first = seen.get(digest)
            if first is not None:
                why = (
                    "one account's quota would be counted twice"
                    if first.startswith("providers") and path.startswith("providers")
                    else "admin key, metrics token, client and upstream keys must all differ"
                )
                raise ValueError(f"{path}: the same secret as {first}; {why}")
            seen[digest] = path
        return self

    def _secret_digests(self) -> Iterator[tuple[str, bytes]]:
        """(field path, SHA-256) of every secret in the configuration."""
        admin = self.admin.key_digest()
        if admin is not None:
            yield ("admin.key" if self.admin.key is not None else "admin.key_sha256"), admin
        if self.metrics.token is not None:
            yield "metrics.token", secret_digest(self.metrics.token.get_secret_value())
        for i, client in enumerate(self.clients):
            field = "key" if client.key is not None else "key_sha256"
            yield f"clients[{i}].{field}", client.key_digest()
        for p, provider in enumerate(self.providers):
            for k, key in enumerate(provider.keys):
                field = "secret" if key.secret is not None else "secret_file"
                try:
                    secret = key.resolved_secret()
                except (OSError, ValueError):  # load_settings names an unreadable file
                    continue
                if secret:
                    yield f"providers[{p}].keys[{k}].{field}", secret_digest(secret)

    def provider(self, name: str) -> ProviderConfig:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)


def _require_unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


def expand_env(tree: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(tree, dict):
        return {k: expand_env(v, env, _join(path, str(k))) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")

        return _VAR.sub(substitute, tree)
    return tree


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('providers', 0, 'keys', 1, 'secret') -> 'providers[0].keys[1].secret'."""
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = format_loc(tuple(p for p in err["loc"] if not str(p).startswith("function-")))
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {message}" if loc else message)
    return "\n".join(lines)


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, expand and validate a config file; raise ConfigError naming the file and field."""
    source = Path(path)
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        # from None: PyYAML's own text quotes the offending line, which may hold a secret.
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict) or not all(isinstance(name, str) for name in raw):
        raise ConfigError(f"{source}: the top level must be a mapping of section names")
    try:
        data = expand_env(raw, env)
        settings = Settings(**data)
        for p_index, provider in enumerate(settings.providers):
            for k_index, key in enumerate(provider.keys):
                _check_secret_file(key, f"providers[{p_index}].keys[{k_index}].secret_file")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration\n{_describe(exc)}") from None
    return settings


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's snippet of the line: a line such as ``secret: ...``
    with a typo put the secret in check-config's output, the admin reload answer and the log
    (tests/test_canary.py)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)  # a ReaderError names a character code and a position, no content
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + "; ".join(part for part in (exc.context, exc.problem) if part)


def _check_secret_file(key: KeyConfig, path: str) -> None:
    if key.secret_file is None:
        return
    try:
        if not key.resolved_secret():
            raise ConfigError(f"{path}: {key.secret_file} is empty")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {key.secret_file}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its text would quote a byte of the secret
        raise ConfigError(f"{path}: {key.secret_file} is not UTF-8 text") from None


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret: disabling a key only holds for this secret."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]
