"""The deployment files: Dockerfile, docker-compose.yml, Prometheus and Grafana provisioning.

No Docker engine is needed: `docker-compose config` and `promtool check config` validate the
files, and the gateway runs the compose config as a real process, probed by the image's own
HEALTHCHECK command. A missing tool fails the test (CI installs docker-compose and promtool).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import load_settings

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
GATEWAY_CONFIG = ROOT / "config" / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARDS = ROOT / "dashboards"
GATEWAYS = ("gateway-1", "gateway-2")
CONFIG_IN_IMAGE = "/app/config/router.yaml"
TOOLS = {
    "docker-compose": "apt-get install docker-compose (or pip install docker-compose)",
    "promtool": "apt-get install prometheus (promtool ships with it)",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?][^}]*)?\}")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH; CI must install it: {TOOLS[name]}", pytrace=False)
    return path


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=45, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output}"
    return output


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, Any]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the repo) of the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"use the short volume syntax: {volume!r}"
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def healthcheck_command() -> list[str]:
    checks = [args for word, args in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1, "the Dockerfile needs exactly one HEALTHCHECK"
    _, sep, command = checks[0].partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {checks[0]}"
    parsed = json.loads(command)  # exec form: no shell in the probe
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_config_is_valid(tmp_path: Path) -> None:
    """`docker-compose config -q` on a copy that has a .env made from .env.example."""
    binary = tool("docker-compose")
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    run([binary, "-f", "docker-compose.yml", "config", "-q"], cwd=tmp_path, env=env)
    resolved = yaml.safe_load(run([binary, "config"], cwd=tmp_path, env=env))
    password = env_example()["REDIS_PASSWORD"]
    for name in GATEWAYS:
        url = resolved["services"][name]["environment"]["ROUTER_STORE__URL"]
        assert url == f"redis://:{password}@redis:6379/0"


def test_compose_refuses_to_start_without_passwords(tmp_path: Path) -> None:
    binary = tool("docker-compose")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    (tmp_path / ".env").write_text(
        "\n".join(line for line in lines if not line.startswith("REDIS_PASSWORD=")) + "\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    result = subprocess.run(
        [binary, "config", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stdout + result.stderr


def test_compose_has_two_gateways_on_one_image_and_redis() -> None:
    found = services()
    assert {"redis", *GATEWAYS, "prometheus", "grafana"} <= found.keys()
    first, second = (found[name] for name in GATEWAYS)
    assert first["build"] == second["build"] == "."
    assert first["image"] == second["image"]
    assert {p for name in GATEWAYS for p in found[name]["ports"]} == {"8081:8080", "8082:8080"}
    for name in GATEWAYS:
        gateway = found[name]
        assert bind_mounts(gateway) == {CONFIG_IN_IMAGE: "./config/compose.yaml"}
        assert f"{CONFIG_IN_IMAGE}:ro" in " ".join(gateway["volumes"])
        assert gateway["env_file"] in (".env", [".env"])
        url = gateway["environment"]["ROUTER_STORE__URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD")
        assert url.endswith("@redis:6379/0")
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        assert gateway["restart"] == "unless-stopped"
        has_healthcheck = "healthcheck" in gateway or any(
            word == "HEALTHCHECK" for word, _ in dockerfile_instructions()
        )
        assert has_healthcheck, f"{name}: no healthcheck in compose or the Dockerfile"
    # The gateway definition is written once (x-gateway) and merged into both services.
    assert "x-gateway" in compose()
    assert COMPOSE.read_text(encoding="utf-8").count("<<: *gateway") == 2


def test_compose_redis_is_durable_and_checked() -> None:
    redis = services()["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(str(part) for part in redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--requirepass ${REDIS_PASSWORD" in command
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    named = [v.split(":")[0] for v in redis["volumes"] if v.split(":")[1] == "/data"]
    assert named, "redis needs a volume on /data"
    assert named[0] in compose()["volumes"]


def test_compose_bind_mounts_exist_in_the_repo() -> None:
    missing = [
        f"{name}: {source}"
        for name, service in services().items()
        for source in bind_mounts(service).values()
        if not (ROOT / source).exists()
    ]
    assert not missing, "bind-mounted host paths missing from the repo: " + ", ".join(missing)


def test_env_example_names_every_variable_the_deployment_needs() -> None:
    example = env_example()
    needed = {
        "MODELSCOPE_TOKEN_ALICE",
        "MODELSCOPE_TOKEN_BOB",
        "DASHSCOPE_API_KEY",
        "ROUTER_CLIENT_KEY",
        "ROUTER_METRICS_TOKEN",
        "REDIS_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    }
    for path in (COMPOSE, GATEWAY_CONFIG):
        text = path.read_text(encoding="utf-8").replace("$$", "")
        needed |= {m.group(1) for m in _VAR.finditer(text) if not (m.group(2) or "").strip(":-")}
    assert needed <= example.keys(), f"not in .env.example: {sorted(needed - example.keys())}"
    # URL-safe: REDIS_PASSWORD goes into redis://:PASSWORD@redis:6379/0 as is.
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", example["REDIS_PASSWORD"])


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_is_slim_multistage_and_non_root() -> None:
    instructions = dockerfile_instructions()
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = [args for word, args in instructions if word == "FROM"]
    assert len(stages) >= 2, "build in one stage, run in another"
    assert "python:3.11-slim" in text
    assert any(word == "COPY" and args.startswith("--from=") for word, args in instructions)
    users = [args for word, args in instructions if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"
    installs = [args for word, args in instructions if word == "RUN" and "pip install" in args]
    assert any(re.search(r"pip install (\S+ )*\.(\s|$)", args) for args in installs), installs
    for args in installs:
        assert ".[" not in args, f"extras in the image: {args}"
        assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", args), f"editable install: {args}"
    exposed = [args for word, args in instructions if word == "EXPOSE"]
    assert exposed == ["8080"]
    env = " ".join(args for word, args in instructions if word == "ENV")
    for setting in (
        "ROUTER_SERVER__HOST=0.0.0.0",
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
    ):
        assert setting in env
    assert ("ENTRYPOINT", '["modelscope-router"]') in instructions
    assert ("CMD", f'["serve", "--config", "{CONFIG_IN_IMAGE}"]') in instructions
    assert any(word == "VOLUME" and "/app/data" in args for word, args in instructions)


def test_dockerfile_healthcheck_probes_healthz_without_curl() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    assert "127.0.0.1" in command[2]
    compile(command[2], "<HEALTHCHECK>", "exec")


def test_dockerignore_keeps_secrets_and_junk_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".env", "*.sqlite3", ".pytest_cache"} <= ignored
    # What the build copies must stay in the context.
    assert not ignored & {"router", "pyproject.toml", "README.md", "*.md", "*"}


# --- the gateway config of the compose deployment ------------------------------------------------


@pytest.fixture
def compose_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment of a gateway container, with the memory store."""
    for name in list(os.environ):
        if name.startswith(("ROUTER_", "MODELSCOPE_", "DASHSCOPE_")):
            monkeypatch.delenv(name)
    values = {**env_example(), "ROUTER_SERVER__HOST": "0.0.0.0", "ROUTER_STORE__URL": "memory://"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_compose_gateway_config_loads(compose_env: dict[str, str]) -> None:
    settings = load_settings(GATEWAY_CONFIG)
    assert settings.store.url == "memory://"
    assert settings.server.host == "0.0.0.0"
    assert [c.key.get_secret_value() for c in settings.clients] == [
        compose_env["ROUTER_CLIENT_KEY"]
    ]
    assert settings.metrics.token is not None
    assert settings.metrics.token.get_secret_value() == compose_env["ROUTER_METRICS_TOKEN"]
    secrets = {k.resolved_secret() for p in settings.providers for k in p.keys}
    expected = {"MODELSCOPE_TOKEN_ALICE", "MODELSCOPE_TOKEN_BOB", "DASHSCOPE_API_KEY"}
    assert secrets == {compose_env[name] for name in expected}


def test_compose_gateway_config_without_metrics_token(
    compose_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_METRICS_TOKEN", "")
    assert load_settings(GATEWAY_CONFIG).metrics.token is None
    monkeypatch.delenv("ROUTER_METRICS_TOKEN")
    assert load_settings(GATEWAY_CONFIG).metrics.token is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`modelscope-router serve` on config/compose.yaml, as in the container but on loopback."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ROUTER_", "MODELSCOPE_", "DASHSCOPE_"))
    }
    env = {
        **base,
        **env_example(),
        "ROUTER_SERVER__HOST": "127.0.0.1",
        "ROUTER_SERVER__PORT": str(free_port()),
        "ROUTER_STORE__URL": "memory://",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    args = [sys.executable, "-m", "router", "serve", "--config", str(GATEWAY_CONFIG)]
    log = (tmp_path / "gateway.log").open("w")
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        yield env
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def http_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_image_healthcheck_and_metrics_token_against_the_gateway(gateway: dict[str, str]) -> None:
    """The HEALTHCHECK command turns healthy once the compose config is served."""
    command = healthcheck_command()
    probe = [sys.executable, *command[1:]]
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(probe, env=gateway, capture_output=True, timeout=10, check=False)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, f"HEALTHCHECK never passed: {result.stderr!r}"
        time.sleep(0.3)
    base = f"http://127.0.0.1:{gateway['ROUTER_SERVER__PORT']}"
    assert http_status(f"{base}/readyz") == 200
    assert http_status(f"{base}/metrics") == 401
    assert http_status(f"{base}/metrics", "wrong-token") == 401
    assert http_status(f"{base}/metrics", gateway["ROUTER_METRICS_TOKEN"]) == 200


# --- Prometheus ----------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """promtool checks the config and rules.yml; credentials_file must exist, so use a copy."""
    binary = tool("promtool")
    rules = PROMETHEUS.parent / "rules.yml"
    assert rules.exists(), f"{rules} is missing (prometheus.yml loads it)"
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "modelscope-router"]
    token_file = tmp_path / "metrics-token"
    token_file.write_text("example-token")
    job["authorization"]["credentials_file"] = str(token_file)
    shutil.copy(rules, tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    output = run([binary, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert "SUCCESS" in output


def test_prometheus_scrapes_both_gateways_with_the_token_compose_writes() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["rules.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert "prometheus" in jobs
    job = jobs["modelscope-router"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:8080" for name in GATEWAYS}
    assert job["authorization"]["type"] == "Bearer"
    token_file = job["authorization"]["credentials_file"]
    prometheus = services()["prometheus"]
    # The entrypoint writes ROUTER_METRICS_TOKEN (from .env) to that file, then runs Prometheus.
    entrypoint = " ".join(prometheus["entrypoint"])
    assert f"> {token_file}" in entrypoint
    assert "exec /bin/prometheus" in entrypoint
    assert prometheus["environment"]["ROUTER_METRICS_TOKEN"].startswith("${ROUTER_METRICS_TOKEN")
    assert any(v.endswith(":/prometheus") for v in prometheus["volumes"])
    command = prometheus["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert "--storage.tsdb.path=/prometheus" in command
    assert bind_mounts(prometheus) == {
        "/etc/prometheus/prometheus.yml": "./deploy/prometheus/prometheus.yml",
        "/etc/prometheus/rules.yml": "./deploy/prometheus/rules.yml",
    }


# --- Grafana -------------------------------------------------------------------------------------


def test_grafana_provisioning_matches_compose() -> None:
    grafana = services()["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./dashboards"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD"
    )
    datasources = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus"
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    providers = yaml.safe_load((GRAFANA / "dashboards" / "dashboards.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["folder"] == "modelscope-router"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_dashboards_use_the_provisioned_datasource() -> None:
    """Every panel queries `${datasource}` (a datasource variable) or the uid "prometheus"."""
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    assert dashboards, f"no dashboards in {DASHBOARDS}: Grafana would provision nothing"
    ok = {"prometheus", "$datasource", "${datasource}", "-- Grafana --", "grafana"}
    for path in dashboards:
        text = path.read_text(encoding="utf-8")
        dashboard = json.loads(text)
        shared = f"{path.name}: exported 'for sharing'; provisioning cannot fill its inputs"
        assert "__inputs" not in dashboard, shared
        assert "${DS_" not in text, shared
        variables = dashboard.get("templating", {}).get("list", [])
        (variable,) = [v for v in variables if v.get("type") == "datasource"] or [None]
        if variable is not None:
            assert variable["name"] == "datasource", path.name
            assert variable["query"] == "prometheus", path.name
            current = (variable.get("current") or {}).get("value")
            assert current in (None, "", "prometheus", "Prometheus"), f"{path.name}: {current}"
        for ref in datasource_refs(dashboard):
            uid = ref.get("uid") if isinstance(ref, dict) else ref
            assert uid is None or uid in ok, f"{path.name}: unknown datasource {ref!r}"
            if uid in ("$datasource", "${datasource}"):
                assert variable is not None, f"{path.name}: no datasource variable"
