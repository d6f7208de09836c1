"""The command line as a user runs it: real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
