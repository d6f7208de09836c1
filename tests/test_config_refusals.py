"""Configurations the gateway refuses (issue #11), and how a store URL is shown.

Every refusal names the file and the field path, and never quotes a secret.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import MAX_DAILY_LIMIT, ConfigError, Settings, load_settings
from router.quota.factory import open_store
from router.quota.redis_store import RedisStore
from router.quota.store import StoreError
from router.quota.urls import STORE_SCHEMES, mask_url
from router.report import paid_only_warnings

ROOT = Path(__file__).parent.parent


def base() -> dict[str, Any]:
    """A valid configuration with every kind of secret, each a distinct CANARY."""
    return {
        "providers": [
            {
                "name": "modelscope",
                "type": "modelscope",
                "base_url": "http://127.0.0.1:1/v1",
                "keys": [
                    {"name": "a", "secret": "CANARY-ms-a"},
                    {"name": "b", "secret": "CANARY-ms-b"},
                ],
            },
            {
                "name": "bailian",
                "type": "bailian",
                "base_url": "http://127.0.0.1:2/v1",
                "keys": [{"name": "main", "secret": "CANARY-bailian"}],
            },
        ],
        "clients": [
            {"name": "team", "key": "CANARY-team"},
            {"name": "bots", "key": "CANARY-bots"},
        ],
        "admin": {"key": "CANARY-admin"},
        "metrics": {"token": "CANARY-metrics"},
    }


def put(tree: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """Set ``providers.0.model_limits`` (dots; numbers index lists), creating mappings."""
    *parents, last = path.split(".")
    node: Any = tree
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return tree


def load(tmp_path: Path, tree: dict[str, Any]) -> Settings:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return load_settings(path, env={})


def refusal(tmp_path: Path, tree: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, tree)
    message = str(info.value)
    assert "router.yaml" in message
    assert "CANARY" not in message, message
    return message


@pytest.fixture(autouse=True)
def _no_router_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTER_* variables override the file: none from the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("ROUTER_"):
            monkeypatch.delenv(name)


def test_the_base_configuration_is_valid(tmp_path: Path) -> None:
    load(tmp_path, base())


# --- 1. planes stay apart -----------------------------------------------------------------------


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("admin.key", "CANARY-metrics", ("admin.key", "metrics.token")),
        ("metrics.token", "CANARY-admin", ("admin.key", "metrics.token")),
        ("admin", {"key_sha256": sha("CANARY-metrics")}, ("admin.key_sha256", "metrics.token")),
        ("admin.key", "CANARY-bots", ("admin.key", "clients[1].key")),
        ("clients.1", {"name": "bots", "key_sha256": sha("CANARY-admin")}, ("admin.key",)),
        ("clients.1.key", "CANARY-team", ("clients[0].key", "clients[1].key")),
        ("clients.1", {"name": "bots", "key_sha256": sha("CANARY-team")}, ("clients[0].key",)),
        # Two upstream keys with one secret are one account: its quota would count twice.
        ("providers.0.keys.1.secret", "CANARY-ms-a", ("providers[0].keys[1].secret",)),
        ("providers.1.keys.0.secret", "CANARY-ms-b", ("providers[1].keys[0].secret",)),
        ("providers.1.keys.0.secret", "CANARY-team", ("providers[1].keys[0].secret",)),
    ],
)
def test_one_secret_has_one_use(
    tmp_path: Path, path: str, value: object, named: tuple[str, ...]
) -> None:
    message = refusal(tmp_path, put(base(), path, value))
    for field in named:
        assert field in message


def test_a_secret_file_counts_as_its_secret(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("CANARY-ms-a\n")
    tree = put(base(), "providers.1.keys.0", {"name": "main", "secret_file": str(secret)})
    message = refusal(tmp_path, tree)
    assert "providers[1].keys[0].secret_file: the same secret as providers[0].keys[0]" in message
    assert "counted twice" in message


# --- 3. numbers: finite, never negative -----------------------------------------------------------

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("providers.0.model_limits", {"X": -1}, "providers[0].model_limits.X"),
        ("providers.0.model_limits", {"X": INF}, "providers[0].model_limits.X"),
        ("providers.0.model_limits", {"X": MAX_DAILY_LIMIT + 1}, "providers[0].model_limits.X"),
        ("providers.0.daily_limit", -1, "providers[0].daily_limit"),
        ("providers.0.model_daily_limit", INF, "providers[0].model_daily_limit"),
        ("providers.0.keys.0.daily_limit", MAX_DAILY_LIMIT + 1, "providers[0].keys[0].daily_limit"),
        ("providers.0.keys.0.model_daily_limit", -1, "providers[0].keys[0].model_daily_limit"),
        ("providers.0.timeout_seconds", NAN, "providers[0].timeout_seconds"),
        ("providers.0.connect_timeout_seconds", INF, "providers[0].connect_timeout_seconds"),
        ("clients.0.daily_limit", -1, "clients[0].daily_limit"),
        ("clients.0.share", INF, "clients[0].share"),
        ("clients.0.share", NAN, "clients[0].share"),
        ("clients.0.share", 0, "clients[0].share"),
        ("clients.0.share", 1e300, "clients[0].share"),
        ("fair_share.active_window_seconds", INF, "fair_share.active_window_seconds"),
        ("fair_share.active_window_seconds", 1e306, "fair_share.active_window_seconds"),
        ("fair_share.below", NAN, "fair_share.below"),
        ("server.shutdown_grace_seconds", INF, "server.shutdown_grace_seconds"),
        ("server.drain_seconds", NAN, "server.drain_seconds"),
        ("server.drain_seconds", -1, "server.drain_seconds"),
        ("server.max_body_bytes", -1, "server.max_body_bytes"),
        ("server.port", INF, "server.port"),
        ("metrics.refresh_seconds", INF, "metrics.refresh_seconds"),
        ("retry.deadline_seconds", NAN, "retry.deadline_seconds"),
        ("retry.max_attempts", 0, "retry.max_attempts"),
    ],
)
def test_numbers_are_finite_and_not_negative(
    tmp_path: Path, path: str, value: object, field: str
) -> None:
    assert re.search(rf"^{re.escape(field)}: ", refusal(tmp_path, put(base(), path, value)), re.M)


def test_the_edges_of_every_number_are_accepted(tmp_path: Path) -> None:
    tree = base()
    for path, value in [
        ("providers.0.model_limits", {"X": 0, "Y": MAX_DAILY_LIMIT}),
        ("providers.0.daily_limit", 0),
        ("providers.0.keys.0.daily_limit", MAX_DAILY_LIMIT),
        ("clients.0.share", 1e-9),
        ("clients.1.share", 1e6),
        ("clients.0.daily_limit", 0),
        ("fair_share.below", 0),
        ("fair_share.active_window_seconds", 86_400),
        ("server.drain_seconds", 0),
        ("server.shutdown_grace_seconds", 0),
    ]:
        put(tree, path, value)
    settings = load(tmp_path, tree)
    assert settings.providers[0].model_limits == {"X": 0, "Y": MAX_DAILY_LIMIT}


# --- 3. quota.reset_time: a quoted "HH:MM" -------------------------------------------------------

RESET_TIME_CONFIG = """
providers:
  - name: modelscope
    type: modelscope
    base_url: http://127.0.0.1:1/v1
    keys: [{name: a, secret: s}]
quota: {reset_time: %s}
"""


@pytest.mark.parametrize(
    "written",
    ["12:00:00", "25:00", "12:00", "8", '"25:00"', '"12:60"', '"24:00"', '"7:30"', '"07:30:00"'],
)
def test_reset_time_must_be_a_quoted_hh_mm(tmp_path: Path, written: str) -> None:
    """YAML 1.1 reads an unquoted 12:00:00 as 43200, 25:00 as 1500 and 12:00 as 720."""
    path = tmp_path / "router.yaml"
    path.write_text(RESET_TIME_CONFIG % written, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert 'quota.reset_time: write it as a quoted string, "HH:MM"' in str(info.value)


@pytest.mark.parametrize("written", ['"00:00"', "'07:30'", '"23:59"', "00:00"])
def test_quoted_reset_times_are_accepted(tmp_path: Path, written: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(RESET_TIME_CONFIG % written, encoding="utf-8")
    reset = load_settings(path, env={}).quota.reset_time  # PyYAML: 00:00 is a string
    assert reset.strftime("%H:%M") == written.strip("'\"")


def test_shipped_configs_are_valid(tmp_path: Path) -> None:
    """Every config/*.yaml, with a distinct value for each ${VAR} and its secret files."""
    secret = tmp_path / "secret"
    secret.write_text("a-secret-from-a-file")
    for config in sorted((ROOT / "config").glob("*.yaml")):
        text = re.sub(r"(secret_file:\s*)[^,}\s]+", rf"\g<1>{secret}", config.read_text())
        names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
        copy = tmp_path / config.name
        copy.write_text(text)
        load_settings(copy, env={name: f"value-of-{name}" for name in names})


# --- 3. the store URL ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgres://CANARY-user:CANARY-pw@db/quota",
        "POSTGRES://db/quota",
        "redis+sentinel://h:26379",  # no service name
        "rediss+sentinel://h:26379",
        "redis+cluster://h:6379/1",  # Cluster has db 0 only
        "localhost:6379",
        "sqlite://relative.db",
        "redis://:CANARY/pw@h:6379/0",  # an unencoded / in a password: the port is "CANARY"
        "",
    ],
)
def test_unsupported_store_urls_are_refused(tmp_path: Path, url: str) -> None:
    message = refusal(tmp_path, put(base(), "store.url", url))
    assert "store.url: " in message
    with pytest.raises(ValueError, match="quota store URL") as info:  # the same rule in serve
        open_store(url)
    assert "CANARY" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("REDIS://:pw@h:6379/0", "redis://:pw@h:6379/0"),
        ("Rediss://h:6380/0", "rediss://h:6380/0"),
        ("UNIX:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("SQLite:///quota.db", "sqlite:///quota.db"),
        ("Memory://", "memory://"),
    ],
)
def test_store_schemes_are_case_insensitive(tmp_path: Path, url: str, stored: str) -> None:
    assert load(tmp_path, put(base(), "store.url", url)).store.url == stored


async def test_every_scheme_the_config_accepts_opens_a_store(tmp_path: Path) -> None:
    urls = {
        "redis": "REDIS://127.0.0.1:1/0",
        "rediss": "rediss://127.0.0.1:1/0",
        "unix": "unix:///tmp/no.sock",
        "redis+cluster": "REDIS+CLUSTER://127.0.0.1:1,127.0.0.1:2",
        "rediss+cluster": "rediss+cluster://127.0.0.1:1",
        "redis+sentinel": "redis+sentinel://127.0.0.1:1/mymaster",
        "rediss+sentinel": "rediss+sentinel://127.0.0.1:1/mymaster/2",
        "sqlite": f"SQLITE:///{tmp_path}/quota.db",
        "memory": "MEMORY://",
    }
    assert set(urls) == set(STORE_SCHEMES)
    for url in urls.values():
        load(tmp_path, put(base(), "store.url", url))
        await open_store(url).aclose()


@pytest.mark.parametrize("url", ["memory://", "MEMORY://", "Memory://"])
def test_workers_need_a_shared_store_whatever_the_case(tmp_path: Path, url: str) -> None:
    tree = put(put(base(), "store.url", url), "server.workers", 2)
    assert "server.workers: several workers need a shared store" in refusal(tmp_path, tree)


# --- 2. credentials in store URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("redis://:CANARY-pw@127.0.0.1:6379/0", "@127.0.0.1:6379/0"),
        ("redis://CANARY-user:CANARY-pw@127.0.0.1:6379/0", "@127.0.0.1:6379/0"),
        ("redis://CANARY-user@127.0.0.1:6379/0", "@127.0.0.1:6379/0"),
        ("REDIS://u:CANARY/with#odd@chars@h:6379/0", "@h:6379/0"),
        ("rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_password=CANARY", "ssl_ca_certs=/ca.pem&"),
        ("redis://h/0?Password=CANARY&db=1", "&db=1"),
        ("redis://h/0?access_token=CANARY&x=1", "&x=1"),
        ("redis://h/0?client_secret=CANARY", "redis://h/0?client_secret="),
        ("redis://h/0?AUTH_TOKEN=CANARY", "redis://h/0?AUTH_TOKEN="),
        ("redis://h/0?pass%77ord=CANARY", "redis://h/0?"),
        ("unix://:CANARY@/run/redis.sock?db=2", "@/run/redis.sock?db=2"),
        ("sqlite:///quota.db", "sqlite:///quota.db"),
        ("memory://", "memory://"),
    ],
)
def test_mask_url_hides_every_credential(url: str, kept: str) -> None:
    masked = mask_url(url)
    assert "CANARY" not in masked
    assert kept in masked
    assert masked.split("://")[0] == url.split("://")[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_redis_errors_and_repr_mask_the_url() -> None:
    url = f"redis://CANARY-user:CANARY-pw@127.0.0.1:{free_port()}/0"
    store = RedisStore(url)
    try:
        assert "CANARY" not in repr(store)
        with pytest.raises(StoreError) as info:
            await store.ping()
        assert "CANARY" not in str(info.value)
        assert "127.0.0.1" in str(info.value)
    finally:
        await store.aclose()


# --- 4. a paid-only model that a free provider lists --------------------------------------------


def test_paid_only_alias_and_model_with_a_free_match_are_warned(tmp_path: Path) -> None:
    tree = base()
    put(tree, "providers.0.models", ["Qwen/Qwen3-32B", "Qwen/Qwen3-8B"])
    put(tree, "providers.1.models", ["qwen3-32b", "qwen3-8b", "qwen-max"])
    tree["models"] = [
        {"id": "q32", "routes": [{"provider": "bailian", "model": "qwen3-32b"}]},
        {"id": "max", "routes": [{"provider": "bailian", "model": "qwen-max"}]},
        {
            "id": "both",
            "routes": [
                {"provider": "modelscope", "model": "Qwen/Qwen3-32B"},
                {"provider": "bailian", "model": "qwen3-32b"},
            ],
        },
    ]
    warnings = paid_only_warnings(load(tmp_path, tree))
    # q32: an alias on Bailian only. qwen3-32b and qwen3-8b: listed by Bailian, and a request
    # for either finds no ModelScope route (its list names them Qwen/...). "both" starts on
    # ModelScope; nothing free maps to qwen-max.
    assert [w.split(" ")[0] for w in warnings] == ["q32", "qwen3-32b", "qwen3-8b"]
    assert "(bailian)" in warnings[0]
    assert "modelscope:Qwen/Qwen3-32B" in warnings[0]
    assert "modelscope:Qwen/Qwen3-32B" in warnings[1]
    assert "modelscope:Qwen/Qwen3-8B" in warnings[2]


def test_no_warning_when_the_free_list_is_unknown_or_routes_are_free(tmp_path: Path) -> None:
    tree = base()
    tree["models"] = [{"id": "q32", "routes": [{"provider": "bailian", "model": "qwen3-32b"}]}]
    assert paid_only_warnings(load(tmp_path, tree)) == []  # ModelScope's list comes at runtime
    put(tree, "providers.0.models", ["Qwen/Qwen3-32B"])
    put(tree, "providers.1.paid", False)
    assert paid_only_warnings(load(tmp_path, tree)) == []
