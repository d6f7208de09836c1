"""Configuration of the upstream simulator (ModelScope and Bailian stand-ins).

Loadable from YAML::

    modelscope:
      tokens:
        - {secret: ms-demo-alice, name: alice, daily_limit: 3, model_daily_limit: 3}
        - {secret: ms-bad, name: bad, status: unbound}
      models: [Qwen/Qwen3-32B]
      retired_models: [Qwen/QwQ-32B-Preview]
    bailian:
      keys:
        - {secret: sk-demo-bailian, name: bailian, daily_limit: 5}
      free_tier_only: false
    latency_ms: 0
    stream_chunks: 5
    stream_chunk_delay_ms: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODELSCOPE_MODELS: tuple[str, ...] = (
    "Qwen/Qwen3-32B",
    "Qwen/Qwen3-235B-A22B-Instruct-2507",
    "deepseek-ai/DeepSeek-V3.1",
    "deepseek-ai/DeepSeek-R1-0528",
    "Qwen/Qwen3-Embedding-8B",
    "moonshotai/Kimi-K2-Instruct",
    "Qwen/Qwen-Image",
)
DEFAULT_RETIRED_MODELS: tuple[str, ...] = ("Qwen/QwQ-32B-Preview",)
DEFAULT_BAILIAN_MODELS: tuple[str, ...] = (
    "qwen3-32b",
    "qwen3-235b-a22b-instruct-2507",
    "deepseek-v3.1",
    "deepseek-r1",
    "text-embedding-v4",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelScopeToken(_Strict):
    """One simulated ModelScope access token (one account)."""

    secret: str = Field(min_length=1)
    name: str = ""  # filled with "token-<i>" when empty
    daily_limit: int = Field(default=2000, ge=0)
    model_daily_limit: int = Field(default=500, ge=0)
    model_limits: dict[str, int] = Field(default_factory=dict)
    status: Literal["ok", "unbound", "unverified"] = "ok"

    def limit_for(self, model: str) -> int:
        return self.model_limits.get(model, self.model_daily_limit)


class BailianKey(_Strict):
    """One simulated Bailian (DashScope) API key."""

    secret: str = Field(min_length=1)
    name: str = ""  # filled with "key-<i>" when empty
    daily_limit: int | None = Field(default=None, ge=0)
    status: Literal["ok", "arrears", "invalid"] = "ok"


class ModelScopeConfig(_Strict):
    tokens: list[ModelScopeToken] = Field(default_factory=list)
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELSCOPE_MODELS))
    retired_models: list[str] = Field(default_factory=lambda: list(DEFAULT_RETIRED_MODELS))
    ratelimit_headers: bool = True
    # More than this many requests in flight on one token -> the "rate limit you" 429.
    throttle_concurrency: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _names(self) -> ModelScopeConfig:
        for i, tok in enumerate(self.tokens):
            if not tok.name:
                tok.name = f"token-{i}"
        _unique("modelscope token", [t.name for t in self.tokens], [t.secret for t in self.tokens])
        return self


class BailianConfig(_Strict):
    keys: list[BailianKey] = Field(default_factory=list)
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_BAILIAN_MODELS))
    # Over daily_limit: 403 AllocationQuota.FreeTierOnly if true,
    # else 429 Throttling.AllocationQuota.
    free_tier_only: bool = False

    @model_validator(mode="after")
    def _names(self) -> BailianConfig:
        for i, key in enumerate(self.keys):
            if not key.name:
                key.name = f"key-{i}"
        _unique("bailian key", [k.name for k in self.keys], [k.secret for k in self.keys])
        return self


class SimulatorConfig(_Strict):
    modelscope: ModelScopeConfig = Field(default_factory=ModelScopeConfig)
    bailian: BailianConfig = Field(default_factory=BailianConfig)
    latency_ms: int = Field(default=0, ge=0)
    stream_chunks: int = Field(default=5, ge=1)
    stream_chunk_delay_ms: int = Field(default=0, ge=0)


def _unique(what: str, names: list[str], secrets: list[str]) -> None:
    for label, values in (("name", names), ("secret", secrets)):
        seen: set[str] = set()
        for value in values:
            if value in seen:
                raise ValueError(f"duplicate {what} {label}: {value!r}")
            seen.add(value)


def load_simulator_config(path: str | Path) -> SimulatorConfig:
    """Read a SimulatorConfig from a YAML file (an empty file gives the defaults)."""
    raw: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the simulator config must be a mapping")
    return SimulatorConfig.model_validate(raw)


def default_simulator_config() -> SimulatorConfig:
    """A small demo setup: three ModelScope tokens with 3 calls a day, one Bailian key with 5."""
    tokens = [
        ModelScopeToken(secret=f"ms-demo-{n}", name=n, daily_limit=3, model_daily_limit=3)
        for n in ("alice", "bob", "carol")
    ]
    keys = [BailianKey(secret="sk-demo-bailian", name="bailian", daily_limit=5)]
    return SimulatorConfig(
        modelscope=ModelScopeConfig(tokens=tokens),
        bailian=BailianConfig(keys=keys),
    )
