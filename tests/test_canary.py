"""Canary secrets: recognisable fake secrets must never come out anywhere.

Every secret the gateway holds (ModelScope tokens, the Bailian key, client keys, the admin key,
the metrics token, the Redis password) is a fake with a unique uuid. The gateway serves real
traffic against the simulator and a private password-protected redis-server (a chat, a stream,
embeddings, Anthropic messages, an image task, a failover past a token the upstream refuses
with 401, the pool running out into a 429), and every admin route and every CLI command runs.
Everything that comes out is captured: the JSON log lines (``configure_logging`` to a
StringIO) and caplog, every HTTP answer's status, headers and body, /metrics, the admin API's
answers, each CLI command's stdout and stderr, check-config's output, and what the store holds
in Redis. None of it may contain a secret, its uuid, or even the word CANARY.

Also here, the other security checks: the headers an upstream receives (an allow-list), key
separation (client / admin / metrics), that keys are compared as fixed-length digests against
every candidate, TLS verification towards upstreams (a self-signed HTTPS upstream is refused)
and towards Redis (rediss:// with a private CA passed in the URL), and URL masking.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import os
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import yaml
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from router import admin as admin_module
from router import auth as auth_module
from router.app import create_app
from router.auth import ClientAuth
from router.config import ClientConfig, Settings, load_settings
from router.demo import running
from router.errors import RouterError, Unauthorized
from router.logs import configure_logging
from router.quota.redis_store import RedisStore
from router.quota.store import StoreError
from router.quota.urls import mask_url
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from router.upstream import USER_AGENT
from tests.redis_server import RedisServer, RedisTls

MODEL = "Qwen/Qwen3-32B"
EMBEDDING_MODEL = "Qwen/Qwen3-Embedding-8B"
MESSAGES = [{"role": "user", "content": "hi"}]


def _canary(prefix: str) -> tuple[str, str]:
    """A fake secret and its uuid."""
    made = str(uuid.uuid4())
    return f"{prefix}-CANARY-{made}", made


@dataclass(frozen=True)
class Secrets:
    """Every secret of one test run, and what must not appear anywhere."""

    values: dict[str, str] = field(default_factory=dict)
    uuids: list[str] = field(default_factory=list)

    def add(self, name: str, prefix: str) -> str:
        secret, made = _canary(prefix)
        self.values[name] = secret
        self.uuids.append(made)
        return secret

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    def needles(self) -> list[str]:
        found = ["CANARY", *self.values.values()]
        for made in self.uuids:
            found += [made, made.replace("-", ""), made.split("-")[-1]]  # the 12-digit tail
        return found

    def assert_absent(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        for needle in self.needles():
            at = text.find(needle)
            assert at < 0, f"{needle!r} leaked in {where}: …{text[max(0, at - 200) : at + 80]}…"


# -- capturing everything ------------------------------------------------------------------


@dataclass
class Capture:
    """What came out of the gateway and the CLI, by where it came from."""

    parts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.parts.append((where, text))


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Http:
    """An aiohttp session that records every answer (status, headers, body) it gets."""

    def __init__(self, base: str, capture: Capture) -> None:
        self.base = base
        self.capture = capture
        self.session = aiohttp.ClientSession()

    async def __call__(
        self,
        method: str,
        path: str,
        key: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        data = None if body is None else orjson.dumps(body)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, data=data, headers=sent
        ) as response:
            answer = Answer(response.status, CIMultiDict(response.headers), await response.read())
        self.capture.add(
            f"{method} {path} -> {answer.status}",
            f"{answer.status}\n{dict(answer.headers)}\n" + answer.body.decode("utf-8", "replace"),
        )
        return answer

    async def close(self) -> None:
        await self.session.close()


@asynccontextmanager
async def captured_logs(capture: Capture, caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """JSON log lines from ``configure_logging`` at DEBUG, plus caplog; restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").level)
    stream = io.StringIO()
    caplog.set_level(logging.DEBUG)
    configure_logging("DEBUG", stream, json=True)
    root.addHandler(caplog.handler)  # configure_logging replaced the root handlers
    try:
        yield
    finally:
        root.handlers[:], level, access = saved
        root.setLevel(level)
        logging.getLogger("aiohttp.access").setLevel(access)
        capture.add("JSON log lines", stream.getvalue())
        capture.add("caplog", caplog.text)
        capture.add(
            "caplog records",
            "\n".join(f"{r.name} {r.getMessage()} {r.args!r} {r.__dict__}" for r in caplog.records),
        )


async def run_cli(
    capture: Capture, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python -m router ARGS`` in a clean environment; output captured."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "CANARY_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {}), "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    capture.add(f"cli {' '.join(args)} (stdout)", out)
    capture.add(f"cli {' '.join(args)} (stderr)", err)
    return proc.returncode, out.decode(), err.decode()


# -- the canary run ------------------------------------------------------------------------


@pytest.fixture
def secrets() -> Secrets:
    made = Secrets()
    for name, prefix in (
        ("ms_revoked", "ms"),
        ("ms_alice", "ms"),
        ("ms_bob", "ms"),
        ("ms_dave", "ms"),
        ("bailian", "sk"),
        ("client", "sk"),
        ("client_hashed", "sk"),
        ("admin", "sk"),
        ("metrics", "mt"),
        ("redis", "rp"),
        ("redis_wrong", "rp"),
    ):
        made.add(name, prefix)
    return made


@pytest.fixture
def private_redis(secrets: Secrets) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    with RedisServer(password=secrets["redis"]) as server:
        yield server


def canary_config(sim: Simulator, redis_port: int, bob_file: Path, prefix: str) -> dict[str, Any]:
    """The config file: secrets by ${VAR}, literally, from a file and as a SHA-256."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {
            "url": f"redis://:${{CANARY_REDIS_PASSWORD}}@127.0.0.1:{redis_port}/0",
            "prefix": prefix,
        },
        "providers": [
            {
                "name": "modelscope",
                "type": "modelscope",
                "base_url": sim.modelscope_url,
                "strategy": "fill_first",
                "daily_limit": 3,
                "model_daily_limit": 100,
                "keys": [
                    {"name": "revoked", "secret": "${CANARY_MS_REVOKED}"},
                    {"name": "alice", "secret": "${CANARY_MS_ALICE}"},
                    {"name": "bob", "secret_file": str(bob_file)},
                ],
            },
            {
                "name": "bailian",
                "type": "bailian",
                "base_url": sim.bailian_url,
                "daily_limit": 1,
                "keys": [{"name": "main", "secret": "${CANARY_BAILIAN}"}],
            },
        ],
        "clients": [
            {"name": "team", "key": "${CANARY_CLIENT}"},
            {"name": "hashed", "key_sha256": "${CANARY_CLIENT_SHA256}"},
        ],
        "admin": {"key": "${CANARY_ADMIN}"},
        "metrics": {"token": "${CANARY_METRICS}"},
    }


def canary_env(secrets: Secrets) -> dict[str, str]:
    return {
        "CANARY_REDIS_PASSWORD": secrets["redis"],
        "CANARY_MS_REVOKED": secrets["ms_revoked"],
        "CANARY_MS_ALICE": secrets["ms_alice"],
        "CANARY_MS_DAVE": secrets["ms_dave"],
        "CANARY_BAILIAN": secrets["bailian"],
        "CANARY_CLIENT": secrets["client"],
        "CANARY_CLIENT_SHA256": hashlib.sha256(secrets["client_hashed"].encode()).hexdigest(),
        "CANARY_ADMIN": secrets["admin"],
        "CANARY_METRICS": secrets["metrics"],
    }


def canary_simulator(secrets: Secrets) -> Simulator:
    """The upstreams know alice, bob, dave and the Bailian key; "revoked" gets their 401."""
    tokens = [
        ModelScopeToken(secret=secrets[f"ms_{n}"], name=n, daily_limit=50, model_daily_limit=50)
        for n in ("alice", "bob", "dave")
    ]
    return Simulator(
        SimulatorConfig(
            modelscope=ModelScopeConfig(tokens=tokens),
            bailian=BailianConfig(keys=[BailianKey(secret=secrets["bailian"], name="main")]),
        )
    )


async def traffic(http: Http, secrets: Secrets) -> list[tuple[str, str, int]]:
    """A chat (failing over past the 401), a stream, embeddings, messages, an image task,
    then chats until the pool is spent; returns (provider, key, status) of each call."""
    client = secrets["client"]
    served: list[tuple[str, str, int]] = []

    def note(answer: Answer) -> Answer:
        served.append(
            (
                answer.headers.get("x-router-provider", "-"),
                answer.headers.get("x-router-key", "-"),
                answer.status,
            )
        )
        return answer

    chat = {"model": MODEL, "messages": MESSAGES}
    first = note(await http("POST", "/v1/chat/completions", client, chat))
    assert first.status == 200, first.body
    assert first.headers["x-router-key"] == "alice"  # "revoked" got the upstream's 401
    image = note(
        await http(
            "POST",
            "/v1/images/generations",
            client,
            {"model": "Qwen/Qwen-Image", "prompt": "a canary"},
            {"X-ModelScope-Async-Mode": "true"},
        )
    )
    assert image.status == 200, image.body
    task = image.json()["task_id"]
    polled = await http(
        "GET", f"/v1/tasks/{task}", client, None, {"X-ModelScope-Task-Type": "image_generation"}
    )
    assert polled.status == 200, polled.body
    stream = note(await http("POST", "/v1/chat/completions", client, {**chat, "stream": True}))
    assert stream.status == 200, stream.body
    assert b"[DONE]" in stream.body
    embeddings = {"model": EMBEDDING_MODEL, "input": ["a", "b"]}
    answer = note(await http("POST", "/v1/embeddings", secrets["client_hashed"], embeddings))
    assert answer.status == 200, answer.body
    messages = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES}
    answer = note(await http("POST", "/v1/messages", client, messages))
    assert answer.status == 200, answer.body
    for _ in range(8):
        answer = note(await http("POST", "/v1/chat/completions", client, chat))
        if answer.status == 429:
            assert answer.json()["error"]["code"] == "pool_exhausted", answer.body
            break
    else:
        pytest.fail(f"the pool never ran out: {served}")
    return served


async def key_separation(http: Http, secrets: Secrets) -> None:
    """Each key opens its own door only; the answers are captured too."""
    chat = {"model": MODEL, "messages": MESSAGES}
    checks = [
        ("POST", "/v1/chat/completions", None, chat, 401),
        ("POST", "/v1/chat/completions", "sk-wrong", chat, 401),
        ("POST", "/v1/chat/completions", secrets["admin"], chat, 401),  # no client key
        ("POST", "/v1/chat/completions", secrets["metrics"], chat, 401),
        ("GET", "/v1/models", secrets["admin"], None, 401),
        ("GET", "/admin/quota", None, None, 401),
        ("GET", "/admin/quota", secrets["client"], None, 403),
        ("GET", "/admin/quota", secrets["client_hashed"], None, 403),
        ("GET", "/admin/quota", secrets["metrics"], None, 401),
        ("POST", "/admin/keys/modelscope/alice/disable", secrets["client"], None, 403),
        ("GET", "/metrics", None, None, 401),
        ("GET", "/metrics", secrets["client"], None, 401),
        ("GET", "/metrics", secrets["admin"], None, 401),
    ]
    for method, path, key, body, status in checks:
        answer = await http(method, path, key, body)
        assert answer.status == status, (method, path, answer.body)
        assert set(answer.json()) == {"error"}
    models = await http("GET", "/v1/models", secrets["client"])
    assert models.status == 200


async def malformed_requests(url: str, secrets: Secrets, capture: Capture) -> None:
    """Requests aiohttp's own HTTP parser refuses, with a key on the offending line: the log
    must not quote it. (aiohttp's 400 quotes that line back to the sender, who sent it: only
    the status line is captured here.)"""
    port = int(url.rsplit(":", 1)[1])
    for line in (
        f"Authorization: Bearer {secrets['client']}\x01",  # a control byte
        f"X-Api-Key: {secrets['admin']}\nX-Other: 1",  # a bare LF
        f"Authorization : Bearer {secrets['metrics']}",  # a space before the colon
        f"Authorization: Bearer {secrets['client']}" + " " * 9000 + "x",  # too long
    ):
        raw = await raw_exchange(
            port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode()
        )
        status_line = raw.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.0 400") or status_line.startswith(b"HTTP/1.1 400")
        capture.add("malformed request (status line)", status_line)


async def admin_routes(http: Http, secrets: Secrets, config: Path) -> None:
    """Every admin route, its errors, and a reload refused for a YAML error on a secret line."""
    admin = secrets["admin"]
    for path in ("/admin/quota", "/admin/clients", "/admin/openapi.json"):
        answer = await http("GET", path, admin)
        assert answer.status == 200, answer.body
    quota = (await http("GET", "/admin/quota", admin)).json()
    keys = {k["name"]: k for k in quota["providers"][0]["keys"]}
    assert keys["revoked"]["state"] == "disabled"
    base = "/admin/keys/modelscope"
    disabled = await http("POST", f"{base}/alice/disable", admin, {"reason": "canary review"})
    assert disabled.status == 200
    assert disabled.json()["key"]["state"] == "disabled"
    assert (await http("POST", f"{base}/alice/enable", admin)).status == 200
    assert (await http("POST", f"{base}/alice/reset", admin)).status == 200
    assert (await http("POST", f"{base}/revoked/enable", admin)).status == 200
    assert (await http("POST", f"{base}/nobody/reset", admin)).status == 404
    assert (await http("POST", "/admin/keys/nowhere/alice/reset", admin)).status == 404
    bad_reason = await http("POST", f"{base}/alice/disable", admin, {"reason": 7})
    assert bad_reason.status == 400
    assert (await http("POST", "/admin/reload", admin)).status == 200
    # A typo on the line of a literal secret: the refusal names the line, not its text.
    good = read(config)
    write(config, good + f"broken:\n  - {{name: x, secret: {secrets['ms_bob']}: oops}}\n")
    try:
        refused = await http("POST", "/admin/reload", admin)
        assert refused.status == 400, refused.body
        assert "not valid YAML" in refused.json()["error"]["message"]
    finally:
        write(config, good)


async def cli_commands(
    capture: Capture, secrets: Secrets, url: str, config: Path, env: dict[str, str]
) -> None:
    """Every CLI command that touches secrets, against the config, the store and the gateway.

    The read-only ones (and the refusals) run side by side; the key actions in order."""
    with_admin = {**env, "ROUTER_ADMIN_KEY": secrets["admin"]}
    wrong_admin = {**env, "ROUTER_ADMIN_KEY": secrets["client"]}
    wrong = config.with_name("wrong-password.yaml")
    write(wrong, read(config).replace("${CANARY_REDIS_PASSWORD}", secrets["redis_wrong"]))
    query = config.with_name("query-password.yaml")  # redis-py also reads ?password=
    write(
        query,
        read(config)
        .replace(":${CANARY_REDIS_PASSWORD}@", "")
        .replace("/0\n", "/0?password=${CANARY_REDIS_PASSWORD}\n", 1),
    )
    broken = config.with_name("broken.yaml")  # a YAML error on the line of a literal secret
    write(broken, read(config) + f"oops:\n  - {{secret: {secrets['ms_bob']}: x}}\n")
    (
        (checked, out_check, err_check),
        (status_json, out_json, err_json),
        (status_plain, _, err_plain),
        (remote_json, out_remote, err_remote),
        (remote_plain, _, err_remote_plain),
        (refused_admin, _, err_admin),
        (refused_redis, _, err_redis),
        (checked_query, out_query, err_query),
        (refused_yaml, _, err_yaml),
    ) = await asyncio.gather(
        run_cli(capture, "check-config", "--config", str(config), env=env),
        run_cli(capture, "status", "--config", str(config), "--json", env=env),
        run_cli(capture, "status", "--config", str(config), env=env),
        run_cli(capture, "status", "--url", url, "--json", env=with_admin),
        run_cli(capture, "status", "--url", url, env=with_admin),
        run_cli(capture, "status", "--url", url, env=wrong_admin),
        run_cli(capture, "status", "--config", str(wrong), env=env),
        run_cli(capture, "check-config", "--config", str(query), env=env),
        run_cli(capture, "check-config", "--config", str(broken), env=env),
    )
    assert checked == 0, err_check
    assert "alice" in out_check
    assert ":***@" in out_check  # the Redis password, masked
    assert status_json == 0, err_json
    assert orjson.loads(out_json)["quota"]["providers"][0]["name"] == "modelscope"
    assert status_plain == 0, err_plain
    assert remote_json == 0, err_remote
    assert orjson.loads(out_remote)["clients"]["clients"][0]["name"] == "team"
    assert remote_plain == 0, err_remote_plain
    assert refused_admin == 1
    assert "403" in err_admin
    assert refused_redis == 1
    assert "redis" in err_redis
    assert checked_query == 0, err_query
    assert "password=***" in out_query
    assert refused_yaml == 1
    assert "not valid YAML" in err_yaml
    for action in ("disable", "enable", "reset"):
        extra = ["--reason", "canary check"] if action == "disable" else []
        code, out, err = await run_cli(
            capture, "keys", action, "modelscope", "alice", "--url", url, *extra, env=with_admin
        )
        assert code == 0, err
        assert "modelscope/alice" in out
    code, _, err = await run_cli(capture, "reload", "--url", url, env=with_admin)
    assert code == 0, err
    code, out, err = await run_cli(
        capture,
        "keys",
        "add",
        "modelscope",
        "dave",
        "--secret-env",
        "CANARY_MS_DAVE",
        "--config",
        str(config),
        "--url",
        url,
        env=with_admin,
    )
    assert code == 0, err
    assert "dave" in out


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def redis_contents(server: RedisServer, prefix: str) -> str:
    """Every key and value the store wrote, as text."""
    client = redis.Redis(port=server.port, password=server.password, decode_responses=True)
    try:
        lines = []
        for key in client.scan_iter(match=f"*{prefix}*"):
            kind = client.type(key)
            if kind == "hash":
                value: Any = client.hgetall(key)
            elif kind == "string":
                value = client.get(key)
            else:
                value = kind
            lines.append(f"{key} = {value}")
        assert lines, "the store wrote nothing"
        return "\n".join(lines)
    finally:
        client.close()


async def test_no_secret_comes_out_anywhere(
    tmp_path: Path,
    secrets: Secrets,
    private_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capture = Capture()
    env = canary_env(secrets)
    for name, value in env.items():  # the gateway expands ${VAR} at reload too
        monkeypatch.setenv(name, value)
    bob_file = tmp_path / "bob.secret"
    bob_file.write_text(secrets["ms_bob"] + "\n")
    prefix = f"canary-{uuid.uuid4().hex[:8]}"
    async with canary_simulator(secrets) as sim, captured_logs(capture, caplog):
        config = tmp_path / "router.yaml"
        write(config, yaml.safe_dump(canary_config(sim, private_redis.port, bob_file, prefix)))
        settings = load_settings(config)
        app = create_app(settings, config_path=config, registry=CollectorRegistry())
        async with running(app) as url:
            http = Http(url, capture)
            try:
                served = await traffic(http, secrets)
                await key_separation(http, secrets)
                await malformed_requests(url, secrets, capture)
                await admin_routes(http, secrets, config)
                await cli_commands(capture, secrets, url, config, env)
                after_add = await http("GET", "/admin/quota", secrets["admin"])
                names = [k["name"] for k in after_add.json()["providers"][0]["keys"]]
                assert "dave" in names  # keys add + reload went through
                metrics = await http("GET", "/metrics", secrets["metrics"])
                assert metrics.status == 200
                assert b"router_requests_total" in metrics.body
                for path in ("/healthz", "/readyz"):
                    assert (await http("GET", path)).status == 200
            finally:
                await http.close()
        capture.add("redis contents", redis_contents(private_redis, prefix))
    # what happened is what the test meant to happen
    assert served[0] == ("modelscope", "alice", 200)
    assert any(provider == "bailian" and status == 200 for provider, _, status in served)
    assert served[-1][2] == 429
    log_text = "\n".join(text for where, text in capture.parts if where == "JSON log lines")
    records = [orjson.loads(line) for line in log_text.splitlines() if line.strip()]
    assert any("KEY DISABLED" in r["message"] for r in records)
    assert any(r["logger"] == "router.access" for r in records)
    # and nothing came out
    assert len(capture.parts) > 40
    for where, text in capture.parts:
        secrets.assert_absent(where, text)


# -- what an upstream receives -------------------------------------------------------------


@asynccontextmanager
async def recording_upstream(
    seen: list[CIMultiDict[str]], *, status: int = 200, echo: bool = False
) -> AsyncIterator[str]:
    """An OpenAI-type upstream that records the headers it gets. ``echo``: its answer
    repeats the Authorization it was sent (as some error pages do)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(CIMultiDict(request.headers))
        raw = await request.read()
        if echo:
            text = f"Invalid request for key {request.headers.get('Authorization')}"
            return web.json_response({"error": {"message": text, "type": "x"}}, status=status)
        body = orjson.loads(raw) if raw else {}
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "choices": []}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response(
            {
                "id": "chatcmpl-echo",
                "object": "chat.completion",
                "created": 1,
                "model": "upstream-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            },
            status=status,
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/embeddings", handle)
    async with running(app) as url:
        yield url


def upstream_config(base_url: str, secret: str, client_key: str, **extra: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"url": "memory://"},
            "providers": [
                {
                    "name": "up",
                    "type": "openai",
                    "base_url": base_url,
                    "models": ["upstream-model"],
                    "keys": [{"name": "k1", "secret": secret}],
                    **extra,
                }
            ],
            "clients": [{"name": "team", "key": client_key}],
            "retry": {"max_attempts": 1, "deadline_seconds": 10},
        }
    )


async def raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


# What an upstream may see: its own key, the body's type, and what aiohttp's client adds.
ALLOWED_UPSTREAM_HEADERS = {
    "host",
    "authorization",
    "content-type",
    "content-length",
    "accept",
    "accept-encoding",
    "user-agent",
}


async def test_upstream_gets_its_own_key_and_no_client_header(secrets: Secrets) -> None:
    upstream_secret, client_key = secrets["ms_alice"], secrets["client"]
    seen: list[CIMultiDict[str]] = []
    async with recording_upstream(seen) as upstream:
        settings = upstream_config(f"{upstream}/v1", upstream_secret, client_key)
        app = create_app(settings, registry=CollectorRegistry(), fetch_catalog=False)
        async with running(app) as url:
            port = int(url.rsplit(":", 1)[1])
            hostile = [
                ("Host", "gateway.example.com"),
                ("Authorization", f"Bearer {client_key}"),
                ("X-Api-Key", client_key),
                ("Cookie", "session=cookie-CANARY-1"),
                ("Proxy-Authorization", "Basic cHJveHktQ0FOQVJZ"),
                ("Connection", "close, X-Drop-Me"),
                ("Keep-Alive", "timeout=5, max=100"),
                ("TE", "trailers"),
                ("X-Drop-Me", "hop-by-hop by Connection"),
                ("X-Forwarded-For", "203.0.113.7"),
                ("Forwarded", "for=203.0.113.7;host=gateway.example.com"),
                ("X-Real-IP", "203.0.113.7"),
                ("Origin", "https://evil.example"),
                ("Referer", "https://evil.example/page"),
                ("User-Agent", "client-agent/9.9"),
                ("X-Request-Id", "client-request-1"),
                ("Content-Type", "application/json"),
            ]
            for stream in (False, True):
                body = orjson.dumps(
                    {"model": "upstream-model", "messages": MESSAGES, "stream": stream}
                )
                # the body chunked: the upstream must get a plain, re-framed request
                chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
                head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(
                    f"{name}: {value}\r\n" for name, value in hostile
                )
                raw = await raw_exchange(
                    port, head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + chunked
                )
                assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
            # an Upgrade request is not passed on either (aiohttp does not switch protocols)
            upgrade = await raw_exchange(
                port,
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n"
                b"Upgrade: h2c\r\nAuthorization: Bearer " + client_key.encode() + b"\r\n"
                b"Content-Length: 44\r\n\r\n"
                b'{"model": "upstream-model", "input": "abcd"}',
            )
            assert upgrade.split(b"\r\n", 1)[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request")
    assert len(seen) >= 2
    for headers in seen:
        names = {name.lower() for name in headers}
        assert names <= ALLOWED_UPSTREAM_HEADERS, names - ALLOWED_UPSTREAM_HEADERS
        assert headers.getall("Authorization") == [f"Bearer {upstream_secret}"]
        assert headers["Host"] == upstream.removeprefix("http://")
        assert headers["User-Agent"] == USER_AGENT
        assert "Transfer-Encoding" not in headers
        # the upstream's own key (checked above) is a CANARY-<uuid>: a uuid starting with "1"
        # would match "CANARY-1", so only the other headers are searched
        values = " ".join(v for k, v in headers.items() if k.lower() != "authorization")
        for leaked in (client_key, "cookie-CANARY-1", "203.0.113.7", "evil.example", "client-"):
            assert leaked not in values


async def test_an_upstream_that_echoes_its_key_does_not_hand_it_to_the_client(
    secrets: Secrets, caplog: pytest.LogCaptureFixture
) -> None:
    """A 400 passed through as is, and a 401 that disables the key: neither answer nor log
    repeats the upstream's key."""
    caplog.set_level(logging.DEBUG)
    upstream_secret, client_key = secrets["ms_alice"], secrets["client"]
    answers: list[str] = []
    for status in (400, 401):
        seen: list[CIMultiDict[str]] = []
        async with recording_upstream(seen, status=status, echo=True) as upstream:
            settings = upstream_config(f"{upstream}/v1", upstream_secret, client_key)
            app = create_app(settings, registry=CollectorRegistry(), fetch_catalog=False)
            async with (
                running(app) as url,
                aiohttp.ClientSession() as http,
                http.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "upstream-model", "messages": MESSAGES},
                    headers={"Authorization": f"Bearer {client_key}"},
                ) as response,
            ):
                body = await response.read()
                answers.append(f"{response.status} {dict(response.headers)} {body!r}")
                # 400: passed through as is; 401: the key is disabled, none is left
                assert response.status == (400 if status == 400 else 429), body
        assert seen, "the upstream was not called"
    for text in [*answers, caplog.text]:
        secrets.assert_absent("answer or log", text)


# -- keys: separation and comparison -------------------------------------------------------


def test_keys_are_compared_as_digests_against_every_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behaviour, not source: every comparison is of two 32-byte digests (so timing does not
    depend on where a guess differs or on its length), and every configured client is
    compared, whether the key matches the first, the last or none (no early exit)."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    keys = [f"sk-client-{i}-{'x' * (i + 1)}" for i in range(5)]
    auth = ClientAuth([ClientConfig(name=f"c{i}", key=k) for i, k in enumerate(keys)])
    for presented, expected in (
        (keys[0], "c0"),
        (keys[4], "c4"),
        ("sk-client-0-", None),  # a prefix
        (keys[0] + "y", None),  # an extension
        ("s", None),
        ("x" * 5000, None),
        ("\udcff\udcfe", None),  # invalid UTF-8 in a header (surrogate-escaped)
    ):
        calls.clear()
        headers = {"Authorization": f"Bearer {presented}"}
        if expected is None:
            with pytest.raises(Unauthorized, match="Invalid API key"):
                auth.authenticate(headers)
        else:
            assert auth.authenticate(headers) == expected
        assert calls == [(32, 32)] * len(keys), presented
    settings = Settings.model_validate(
        {
            "providers": [
                {
                    "name": "m",
                    "type": "modelscope",
                    "base_url": "http://x",
                    "keys": [{"name": "a", "secret": "s"}],
                }
            ],
            "clients": [{"name": f"c{i}", "key": k} for i, k in enumerate(keys)],
            "admin": {"key": "admin-key-1"},
        }
    )
    for presented in ("admin-key-1", keys[2], "nope"):
        calls.clear()
        with contextlib.suppress(RouterError):  # 401/403 expected: the calls are the point
            admin_module.authorize({"X-Api-Key": presented}, settings)
        assert calls == [(32, 32)] * (1 + len(keys)), presented


async def test_metrics_token_is_checked_like_a_key(secrets: Secrets) -> None:
    """Wrong, missing, other keys and invalid UTF-8 are all a 401, never a 500."""
    settings = Settings.model_validate(
        {
            "providers": [
                {
                    "name": "m",
                    "type": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "models": ["x"],
                    "keys": [{"name": "a", "secret": secrets["ms_alice"]}],
                }
            ],
            "clients": [{"name": "team", "key": secrets["client"]}],
            "metrics": {"token": secrets["metrics"]},
        }
    )
    app = create_app(settings, registry=CollectorRegistry(), fetch_catalog=False)
    async with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for value in (
            b"",
            b"Bearer " + secrets["client"].encode(),
            b"Bearer " + secrets["metrics"][:-1].encode(),
            b"Bearer \xff\xfe",
            b"Bearer \xed\xa0\x80",
        ):
            raw = await raw_exchange(
                port,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + (b"Authorization: " + value + b"\r\n" if value else b"")
                + b"\r\n",
            )
            assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
            assert b"invalid_metrics_token" in raw
        ok = await raw_exchange(
            port,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + secrets["metrics"].encode() + b"\r\n\r\n",
        )
        assert ok.startswith(b"HTTP/1.1 200"), ok[:200]


# -- TLS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path  # for 127.0.0.1 (IP SAN) only, signed by ca
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not on PATH")
    where = tmp_path_factory.mktemp("pki")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=modelscope-router test CA", cwd=where,
    )  # fmt: skip
    _openssl(
        "req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=where,
    )  # fmt: skip
    (where / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
        cwd=where,
    )  # fmt: skip
    return Pki(where / "ca.pem", where / "server.pem", where / "server.key")


async def test_an_upstream_with_an_untrusted_certificate_is_refused(
    pki: Pki, secrets: Secrets
) -> None:
    """TLS to upstreams is verified: an HTTPS upstream whose CA the system does not trust
    gets no request (the handshake fails); the client gets the gateway's 502."""
    seen: list[CIMultiDict[str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(CIMultiDict(request.headers))
        return web.json_response({"choices": []})

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(upstream, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        base = f"https://127.0.0.1:{port}/v1"
        # control: the upstream works for a client that trusts its CA
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{base}/chat/completions", json={}, ssl=trusting) as response,
        ):
            assert response.status == 200
        assert len(seen) == 1
        settings = upstream_config(base, secrets["ms_alice"], secrets["client"])
        app = create_app(settings, registry=CollectorRegistry(), fetch_catalog=False)
        async with running(app) as url, aiohttp.ClientSession() as http:
            async with http.post(
                f"{url}/v1/chat/completions",
                json={"model": "upstream-model", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {secrets['client']}"},
            ) as response:
                body = await response.json()
                assert response.status == 502, body
                assert body["error"]["type"] == "upstream_error"
                assert "connect" in body["error"]["message"]
            async with http.get(
                f"{url}/metrics", headers={"Authorization": f"Bearer {secrets['client']}"}
            ) as metrics:
                text = await metrics.text()
        assert len(seen) == 1, "the gateway's request reached the untrusted upstream"
        assert 'kind="transport_connect"' in text  # classified: refused before it went out
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(password="tls-redis-password-1", tls=RedisTls(pki.cert, pki.key, pki.ca))
    try:
        server.start()
    except RuntimeError as exc:  # a redis-server built without TLS refuses --tls-port
        server.close()
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    yield server
    server.close()


async def test_rediss_with_a_private_ca_in_the_url(tls_redis: RedisServer) -> None:
    """rediss:// verifies the server: with the CA given (?ssl_ca_certs=) it works; without
    it, or under a name the certificate does not carry, it does not. Errors hide the password."""
    url = tls_redis.url
    assert url.startswith("rediss://")
    assert "ssl_ca_certs=" in url
    store = RedisStore(url, prefix=f"tls-{uuid.uuid4().hex[:8]}")
    try:
        await store.ping()
        assert "tls-redis-password-1" not in repr(store)
    finally:
        await store.aclose()
    untrusted = url.split("?", 1)[0]  # the system CAs only
    wrong_name = url.replace("127.0.0.1", "localhost")  # the certificate names 127.0.0.1 only
    for bad in (untrusted, wrong_name):
        store = RedisStore(bad, prefix="tls-x", socket_timeout=3)
        try:
            with pytest.raises(StoreError) as refused:
                await store.ping()
            message = str(refused.value)
            assert "tls-redis-password-1" not in message
            assert "***" in message
            assert "certificate" in message.lower() or "ssl" in message.lower(), message
        finally:
            await store.aclose()


async def test_the_gateway_runs_on_rediss(tls_redis: RedisServer, secrets: Secrets) -> None:
    settings = Settings.model_validate(
        {
            "store": {"url": tls_redis.url, "prefix": f"tls-{uuid.uuid4().hex[:8]}"},
            "providers": [
                {
                    "name": "m",
                    "type": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "models": ["x"],
                    "keys": [{"name": "a", "secret": secrets["ms_alice"]}],
                }
            ],
        }
    )
    app = create_app(settings, registry=CollectorRegistry(), fetch_catalog=False)
    async with (
        running(app) as url,
        aiohttp.ClientSession() as http,
        http.get(f"{url}/readyz") as response,
    ):
        assert response.status == 200, await response.text()


def test_store_urls_are_masked_everywhere() -> None:
    """Both maskers (the store's, in errors; the report's, in check-config and serve's log)
    hide a password in the userinfo and in a ?password= query (?sentinel_password= too, and
    misspelt), on every topology, and keep the rest."""
    for url in (
        "redis://:CANARY-pw@127.0.0.1:6379/0",
        "redis://user:CANARY-pw@127.0.0.1:6379/0",
        "rediss://:CANARY-pw@redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem",
        "redis://127.0.0.1:6379/0?password=CANARY-pw",
        "rediss://127.0.0.1/0?ssl_ca_certs=/ca.pem&Password=CANARY-pw&db=1",
        "redis+cluster://:CANARY-pw@127.0.0.1:6379,127.0.0.1:6380",
        "rediss+cluster://CANARY-user:CANARY-pw@redis.internal:6379?password=CANARY-pw",
        "redis+sentinel://:CANARY-pw@127.0.0.1:6379/mymaster/0?sentinel_password=CANARY-pw",
        "rediss+sentinel://127.0.0.1:6379/mymaster?sentinel_pasword=CANARY-pw",  # misspelt
    ):
        shown = [mask_url(url)]
        if "pasword" not in url:  # a URL the store accepts: its repr (and errors) masked too
            shown.append(repr(RedisStore(url)))
        for masked in shown:
            assert "CANARY" not in masked, masked
            assert url.split("://")[0] in masked
            assert "6379" in masked or "redis.internal" in masked or "127.0.0.1/" in masked
    assert mask_url("sqlite:///quota.db") == "sqlite:///quota.db"
    assert mask_url("memory://") == "memory://"
