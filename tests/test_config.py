from pathlib import Path

import pytest

from router.config import ConfigError, Settings, expand_env, format_loc, load_settings
from router.routing import RouteTable, bailian_model_name, known_routes

EXAMPLE = Path(__file__).parent.parent / "config" / "router.example.yaml"
EXAMPLE_ENV = {
    "MODELSCOPE_TOKEN_ALICE": "ms-alice-canary-111",
    "MODELSCOPE_TOKEN_BOB": "ms-bob-canary-222",
    "DASHSCOPE_API_KEY": "sk-bailian-canary-333",
    "ROUTER_CLIENT_KEY": "sk-client-canary-444",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """
providers:
  - name: modelscope
    type: modelscope
    base_url: http://127.0.0.1:1/v1
    keys:
      - {name: alice, secret: "${TOKEN_A}"}
      - {name: bob, secret: "${TOKEN_B:-fallback-b}"}
"""


def test_env_expansion_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "ms-a"})
    provider = settings.providers[0]
    assert [k.resolved_secret() for k in provider.keys] == ["ms-a", "fallback-b"]
    assert settings.store.url == "sqlite:///modelscope-router.sqlite3"
    assert settings.quota.timezone == "Asia/Shanghai"
    assert provider.key_daily_limit(provider.keys[0]) == 2000  # ModelScope's free tier
    assert provider.key_model_limit(provider.keys[0], "Qwen/Qwen3-32B") == 500


def test_missing_variable_names_it_and_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL), env={})
    message = str(info.value)
    assert "router.yaml" in message
    assert "providers[0].keys[0].secret" in message
    assert "TOKEN_A" in message


def test_field_path_in_validation_errors(tmp_path: Path) -> None:
    text = MINIMAL.replace('{name: bob, secret: "${TOKEN_B:-fallback-b}"}', "{name: bob}")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={"TOKEN_A": "x"})
    assert "providers[0].keys[1]" in str(info.value)
    assert "exactly one of 'secret' or 'secret_file'" in str(info.value)


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    text = MINIMAL + "surprise: 1\n"
    with pytest.raises(ConfigError, match="surprise"):
        load_settings(write(tmp_path, text), env={"TOKEN_A": "x"})
    text = MINIMAL.replace("type: modelscope", "type: modelscope\n    colour: red")
    with pytest.raises(ConfigError, match=r"providers\[0\]\.colour"):
        load_settings(write(tmp_path, text), env={"TOKEN_A": "x"})


def test_route_to_undeclared_provider(tmp_path: Path) -> None:
    text = MINIMAL + "models:\n  - id: q\n    routes: [{provider: nowhere, model: m}]\n"
    with pytest.raises(ConfigError, match=r"models\[0\]\.routes\[0\]\.provider.*nowhere"):
        load_settings(write(tmp_path, text), env={"TOKEN_A": "x"})


def test_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("ms-from-file\n")
    text = MINIMAL.replace('secret: "${TOKEN_A}"', f"secret_file: {secret}")
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.providers[0].keys[0].resolved_secret() == "ms-from-file"
    secret.unlink()
    with pytest.raises(ConfigError, match=r"providers\[0\]\.keys\[0\]\.secret_file"):
        load_settings(write(tmp_path, text), env={})


def test_env_overrides_server_and_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_SERVER__PORT", "9191")
    monkeypatch.setenv("ROUTER_STORE__URL", "memory://")
    settings = load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "x"})
    assert settings.server.port == 9191
    assert settings.server.host == "127.0.0.1"
    assert settings.store.url == "memory://"


def test_env_overrides_are_validated_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_STORE__URL", "postgres://u:CANARY@db/quota")
    with pytest.raises(ConfigError, match=r"store\.url: unsupported scheme 'postgres'") as info:
        load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "x"})
    assert "CANARY" not in str(info.value)
    monkeypatch.setenv("ROUTER_STORE__URL", "Memory://")
    monkeypatch.setenv("ROUTER_SERVER__WORKERS", "2")
    with pytest.raises(ConfigError, match=r"server\.workers: several workers need a shared"):
        load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "x"})


def test_top_level_names_must_be_strings(tmp_path: Path) -> None:
    """``1: x`` reached Settings(**data) as a keyword that is not a string: a TypeError."""
    with pytest.raises(ConfigError, match="the top level must be a mapping of section names"):
        load_settings(write(tmp_path, MINIMAL + "1: x\n"), env={"TOKEN_A": "x"})


def test_secret_file_that_is_not_text(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_bytes(b"\xffCANARY")
    text = MINIMAL.replace('secret: "${TOKEN_A}"', f"secret_file: {secret}")
    with pytest.raises(ConfigError, match=r"keys\[0\]\.secret_file: .* is not UTF-8 text"):
        load_settings(write(tmp_path, text), env={})


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    settings = load_settings(example_copy(tmp_path), env=EXAMPLE_ENV)
    text = repr(settings) + str(settings)
    for secret in EXAMPLE_ENV.values():
        assert secret not in text


def example_copy(tmp_path: Path) -> Path:
    secret = tmp_path / "carol"
    secret.write_text("ms-carol-canary-555")
    return write(tmp_path, EXAMPLE.read_text().replace("/run/secrets/ms_carol", str(secret)))


def test_example_config_is_valid(tmp_path: Path) -> None:
    settings = load_settings(example_copy(tmp_path), env=EXAMPLE_ENV)
    assert [p.name for p in settings.providers] == ["modelscope", "bailian"]
    routes = RouteTable(settings).resolve("qwen3-32b")
    assert [(r.provider.name, r.model) for r in routes] == [
        ("modelscope", "Qwen/Qwen3-32B"),
        ("bailian", "qwen3-32b"),
    ]


def test_unaliased_ids_go_everywhere_renamed_for_bailian(tmp_path: Path) -> None:
    settings = load_settings(example_copy(tmp_path), env=EXAMPLE_ENV)
    routes = RouteTable(settings).resolve("Qwen/Qwen3-235B-A22B-Instruct-2507")
    assert [(r.provider.name, r.model) for r in routes] == [
        ("modelscope", "Qwen/Qwen3-235B-A22B-Instruct-2507"),
        ("bailian", "qwen3-235b-a22b-instruct-2507"),
    ]
    assert bailian_model_name("deepseek-ai/DeepSeek-V3.1") == "deepseek-v3.1"
    catalog = {"modelscope": frozenset({"Qwen/Qwen3-32B"}), "bailian": None}
    kept = known_routes(routes, catalog)
    assert [r.provider.name for r in kept] == ["bailian"]


def test_format_loc() -> None:
    assert format_loc(("providers", 0, "keys", 1, "secret")) == "providers[0].keys[1].secret"
    assert format_loc(("server", "port")) == "server.port"


def test_expand_env_leaves_other_types() -> None:
    assert expand_env({"a": [1, "${X}", True]}, {"X": "y"}) == {"a": [1, "y", True]}


def test_settings_require_a_provider() -> None:
    with pytest.raises(ValueError, match="providers"):
        Settings()  # type: ignore[call-arg]


def test_root_path_is_a_path_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "x"}).server.root_path == ""
    monkeypatch.setenv("ROUTER_SERVER__ROOT_PATH", "/team/router")
    settings = load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "x"})
    assert settings.server.root_path == "/team/router"
    for bad in ("team-router", "/team-router/", "/", "/a//b", "/../admin", "/a b", "/a?b"):
        monkeypatch.setenv("ROUTER_SERVER__ROOT_PATH", bad)
        with pytest.raises(ConfigError, match=r"server\.root_path: .*a path prefix such as"):
            load_settings(write(tmp_path, MINIMAL), env={"TOKEN_A": "x"})
