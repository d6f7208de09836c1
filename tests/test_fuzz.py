"""Property-based fuzzing of the running gateway over real sockets.

The simulator and the gateway run once, on their own event loop in a background thread (so a
blocked or hung gateway cannot stop the client's own timeouts). Hypothesis then writes raw
HTTP/1.1 requests at it: every method, paths under /v1, /admin and elsewhere (encoded slashes,
dot segments, absolute-form targets, very long ones), garbage and oversized headers, bodies
that are not JSON, JSON of the wrong types, huge numbers, deep nesting, invalid UTF-8 and
bodies past ``server.max_body_bytes``; sent at once, slowly in small chunks, chunked, or cut
short (a Content-Length larger than the body, then the client closes).

Properties, per request:
- an answer (or, for a body cut short, a closed connection) within REQUEST_TIMEOUT: no hang;
- never a 5xx (the healthy simulator gives the gateway no reason for its 502/503/504);
- an error for a well-formed request is the gateway's JSON error shape (Anthropic's on
  /v1/messages); only requests aiohttp's HTTP parser refuses get its plain-text 400/431;
- a request the gateway refuses (a 4xx without ``x-router-provider``) reaches no upstream and
  spends no quota: the simulator's call count and the store's counters (``/admin/quota``)
  stay as they were; a 2xx served upstream is exactly one upstream call, and counted;
- no answer carries an upstream secret, and the gateway logs no unexpected error.
At the end /healthz and /readyz still answer 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import string
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import Settings
from router.demo import running
from router.quota.memory_store import MemoryStore
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from tests.support import CLIENT_KEY, gateway_config

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 5.0
ADMIN_KEY = "sk-fuzz-admin-key"
METRICS_TOKEN = "fuzz-metrics-token"
TOKENS = [("alice", "ms-fuzz-alice-0001"), ("bob", "ms-fuzz-bob-0002")]
BAILIAN_SECRET = "sk-fuzz-bailian-0003"
UPSTREAM_SECRETS = [s for _, s in TOKENS] + [BAILIAN_SECRET]
ROOMY = 1_000_000
CHAT_MODEL = "Qwen/Qwen3-32B"
EMBEDDING_MODEL = "Qwen/Qwen3-Embedding-8B"
# aiohttp's parser refuses a line past 8190 bytes and more than 128 headers (400/431).
LINE_LIMIT = 8190
HEADER_COUNT_LIMIT = 100
URL_CHARS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")
SINGLETON_HEADERS = ("content-type", "content-length", "host", "transfer-encoding", "user-agent")


# -- the gateway on its own thread -----------------------------------------------------------


class _ErrorRecords(logging.Handler):
    """Every ERROR-or-worse record logged while the gateway runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    # Errors the gateway logs on purpose, for the operator (here: the fuzz's admin key asked a
    # gateway started without a config file to reload).
    INTENDED = ("admin reload refused",)

    def emit(self, record: logging.LogRecord) -> None:
        # (aiohttp's refusals of malformed HTTP are WARNINGs: see router.logs)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info is None and any(part in text for part in self.INTENDED):
            return
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        self.records.append(text)


class Served:
    """The simulator and the gateway on a background event loop."""

    def __init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="fuzz-gateway", daemon=True)
        self._ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.failure: BaseException | None = None
        self.port = 0
        self.sim: Simulator | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())  # cancels and awaits whatever is left at the end
        except BaseException as exc:  # reported to the test thread
            self.failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tokens = [
            ModelScopeToken(secret=s, name=n, daily_limit=ROOMY, model_daily_limit=ROOMY)
            for n, s in TOKENS
        ]
        sim_config = SimulatorConfig(
            modelscope=ModelScopeConfig(tokens=tokens),
            bailian=BailianConfig(keys=[BailianKey(secret=BAILIAN_SECRET, name="main")]),
        )
        async with Simulator(sim_config) as sim:
            config = gateway_config(
                sim.modelscope_url,
                sim.bailian_url,
                tokens=[(n, s, ROOMY) for n, s in TOKENS],
                bailian=("main", BAILIAN_SECRET, None),
                model_daily_limit=ROOMY,
            )
            config["server"]["max_body_bytes"] = MAX_BODY
            config["admin"] = {"key": ADMIN_KEY}
            config["metrics"] = {"token": METRICS_TOKEN}
            app = create_app(
                Settings.model_validate(config),
                store=MemoryStore(),
                registry=CollectorRegistry(),
            )
            async with running(app) as url:
                self.sim = sim
                self.port = int(url.rsplit(":", 1)[1])
                self._ready.set()
                await self._stop.wait()

    def start(self) -> Served:
        self.thread.start()
        self._ready.wait(30)
        if self.failure is not None or not self.port:
            raise RuntimeError(f"the gateway did not start: {self.failure!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the gateway thread did not stop"
        assert self.failure is None, repr(self.failure)

    def calls(self) -> int:
        """API calls the simulator answered (successful, counted ones)."""
        assert self.sim is not None
        return int(self.sim.state.stats()["calls"])


@dataclass
class Client:
    """The test thread's own loop, and what the properties need between requests."""

    served: Served
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def port(self) -> int:
        return self.served.port

    def used(self) -> int:
        """Calls counted in the store today, every provider: from the admin API."""
        reply = self.run(exchange(self.port, raw_request("GET", "/admin/quota", ADMIN_HEADERS)))
        assert reply is not None, "/admin/quota did not answer"
        assert reply.status == 200, reply.body[:300]
        document = orjson.loads(reply.body)
        return sum(int(p["used"]) for p in document["providers"])


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    errors = _ErrorRecords()
    root = logging.getLogger()
    root.addHandler(errors)
    served = Served().start()
    made = Client(served)
    try:
        yield made
    finally:
        served.stop()
        made.loop.close()
        root.removeHandler(errors)
    assert errors.records == [], errors.records[:5]


# -- raw HTTP ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names; the last value wins
    body: bytes


def raw_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def parse_reply(data: bytes, head_only: bool) -> Reply:
    """One HTTP/1.1 answer (after any 100 Continue), read until the server closed."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete answer head: {data[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0"), status_line
        if int(status) >= 200:
            break
        data = rest  # 100 Continue: the real answer follows
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only:
        return Reply(int(status), headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, tail = b"", rest
        while True:
            size_line, _, tail = tail.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, tail = body + tail[:size], tail[size + 2 :]
        return Reply(int(status), headers, body)
    if "content-length" in headers:
        length = int(headers["content-length"])
        assert len(rest) >= length, f"answer body cut short: {len(rest)} of {length} bytes"
        return Reply(int(status), headers, rest[:length])
    return Reply(int(status), headers, rest)


async def exchange(
    port: int,
    head: bytes,
    body_parts: list[bytes] | None = None,
    *,
    delay: float = 0.0,
    cut: str | None = None,
    head_only: bool = False,
) -> Reply | None:
    """Send ``head`` (and ``body_parts``, ``delay`` s apart), read the whole answer.

    ``cut``: after a body shorter than its Content-Length, "cut" shuts the client's side and
    checks that the server closes the connection in time; "gone" aborts the connection (an
    RST). Both return None.
    """
    async with asyncio.timeout(REQUEST_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            for part in body_parts or []:
                await writer.drain()
                await asyncio.sleep(delay)
                writer.write(part)
            if cut == "gone":  # the client vanishes mid-body (an RST), reads nothing
                await writer.drain()
                writer.transport.abort()
                return None
            if cut == "cut":
                await writer.drain()
                with contextlib.suppress(OSError):
                    writer.transport.write_eof()  # half-close: "that was all of it"
                data = await reader.read()
                data = data.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
                assert data == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", data), data[:200]
                return None
            await writer.drain()
            data = await reader.read()
        except OSError:  # ConnectionResetError, BrokenPipeError
            # The server may refuse and close while the client is still sending (a huge
            # header or body); what it answered may still be readable, or lost with the RST.
            data = await _whatever_arrived(reader)
            if b"\r\n\r\n" not in data:
                return None  # the answer was lost with the RST (or never written)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return parse_reply(data, head_only)


async def _whatever_arrived(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except OSError:
        return b""


# -- what hypothesis draws -------------------------------------------------------------------

AUTH = (("Authorization", f"Bearer {CLIENT_KEY}"),)
ADMIN_HEADERS = (("Authorization", f"Bearer {ADMIN_KEY}"),)

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
ODD_METHODS = ["CONNECT", "TRACE", "PROPFIND", "FOO", "get", "P0ST", "GET(", "PO ST", ""]
PATHS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/messages",
    "/v1/images/generations",
    "/v1/tasks/abc123",
    "/v1/tasks/../../admin/quota",
    "/v1/completions",
    "/v1/audio/speech",
    "/v1/chat%2Fcompletions",
    "/v1/chat/completions/",
    "/v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/../admin/quota",
    "/v1/%2e%2e/admin/quota",
    "/v1/chat/completions%00",
    "/v1/chat/completions?stream=true&model=x",
    "/v1/" + "a/" * 50,
    "/v1",
    "/v2/chat/completions",
    "/admin/quota",
    "/admin/clients",
    "/admin/openapi.json",
    "/admin/reload",
    "/admin/keys/modelscope/alice/reset",
    "/admin/keys/modelscope/nobody/disable",
    "/admin/keys/%2e%2e/alice/enable",
    "/admin/../metrics",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "*",
    "http://127.0.0.1:{sim}/_sim/stats",  # absolute form: no open proxy
    "//127.0.0.1:{sim}/v1/models",
]
MESSAGES = [{"role": "user", "content": "hi"}]

path_chars = st.characters(codec="ascii", exclude_characters=" \r\n", min_codepoint=0x21)
random_paths = st.text(path_chars, min_size=0, max_size=40).map(lambda s: "/" + s)
long_paths = st.integers(100, 12_000).map(lambda n: "/v1/" + "x" * n)
encoded_paths = st.lists(
    st.sampled_from(["%2F", "%2e", "%00", "%ff", "%", "..", "/", "v1", "%5C", "\\"]), max_size=8
).map(lambda parts: "/v1/" + "".join(parts))
paths = st.one_of(st.sampled_from(PATHS), st.sampled_from(PATHS), random_paths, encoded_paths)

header_text = st.text(st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=60)
printable = st.text(
    st.characters(codec="ascii", min_codepoint=0x21, max_codepoint=0x7E), max_size=60
)
sane_auth = st.one_of(
    st.just(AUTH),
    st.just([("X-Api-Key", CLIENT_KEY)]),
    st.just(ADMIN_HEADERS),
    st.just([("Authorization", f"Bearer {METRICS_TOKEN}")]),
    st.just([]),
    printable.map(lambda v: [("Authorization", "Bearer " + v)]),
    printable.map(lambda v: [("X-Api-Key", v)]),
    st.just([("Authorization", f"Basic {CLIENT_KEY}")]),
    st.just([("Authorization", f"Bearer {CLIENT_KEY}"), ("Authorization", "Bearer x")]),
)
odd_auth = st.one_of(
    header_text.map(lambda v: [("Authorization", v)]),  # control bytes, latin-1, spaces
    header_text.map(lambda v: [("Authorization", f"Bearer {CLIENT_KEY}" + v)]),
    st.integers(9000, 20_000).map(lambda n: [("Authorization", "Bearer " + "k" * n)]),
)
sane_extras = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["X-Request-Id", "Accept", "Cookie", "User-Agent"]), printable),
        st.tuples(st.just("Content-Type"), st.sampled_from(["application/json", "text/plain"])),
        st.tuples(st.just("Expect"), st.just("100-continue")),
        st.tuples(st.just("X-Forwarded-For"), st.just("203.0.113.9")),
    ),
    max_size=3,
).map(lambda headers: list({name: (name, value) for name, value in headers}.values()))
odd_extras = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["X-Request-Id", "Content-Type", "Cookie"]), header_text),
        st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "nonsense"])),
        st.tuples(st.just("Connection"), st.sampled_from(["keep-alive", "Upgrade", "TE"])),
        st.tuples(st.just("Upgrade"), st.sampled_from(["websocket", "h2c"])),
        st.tuples(st.just("TE"), st.just("trailers")),
        st.tuples(st.just("X-Huge"), st.integers(9000, 70_000).map(lambda n: "h" * n)),
        st.tuples(st.text("abcXYZ-_", min_size=1, max_size=20), header_text),
    ),
    min_size=1,
    max_size=4,
)
many_headers = st.integers(150, 400).map(lambda n: [(f"X-H{i}", "v") for i in range(n)])

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
models = st.one_of(
    st.sampled_from([CHAT_MODEL, EMBEDDING_MODEL, "qwen3-32b", "Qwen/Qwen-Image"]),
    json_values,
    st.text(max_size=300),
)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits: orjson will not write it
        return repr(value).encode()


chat_bodies = st.builds(
    lambda model, messages, stream, extra: _dumps(
        {"model": model, "messages": messages, "stream": stream, **extra}
    ),
    models,
    st.one_of(st.just(MESSAGES), json_values),
    st.one_of(st.booleans(), json_values),
    st.dictionaries(st.sampled_from(["max_tokens", "temperature", "n", "input"]), json_values),
)
valid_bodies = st.one_of(
    st.builds(
        lambda stream: _dumps({"model": CHAT_MODEL, "messages": MESSAGES, "stream": stream}),
        st.booleans(),
    ),
    st.just(_dumps({"model": EMBEDDING_MODEL, "input": "hello"})),
    st.just(_dumps({"model": CHAT_MODEL, "max_tokens": 8, "messages": MESSAGES})),
)
deep_bodies = st.builds(
    lambda n, opener: opener * n + {b"[": b"]", b'{"a":': b"}"}[opener] * n,
    st.integers(1, 200_000),
    st.sampled_from([b"[", b'{"a":']),
)
huge_numbers = st.sampled_from(
    [
        b'{"model": 1e999999, "messages": []}',
        b'{"model": "Qwen/Qwen3-32B", "messages": [{"role": "user", "content": "x"}], '
        b'"max_tokens": 99999999999999999999999999999999999999}',
        b'{"model": "Qwen/Qwen3-32B", "messages": [1], "stream": NaN}',
        b'{"model": -0.0e-99999, "input": Infinity}',
        b'{"model": "' + b"9" * 5000 + b'"}',
    ]
)
bodies = st.one_of(
    st.none(),
    valid_bodies,
    valid_bodies,
    chat_bodies,
    st.builds(_dumps, json_values),
    st.binary(max_size=300),  # mostly not JSON, often not UTF-8
    st.builds(lambda b: b'{"model": "' + b + b'", "messages": []}', st.binary(max_size=40)),
    deep_bodies,
    huge_numbers,
    st.integers(MAX_BODY - 64, MAX_BODY + 4096).map(
        lambda n: (
            b'{"model": "Qwen/Qwen3-32B", "messages": [{"role": "user", "content": "'
            + b"x" * n
            + b'"}]}'
        )
    ),
    st.integers(1, 40_000).map(lambda n: _dumps({"model": "m" * n, "messages": MESSAGES})),
)
DELIVERIES = ["whole", "whole", "whole", "whole", "slow", "chunked", "cut", "gone"]


@dataclass
class Case:
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    body: bytes | None
    delivery: str

    @property
    def path(self) -> str:
        target = self.target
        if "://" in target:
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        return target.split("?", 1)[0]

    def malformed(self) -> bool:
        """Whether aiohttp's HTTP parser (not the gateway) may refuse this with a text/plain 400.

        Conservative: a request this says is well-formed must get the gateway's JSON errors.
        """
        if self.method not in METHODS and self.method not in ("CONNECT", "TRACE", "PROPFIND"):
            return True
        if self.method == "CONNECT" or self.target.startswith("//") or self.target == "*":
            return True
        target = self.target.replace("{sim}", "1")
        if len(target) > LINE_LIMIT - 100 or not set(target) <= URL_CHARS:
            return True  # aiohttp's "Invalid char in url path" for \x7f, \\, {, | and the like
        if len(self.headers) >= HEADER_COUNT_LIMIT:
            return True
        names = [name.lower() for name, _ in self.headers]
        if any(names.count(name) > 1 for name in SINGLETON_HEADERS):
            return True  # "Duplicate 'Content-Type' header found."
        for name, value in self.headers:
            if len(name) + len(value) > LINE_LIMIT - 100 or not value.isascii():
                return True
            if value != value.strip() or any(c < " " and c != "\t" for c in value):
                return True
            if name.lower() in ("expect", "upgrade", "connection", "te"):
                return True  # aiohttp's own Expect/Upgrade handling answers before routing
        return False


API_PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/images/generations"]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """API calls with a client key (half), any route, and protocol-level garbage."""
    kind = draw(st.sampled_from(["api", "api", "route", "garbage"]))
    if kind == "api":
        method, target = "POST", draw(st.sampled_from(API_PATHS))
        auth = draw(st.sampled_from([AUTH, (("X-Api-Key", CLIENT_KEY),)]))
        headers = [*auth, *draw(sane_extras)]  # (never += on a shared list)
        body = draw(st.one_of(valid_bodies, valid_bodies, chat_bodies, bodies))
    elif kind == "route":
        method, target = draw(st.sampled_from(METHODS)), draw(paths)
        headers = [*draw(sane_auth), *draw(sane_extras)]
        body = draw(bodies) if method not in ("GET", "HEAD") or draw(st.booleans()) else None
    else:
        method = draw(st.sampled_from(METHODS) | st.sampled_from(ODD_METHODS))
        target = draw(paths | long_paths | random_paths)
        headers = [*draw(sane_auth | odd_auth), *draw(odd_extras)]
        if draw(st.booleans()):
            headers += draw(many_headers)
        body = draw(bodies)
    delivery = draw(st.sampled_from(DELIVERIES)) if body else "whole"
    return Case(method, target, headers, body, delivery)


# -- sending a case and checking the properties ----------------------------------------------


def send(client: Client, case: Case) -> Reply | None:
    target = case.target.replace("{sim}", str(client.served.sim.modelscope_port))  # type: ignore[union-attr]
    head_lines = [f"{case.method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    head_lines += [f"{name}: {value}" for name, value in case.headers]
    body = case.body or b""
    parts: list[bytes] = []
    delay = 0.0
    if case.delivery == "chunked":
        head_lines.append("Transfer-Encoding: chunked")
        step = max(1, len(body) // 3)
        parts = [
            f"{len(body[i : i + step]):x}\r\n".encode() + body[i : i + step] + b"\r\n"
            for i in range(0, len(body), step)
        ] + [b"0\r\n\r\n"]
    elif case.body is not None:
        declared = len(body) + (17 if case.delivery in ("cut", "gone") else 0)
        head_lines.append(f"Content-Length: {declared}")
        if case.delivery == "slow":  # at most 5 pieces, 20 ms apart: bounded
            step = max(1, -(-len(body) // 5))
            parts = [body[i : i + step] for i in range(0, len(body), step)]
            delay = 0.02
        else:
            parts = [body]
    head_lines.append("Connection: close")
    head = "\r\n".join(head_lines).encode("latin-1") + b"\r\n\r\n"
    if case.delivery != "slow" and case.delivery != "chunked":
        head, parts = head + b"".join(parts), []
    return client.run(
        exchange(
            client.port,
            head,
            parts,
            delay=delay,
            cut=case.delivery if case.delivery in ("cut", "gone") else None,
            head_only=case.method == "HEAD",
        )
    )


def is_gateway_error(body: bytes, anthropic: bool) -> bool:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(document, dict) or not isinstance(document.get("error"), dict):
        return False
    error = document["error"]
    if anthropic:
        return document.get("type") == "error" and {"type", "message"} <= set(error)
    return set(document) == {"error"} and set(error) == {"message", "type", "param", "code"}


def check(client: Client, case: Case) -> None:
    calls, used = client.served.calls(), client.used()
    reply = send(client, case)
    if reply is None:
        # The client cut its body short, or the server refused and reset the connection
        # while a huge request was still being sent. Either way nothing may have been spent.
        # (a slow or chunked sender can be answered early, e.g. 401 before the body, and
        # reset while it still writes: the answer may be lost with the RST)
        oversized = len(case.body or b"") > MAX_BODY
        early = case.delivery in ("slow", "chunked")
        assert case.delivery in ("cut", "gone") or case.malformed() or oversized or early, case
        assert (client.served.calls(), client.used()) == (calls, used)
        return
    assert reply.status < 500, (reply.status, reply.body[:300])
    event(f"{reply.status} {'upstream' if 'x-router-provider' in reply.headers else 'gateway'}")
    for secret in UPSTREAM_SECRETS:
        assert secret.encode() not in reply.body
        assert secret not in str(reply.headers)
    upstream = "x-router-provider" in reply.headers
    if reply.status >= 400 and case.method != "HEAD" and not upstream:
        # every error on /v1/messages is in Anthropic's shape, its 405s too; a CONNECT's target
        # is an authority, not a path (aiohttp hands the gateway the path ".")
        anthropic = case.path == "/v1/messages" and case.method != "CONNECT"
        gateway_shaped = is_gateway_error(reply.body, anthropic=anthropic)
        if not case.malformed():
            assert gateway_shaped, (reply.status, reply.headers, reply.body[:300])
        elif not gateway_shaped:  # aiohttp's parser refused it before the gateway saw it
            assert reply.status in (400, 413, 417, 431), (reply.status, reply.body[:300])
            assert b"Traceback" not in reply.body
    calls_after, used_after = client.served.calls(), client.used()
    if not upstream:
        # the gateway answered itself: a refusal, or something that is no API call
        assert calls_after == calls, (case, reply.status)
        if reply.status >= 400:
            assert used_after == used, (case, reply.status, reply.body[:300])
    elif 200 <= reply.status < 300:
        # One call upstream, counted. The count may jump by more: after a fuzzed admin
        # reset, the upstream's remaining header raises it back to what the upstream counted.
        assert calls_after == calls + 1, (case, reply.status)
        assert used_after >= used + 1, (case, reply.status)
    else:  # the upstream's own refusal, returned as is: the upstream counted no call
        assert calls_after == calls


# FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the file well under 20 s.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


@FUZZ
@given(case=cases())
@example(case=Case("POST", "/v1/chat/completions", AUTH, _dumps({"model": CHAT_MODEL}), "cut"))
@example(
    case=Case(
        "POST",
        "/v1/chat/completions",
        AUTH,
        _dumps({"model": CHAT_MODEL, "messages": MESSAGES, "stream": True}),
        "slow",
    )
)
@example(case=Case("POST", "/admin/keys/modelscope/alice/disable", ADMIN_HEADERS, b"{", "cut"))
@example(case=Case("POST", "/v1/embeddings", AUTH, _dumps({"model": "x", "input": "y"}), "gone"))
@example(case=Case("GET", "/metrics", [("Authorization", "Bearer \xff\xfe")], None, "whole"))
@example(case=Case("GET", "http://127.0.0.1:{sim}/_sim/stats", AUTH, None, "whole"))
@example(case=Case("POST", "/v1/chat/completions", AUTH, b"[" * 100_000, "chunked"))
def test_gateway_survives_whatever_it_is_sent(client: Client, case: Case) -> None:
    check(client, case)


VALID_CALLS = [
    ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": MESSAGES}, ()),
    ("/v1/chat/completions", {"model": "qwen3-32b", "messages": MESSAGES}, ()),
    ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": ["a", "b"]}, ()),
    ("/v1/messages", {"model": CHAT_MODEL, "max_tokens": 8, "messages": MESSAGES}, ()),
    (
        "/v1/images/generations",
        {"model": "Qwen/Qwen-Image", "prompt": "a cat"},
        (("X-ModelScope-Async-Mode", "true"),),
    ),
]


@settings(FUZZ, max_examples=60)
@given(
    call=st.sampled_from(VALID_CALLS),
    stream=st.booleans(),
    auth=st.sampled_from([AUTH, (("X-Api-Key", CLIENT_KEY),)]),
    extras=sane_extras,
    delivery=st.sampled_from(["whole", "slow", "chunked"]),
)
def test_valid_calls_are_served_and_counted(
    client: Client,
    call: tuple[str, dict[str, Any], tuple[tuple[str, str], ...]],
    stream: bool,
    auth: tuple[tuple[str, str], ...],
    extras: list[tuple[str, str]],
    delivery: str,
) -> None:
    """The same properties on traffic that must succeed, delivered whole, slowly or chunked."""
    path, payload, needed = call
    if path in ("/v1/chat/completions", "/v1/messages"):
        payload = {**payload, "stream": stream}
    case = Case("POST", path, [*auth, *needed, *extras], _dumps(payload), delivery)
    if any(name == "Content-Type" for name, _ in extras):
        case.headers = [h for h in case.headers if h[0] != "Content-Type"]
    calls, used = client.served.calls(), client.used()
    reply = send(client, case)
    assert reply is not None
    if reply.status == 429:  # the fuzz above disabled every key through the admin API
        assert is_gateway_error(reply.body, anthropic=path == "/v1/messages")
        return
    assert reply.status == 200, (case, reply.body[:300])
    assert "x-router-provider" in reply.headers
    assert client.served.calls() == calls + 1
    assert client.used() >= used + 1  # more only to catch up after a fuzzed admin reset
    check(client, case)  # and the general properties, on a second identical request


def test_health_after_fuzzing(client: Client) -> None:
    """Runs after the fuzz (file order): the gateway still serves, and serves correctly."""
    for path in ("/healthz", "/readyz"):
        reply = client.run(exchange(client.port, raw_request("GET", path)))
        assert reply is not None
        assert reply.status == 200, reply.body
    payload = _dumps({"model": CHAT_MODEL, "messages": MESSAGES})
    reply = client.run(
        exchange(client.port, raw_request("POST", "/v1/chat/completions", AUTH, payload))
    )
    assert reply is not None
    # served, or refused in shape if the fuzz disabled every key through the admin API
    assert reply.status in (200, 429), reply.body


def test_a_listening_socket_is_not_held_by_idle_connections(client: Client) -> None:
    """Connections that send nothing do not stop others from being served (bounded: 50)."""
    idle = [socket.create_connection(("127.0.0.1", client.port)) for _ in range(50)]
    try:
        reply = client.run(exchange(client.port, raw_request("GET", "/healthz")))
        assert reply is not None
        assert reply.status == 200
    finally:
        for sock in idle:
            sock.close()
