"""The command line as a user runs it: real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config import EXAMPLE, EXAMPLE_ENV

ROOT = Path(__file__).parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "MODELSCOPE_"))}
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {}), "COLUMNS": "200"},
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def test_check_config_prints_the_pool_without_secrets(tmp_path: Path) -> None:
    carol = tmp_path / "carol"
    carol.write_text("ms-carol-canary-555")
    config = tmp_path / "router.yaml"
    config.write_text(EXAMPLE.read_text().replace("/run/secrets/ms_carol", str(carol)))
    result = run_cli("check-config", "--config", str(config), env=EXAMPLE_ENV)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for name in ("alice", "bob", "carol", "bailian", "qwen3-32b", "Asia/Shanghai"):
        assert name in out
    for secret in [*EXAMPLE_ENV.values(), "ms-carol-canary-555"]:
        assert secret not in out
    assert "warning" not in out  # its aliases start on ModelScope


def test_check_config_names_file_field_and_problem(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(EXAMPLE.read_text())
    env = {k: v for k, v in EXAMPLE_ENV.items() if k != "MODELSCOPE_TOKEN_BOB"}
    result = run_cli("check-config", "--config", str(config), env=env)
    assert result.returncode == 1
    assert str(config) in result.stderr
    assert "providers[0].keys[1].secret" in result.stderr
    assert "MODELSCOPE_TOKEN_BOB" in result.stderr
    for secret in EXAMPLE_ENV.values():
        assert secret not in result.stderr + result.stdout


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "nope.yaml" in result.stderr
    assert "cannot read" in result.stderr


def test_shipped_simulated_config_is_valid() -> None:
    result = run_cli("check-config", "--config", "config/simulated.yaml")
    assert result.returncode == 0, result.stderr
    assert "sk-router-demo" not in result.stdout
    assert "ms-demo-alice" not in result.stdout


CONFIG = """
server: {port: 0}
store: {url: "memory://"}
providers:
  - name: modelscope
    type: modelscope
    base_url: http://127.0.0.1:1/v1
    models: [Qwen/Qwen3-32B]
    keys: [{name: a, secret: CANARY-ms-a}, {name: b, secret: CANARY-ms-b}]
  - name: bailian
    type: bailian
    base_url: http://127.0.0.1:2/v1
    keys: [{name: main, secret: CANARY-bailian}]
clients: [{name: team, key: CANARY-team}]
admin: {key: CANARY-admin}
metrics: {token: CANARY-metrics}
"""
REFUSED = [
    ('store: {url: "memory://"}', 'store: {url: "postgres://u:CANARY@db/q"}', "store.url: "),
    ("server: {port: 0}", "server: {port: 0, workers: 2}", "server.workers: "),
    (
        'store: {url: "memory://"}',
        'store: {url: "MEMORY://"}\nserver: {workers: 2}',
        "server.workers",
    ),
    ("server: {port: 0}", "server: {port: 0}\nquota: {reset_time: 12:00:00}", "quota.reset_time: "),
    ("server: {port: 0}", "server: {port: 0}\nquota: {reset_time: 25:00}", "quota.reset_time: "),
    ("type: bailian", "type: bailian\n    model_limits: {qwen-max: -1}", "model_limits.qwen-max: "),
    ("name: team", "name: team, share: .inf", "clients[0].share: "),
    ("server: {port: 0}", "fair_share: {active_window_seconds: .inf}", "active_window_seconds: "),
    ("type: bailian", "type: bailian\n    timeout_seconds: .nan", "providers[1].timeout_seconds: "),
    ("CANARY-admin", "CANARY-metrics", "admin.key"),
    ("CANARY-admin", "CANARY-team", "admin.key"),
    ("secret: CANARY-bailian", "secret: CANARY-ms-a", "providers[1].keys[0].secret: "),
    ("secret: CANARY-ms-b", "secret: CANARY-ms-a", "providers[0].keys[1].secret: "),
]


def _refused(tmp_path: Path, old: str, new: str) -> Path:
    assert old in CONFIG
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.replace(old, new, 1))
    return config


# serve validates with the same load_settings: one refusal of each kind is enough there.
SERVE_REFUSED = [REFUSED[i] for i in (0, 2, 3, 5, 9, 12)]


@pytest.mark.parametrize(
    ("command", "old", "new", "field"),
    [("check-config", *case) for case in REFUSED] + [("serve", *case) for case in SERVE_REFUSED],
)
def test_check_config_and_serve_refuse_with_the_field_path(
    tmp_path: Path, command: str, old: str, new: str, field: str
) -> None:
    """Exit 1 with file, field path and problem; no traceback, no secret (issue #11)."""
    config = _refused(tmp_path, old, new)
    result = run_cli(command, "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{config}: invalid configuration" in result.stderr
    assert field in result.stderr
    assert "Traceback" not in result.stderr
    assert "CANARY" not in result.stdout + result.stderr


def test_valid_config_for_the_refusals(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG)
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr


def test_serve_that_cannot_open_its_store_exits_1_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "quota.db"
    config = _refused(tmp_path, 'url: "memory://"', f'url: "sqlite:///{missing}"')
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 1
    assert f"error: {config}: store.url: sqlite" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_masks_every_credential_of_the_store_url(tmp_path: Path) -> None:
    url = "rediss://CANARY-user:CANARY-pw@redis.internal:6380/0?ssl_password=CANARY&db=1"
    config = _refused(tmp_path, "memory://", url)
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "rediss://***:***@redis.internal:6380/0?ssl_password=***&db=1" in result.stdout
    assert "CANARY" not in result.stdout + result.stderr


def test_check_config_warns_when_only_paid_routes_serve_a_free_model(tmp_path: Path) -> None:
    alias = "models:\n  - id: q32\n    routes: [{provider: bailian, model: qwen3-32b}]\n"
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG + alias)
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stdout
    assert warnings[0].startswith("warning: q32 is served only by paid providers (bailian)")
    assert "modelscope:Qwen/Qwen3-32B" in warnings[0]
