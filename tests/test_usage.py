"""Token usage: the pure reader (router/usage.py), then end to end through the gateway.

The reader's tests feed it the simulator's own bodies and streams (router/simulator/sse.py and
anthropic.py), cut at every byte, and anything hypothesis makes of a usage object. The end to
end tests run the simulator over real HTTP, the gateway in this process and the official
``openai`` and ``anthropic`` SDKs, and read ``router_tokens_total`` from GET /metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic as anthropic_sdk
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.calls import Trace, parse_call
from router.endpoints import CHAT, EMBEDDINGS, MESSAGES, passthrough
from router.routing import Route
from router.simulator import Simulator, sse
from router.simulator import anthropic as sim_anthropic
from router.usage import MAX_HELD, UNKNOWN, WHOLE_BODY_BYTES, StreamUsage, Usage, from_body
from tests.conftest import MODEL, GatewayClock, sim_config
from tests.support import CLIENT_KEY, gateway, gateway_config
from tests.test_metrics import parse, scrape

# -- the reader: non-stream bodies -----------------------------------------------------------

CHAT_BODY = sse.chat_completion("chatcmpl-1", 1, MODEL, "one two three", None, 7)
EMBEDDINGS_BODY = sse.embeddings_body(MODEL, ["a b", "c"], "")
MESSAGE_BODY = sim_anthropic.message(
    MODEL,
    "one two",
    {"input_tokens": 5, "cache_creation_input_tokens": 11, "cache_read_input_tokens": 13},
)


@pytest.mark.parametrize(
    ("body", "anthropic", "expected"),
    [
        (CHAT_BODY, False, Usage(prompt=7, completion=3, total=10)),
        (EMBEDDINGS_BODY, False, Usage(prompt=3, completion=0, total=3)),
        (MESSAGE_BODY, True, Usage(5, 2, 31, cache_read=13, cache_write=11)),
        # total_tokens missing: the sum; a count given as 12.0 is 12
        ({"usage": {"prompt_tokens": 12.0, "completion_tokens": 1}}, False, Usage(12, 1, 13)),
        # only the valid fields count; none valid is no usage
        ({"usage": {"prompt_tokens": "9", "completion_tokens": 4}}, False, Usage(0, 4, 4)),
        ({"usage": sse.BAD_USAGE}, False, None),
        ({"usage": sse.BAD_USAGE}, True, None),
        ({"usage": {"prompt_tokens": -1, "total_tokens": 2**60}}, False, None),
        ({"usage": {"prompt_tokens": True, "completion_tokens": 0.5}}, False, None),
        ({"usage": {"input_tokens": 3}}, True, Usage(3, 0, 3)),
        ({"usage": None}, False, None),
        ({"usage": [1, 2]}, False, None),
        ({"usage": "10 tokens"}, True, None),
        ({"choices": []}, False, None),
        ([{"usage": {"prompt_tokens": 1}}], False, None),  # not an object at the top
        (CHAT_BODY, True, None),  # OpenAI's fields are not Anthropic's
    ],
)
def test_usage_of_a_body(body: Any, anthropic: bool, expected: Usage | None) -> None:
    assert from_body(orjson.dumps(body), anthropic) == expected


def test_a_large_body_is_read_from_its_last_usage_object() -> None:
    """Past WHOLE_BODY_BYTES only the last "usage" object is parsed: braces in its strings,
    "usage":null later on, and escaped quotes in the content do not mislead it."""
    usage = {"prompt_tokens": 4, "completion_tokens": 1, "note": "}{", "details": {"a": 1}}
    content = 'he said \\"usage\\": {"prompt_tokens": 99}' + "x" * WHOLE_BODY_BYTES
    body = {"choices": [{"message": {"content": content}}], "usage": usage, "z": {"usage": None}}
    raw = orjson.dumps(body)
    assert len(raw) > WHOLE_BODY_BYTES
    assert from_body(raw) == Usage(4, 1, 5)
    assert from_body(raw[: raw.rindex(b"}")]) == Usage(4, 1, 5)  # the body's own end is not read
    assert from_body(raw.replace(b'"usage":{', b'"usage":[')) is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"usage": {"prompt_tokens": 1}', b"[" * 5000 + b"]" * 5000, b"\xff\xfe"],
)
def test_unreadable_bodies_have_no_usage(raw: bytes) -> None:
    assert from_body(raw) is None
    assert from_body(raw, anthropic=True) is None


FIELDS = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "usage",
        "x",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["}", "{", '"usage":{', "\\\\"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(FIELDS, inner, max_size=5),
    max_leaves=12,
)
#: Usage objects: mostly with some valid counts, among anything else.
USAGE = JSON | st.dictionaries(FIELDS, st.integers(min_value=0, max_value=10**6) | JSON)


def _valid(usage: Usage | None) -> bool:
    if usage is None:
        return True
    counts = (usage.prompt, usage.completion, usage.total, usage.cache_read, usage.cache_write)
    return all(type(n) is int and n >= 0 for n in counts) and not usage.estimated


@settings(max_examples=300, deadline=None)
@given(usage=USAGE, padding=st.integers(min_value=0, max_value=1), anthropic=st.booleans())
def test_any_usage_object_is_read_or_refused_never_raised(
    usage: Any, padding: int, anthropic: bool
) -> None:
    """Whatever an upstream puts in ``usage``, the reader answers a Usage of plain counts or
    None; a large body (read from its last "usage" key, not parsed whole) gives the same."""
    small = orjson.dumps({"id": "x", "usage": usage})
    got = from_body(small, anthropic)
    assert _valid(got)
    # Past WHOLE_BODY_BYTES (embeddings of many inputs), unless the usage object holds a
    # "usage" object of its own (the large body's reader would take that one).
    if padding and b'"usage":{' not in orjson.dumps(usage):
        big = {"data": [{"embedding": [0.25] * 20_000}], "usage": usage}
        assert from_body(orjson.dumps(big), anthropic) == got


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_any_bytes_are_read_or_refused_never_raised(raw: bytes) -> None:
    for anthropic in (False, True):
        assert _valid(from_body(raw, anthropic))
        reader = StreamUsage(anthropic=anthropic, strip=not anthropic)
        reader.feed(raw)
        reader.flush()
        assert reader.result().estimated or _valid(reader.result())


# -- the reader: streams -------------------------------------------------------------------


def openai_stream(include_usage: bool, crlf: bool = False) -> bytes:
    events = sse.stream_events(MODEL, 1, "one two three four", None, 5, 7, include_usage)
    data = b"".join(events)
    return data.replace(b"\n", b"\r\n") if crlf else data


def anthropic_stream() -> bytes:
    prompt = {"input_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 9}
    return b"".join(sim_anthropic.stream_events(MODEL, "one two three", prompt, 4))


def completion_id(stream: bytes) -> bytes:
    return stream[stream.index(b"chatcmpl-") :][:41]


def read(reader: StreamUsage, pieces: list[bytes]) -> bytes:
    passed = b"".join(reader.feed(piece) for piece in pieces)
    return passed + reader.flush()


def cuts_of(data: bytes) -> list[list[bytes]]:
    """``data`` cut in two at every byte, and in single bytes."""
    return [[data[:i], data[i:]] for i in range(len(data) + 1)] + [
        [data[i : i + 1] for i in range(len(data))]
    ]


USAGE_7_4 = Usage(prompt=7, completion=4, total=11)


@pytest.mark.parametrize("crlf", [False, True])
def test_a_usage_chunk_is_read_wherever_the_stream_is_cut(crlf: bool) -> None:
    data = openai_stream(include_usage=True, crlf=crlf)
    for pieces in cuts_of(data):
        reader = StreamUsage()
        assert read(reader, pieces) == data
        assert reader.result() == USAGE_7_4


@pytest.mark.parametrize("crlf", [False, True])
def test_the_usage_chunk_asked_for_the_client_is_taken_out_wherever_the_stream_is_cut(
    crlf: bool,
) -> None:
    """The stream the client gets is byte for byte the one the upstream sends without
    include_usage (each simulated stream has an id of its own: made the same here)."""
    asked = openai_stream(include_usage=True, crlf=crlf)
    plain = openai_stream(include_usage=False, crlf=crlf)
    plain = plain.replace(completion_id(plain), completion_id(asked))
    for pieces in cuts_of(asked):
        reader = StreamUsage(strip=True)
        assert read(reader, pieces) == plain
        assert reader.result() == USAGE_7_4


@pytest.mark.parametrize("crlf", [False, True])
def test_each_event_is_passed_on_as_soon_as_it_is_complete(crlf: bool) -> None:
    """Taking the usage chunk out holds back no more than an unfinished event: every event but
    the usage chunk comes out of the feed that completes it."""
    events = sse.stream_events(MODEL, 1, "one two three four", None, 5, 7, True)
    if crlf:
        events = [event.replace(b"\n", b"\r\n") for event in events]
    expected = [b"" if b'"usage"' in event else event for event in events]
    reader = StreamUsage(strip=True)
    assert [reader.feed(event) for event in events] == expected
    assert reader.flush() == b""
    # each event in two halves: the second brings the whole event out
    reader = StreamUsage(strip=True)
    halves = [(reader.feed(e[: len(e) // 2]), reader.feed(e[len(e) // 2 :])) for e in events]
    assert halves == [(b"", event) for event in expected]
    assert reader.flush() == b""


def test_anthropic_usage_merges_message_start_and_message_delta() -> None:
    data = anthropic_stream()
    for pieces in cuts_of(data):
        reader = StreamUsage(anthropic=True, strip=True)  # never strips Anthropic streams
        assert read(reader, pieces) == data
        assert reader.result() == Usage(5, 3, 17, cache_read=9, cache_write=0)


def test_a_stream_cut_before_its_usage_counts_what_it_reported_as_estimated() -> None:
    openai = openai_stream(include_usage=True)
    reader = StreamUsage(strip=True)
    reader.feed(openai[: openai.index(b'"usage"')])
    assert reader.result() is UNKNOWN
    assert Usage(estimated=True) == UNKNOWN
    anthropic = anthropic_stream()
    reader = StreamUsage(anthropic=True)
    reader.feed(anthropic[: anthropic.index(b"event: message_delta")])
    # message_start's figures: the input, and the 1 output token it reports
    assert reader.result() == Usage(5, 1, 15, cache_read=9, estimated=True)


def test_usage_null_in_every_chunk_is_not_parsed_nor_taken_out() -> None:
    """Bailian puts "usage":null in every chunk: those chunks stay, and only the usage-only
    chunk (choices empty, usage an object) is read and taken out."""
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null,"id":"a"}\n\n'
    spaced = b'data: {"choices": [], "usage" : null}\n\n'
    last = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
    reader = StreamUsage(strip=True)
    passed = read(reader, [chunk * 3, spaced, last, sse.DONE])
    assert passed == chunk * 3 + spaced + sse.DONE
    assert reader.result() == Usage(2, 1, 3)


def test_a_malformed_usage_chunk_is_still_taken_out_and_leaves_the_usage_unknown() -> None:
    events = sse.stream_events(MODEL, 1, "one two", None, 2, 7, True, bad_usage=True)
    reader = StreamUsage(strip=True)
    passed = read(reader, events)
    assert passed == b"".join(e for e in events if b'"usage"' not in e)
    assert reader.result() is UNKNOWN


def test_usage_on_a_chunk_with_choices_is_read_and_left_in_place() -> None:
    chunk = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":2,"total_tokens":5}}\n\n'
    reader = StreamUsage(strip=True)
    assert read(reader, [chunk, sse.DONE]) == chunk + sse.DONE
    assert reader.result() == Usage(2, 0, 5)


def test_an_event_that_never_ends_is_passed_on_not_buffered() -> None:
    """A stream with no event boundary (lone CR line ends, or one giant event) is held back
    only up to MAX_HELD bytes, then passed on as it is."""
    reader = StreamUsage(strip=True)
    piece = b"data: " + b"x" * 1000 + b"\r"
    passed = [reader.feed(piece) for _ in range(2 * MAX_HELD // len(piece))]
    assert sum(map(len, passed)) > MAX_HELD
    assert all(len(p) <= MAX_HELD + len(piece) for p in passed)
    reader = StreamUsage()
    for _ in range(2 * MAX_HELD // len(piece)):
        assert reader.feed(piece) == piece
    assert reader.result() is UNKNOWN


# -- the body sent upstream ------------------------------------------------------------------


def call_of(body: dict[str, Any], endpoint: Any = CHAT) -> Any:
    return parse_call(orjson.dumps(body), endpoint, Trace("t", time.monotonic()))


def sent(body: dict[str, Any], endpoint: Any = CHAT, model: str = MODEL) -> Any:
    """What the gateway sends upstream for ``body`` on a route to ``model``, parsed."""
    call = call_of(body, endpoint)
    route = Route(None, model)  # type: ignore[arg-type]  # body_for reads only the model
    return orjson.loads(call.body_for(route))


CHAT_STREAM = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def test_a_stream_that_did_not_ask_for_usage_asks_the_upstream() -> None:
    asked = {"include_usage": True}
    assert sent(CHAT_STREAM) == {**CHAT_STREAM, "stream_options": asked}
    # spliced into the client's own bytes: nothing else about them changes
    raw = b' {"stream": true,\n "messages": [{"role": "user", "content": "hi"}], "model": "m"}'
    call = parse_call(raw, CHAT, Trace("t", 0.0))
    body = call.body_for(Route(None, "m"))  # type: ignore[arg-type]
    assert body == b' {"stream_options":{"include_usage":true},' + raw[2:]
    # renamed on the way (Bailian's names), and the client's other stream options kept
    renamed = sent({**CHAT_STREAM, "stream_options": {"include_usage": False, "x": 1}}, model="m")
    assert renamed["model"] == "m"
    assert renamed["stream_options"] == {"include_usage": True, "x": 1}
    assert sent({**CHAT_STREAM, "stream_options": None})["stream_options"] == asked
    assert call_of(CHAT_STREAM).adds_usage
    assert not call_of({**CHAT_STREAM, "stream_options": asked}).adds_usage


@pytest.mark.parametrize(
    ("body", "endpoint"),
    [
        ({**CHAT_STREAM, "stream_options": {"include_usage": True}}, CHAT),
        ({**CHAT_STREAM, "stream_options": "yes"}, CHAT),  # for the upstream to judge
        ({**CHAT_STREAM, "stream": False}, CHAT),
        ({"model": MODEL, "input": "a", "stream": True}, EMBEDDINGS),
        ({**CHAT_STREAM, "max_tokens": 8}, MESSAGES),
        ({**CHAT_STREAM, "query": "q"}, passthrough("rerank")),
    ],
)
def test_other_bodies_go_upstream_unchanged(body: dict[str, Any], endpoint: Any) -> None:
    call = call_of(body, endpoint)
    assert not call.adds_usage
    assert call.body_for(Route(None, MODEL)) == call.raw  # type: ignore[arg-type]


# -- end to end: the gateway, the simulator and the SDKs ------------------------------------

SECRET = "ms-test-alice"
MESSAGES_HI: Any = [{"role": "user", "content": "hello there general"}]


@asynccontextmanager
async def served(clock: GatewayClock) -> AsyncIterator[tuple[Simulator, str]]:
    """The simulator, and the gateway in front of it with one ModelScope key (alice's), so an
    answer through the gateway and one straight from the simulator are alike."""
    async with Simulator(sim_config(100, 100), clock=clock.seconds) as sim:
        config = gateway_config(
            sim.modelscope_url, sim.bailian_url, tokens=[("alice", SECRET, 100)]
        )
        async with gateway(config, clock) as url:
            yield sim, url


async def tokens(url: str) -> tuple[dict[str, float], float]:
    """router_tokens_total by kind (client team, provider modelscope, the model), and
    router_tokens_estimated_total, from GET /metrics."""
    status, text = await scrape(url)
    assert status == 200
    by_kind: dict[str, float] = {}
    estimated = 0.0
    for (name, labels), number in parse(text).items():
        found = dict(labels)
        if name == "router_tokens_total":
            assert (found["client"], found["provider"]) == ("team", "modelscope")
            assert found["model"] == MODEL
            by_kind[found["kind"]] = by_kind.get(found["kind"], 0) + number
        elif name == "router_tokens_estimated_total":
            assert found == {"client": "team", "provider": "modelscope"}
            estimated += number
    return by_kind, estimated


def kinds(usage: Usage) -> dict[str, float]:
    return {kind: n for kind, n in usage.kinds() if n}


def chat_usage(usage: Any) -> Usage:
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def openai_to(url: str, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)


async def test_non_stream_chat_and_embeddings_count_the_upstreams_usage(
    gateway_clock: GatewayClock,
) -> None:
    async with served(gateway_clock) as (sim, url):
        direct, through = openai_to(sim.modelscope_url, SECRET), openai_to(f"{url}/v1")
        try:
            chat = await through.chat.completions.create(model=MODEL, messages=MESSAGES_HI)
            expected = await direct.chat.completions.create(model=MODEL, messages=MESSAGES_HI)
            assert chat.usage == expected.usage  # passed on as the simulator sent it
            assert chat.usage is not None
            assert chat.usage.prompt_tokens == 3  # the simulator counts words
            after_chat, _ = await tokens(url)
            inputs = ["a b", "c d e", "f"]
            embedded = await through.embeddings.create(model=MODEL, input=inputs)
        finally:
            await direct.close()
            await through.close()
        after_embeddings, estimated = await tokens(url)
    assert after_chat == kinds(chat_usage(chat.usage))
    assert embedded.usage.prompt_tokens == 6
    assert after_embeddings == {**after_chat, "prompt": after_chat["prompt"] + 6}
    assert estimated == 0


def normalised(chunks: list[Any]) -> list[dict[str, Any]]:
    """The chunks as dicts, with the stream's id made the same (each stream has its own)."""
    return [{**c.model_dump(), "id": "chatcmpl-x"} for c in chunks]


async def chunks_of(client: openai.AsyncOpenAI, **options: Any) -> list[Any]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES_HI, stream=True, **options
    )
    return [chunk async for chunk in stream]


async def test_streams_count_their_usage_and_keep_the_shape_their_client_asked_for(
    gateway_clock: GatewayClock,
) -> None:
    """Without stream_options the client gets no usage chunk, exactly the chunks the simulator
    sends such a client; with include_usage it gets the simulator's usage chunk. The gateway
    counts the same tokens for both."""
    asked = {"stream_options": {"include_usage": True}}
    async with served(gateway_clock) as (sim, url):
        direct, through = openai_to(sim.modelscope_url, SECRET), openai_to(f"{url}/v1")
        try:
            plain_direct = await chunks_of(direct)
            plain = await chunks_of(through)
            after_plain, _ = await tokens(url)
            asked_direct = await chunks_of(direct, **asked)
            with_usage = await chunks_of(through, **asked)
        finally:
            await direct.close()
            await through.close()
        after_both, estimated = await tokens(url)
    assert normalised(plain) == normalised(plain_direct)
    assert all(chunk.choices and chunk.usage is None for chunk in plain)
    assert normalised(with_usage) == normalised(asked_direct)
    last = with_usage[-1]
    assert last.choices == []
    assert last.usage is not None
    usage = chat_usage(last.usage)
    assert usage.prompt == 3
    assert usage.completion > 0
    assert after_plain == kinds(usage)
    assert after_both == {kind: 2 * n for kind, n in kinds(usage).items()}
    assert estimated == 0


async def test_a_stream_without_usage_is_passed_on_byte_for_byte(
    gateway_clock: GatewayClock,
) -> None:
    """The same, on the wire: the bytes a client that did not ask for usage receives are the
    simulator's own for such a client (ids aside)."""
    body = {"model": MODEL, "messages": MESSAGES_HI, "stream": True}
    async with served(gateway_clock) as (sim, url), aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            through = await r.read()
        headers = {"Authorization": f"Bearer {SECRET}"}
        async with http.post(
            f"{sim.modelscope_url}/chat/completions", json=body, headers=headers
        ) as r:
            direct = await r.read()
        counted, _ = await tokens(url)
    assert through == direct.replace(completion_id(direct), completion_id(through))
    assert counted["prompt"] == 3


async def test_ragged_streams_through_the_gateway(gateway_clock: GatewayClock) -> None:
    """CRLF line ends, events arriving in halves, the last one without its blank line (the
    simulator's ragged_sse): the client that did not ask for usage still gets the simulator's
    bytes for it, the one that asked gets the usage chunk, and the usage is read from both."""
    body = {"model": MODEL, "messages": MESSAGES_HI, "stream": True}
    asked = {**body, "stream_options": {"include_usage": True}}
    received: dict[str, bytes] = {}
    async with served(gateway_clock) as (sim, url), aiohttp.ClientSession() as http:
        sim.faults.add("ragged_sse", count=4)
        for name, sent_body in (("plain", body), ("asked", asked)):
            for where, address, key in (
                ("through", f"{url}/v1", CLIENT_KEY),
                ("direct", sim.modelscope_url, SECRET),
            ):
                headers = {"Authorization": f"Bearer {key}"}
                async with http.post(
                    f"{address}/chat/completions", json=sent_body, headers=headers
                ) as response:
                    assert response.status == 200
                    received[f"{name} {where}"] = await response.read()
        counted, estimated = await tokens(url)
    for name in ("plain", "asked"):
        through, direct = received[f"{name} through"], received[f"{name} direct"]
        assert through.endswith(b"data: [DONE]\r\n")  # a clean end, no error event
        assert through == direct.replace(completion_id(direct), completion_id(through))
    assert b'"usage"' not in received["plain through"]
    assert b'"usage"' in received["asked through"]
    assert counted["prompt"] == 2 * 3
    assert estimated == 0


async def test_anthropic_usage_is_counted_with_its_cache_tokens(
    gateway_clock: GatewayClock,
) -> None:
    """Through the anthropic SDK: a call that writes the prompt cache, then a stream that reads
    it; input, output, cache writes and reads are counted as the simulator reported them."""
    system: Any = [{"type": "text", "text": "a b c d", "cache_control": {"type": "ephemeral"}}]
    async with served(gateway_clock) as (_, url):
        client = anthropic_sdk.AsyncAnthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0)
        try:
            message = await client.messages.create(
                model=MODEL, max_tokens=64, system=system, messages=MESSAGES_HI
            )
            after_message, _ = await tokens(url)
            stream = await client.messages.create(
                model=MODEL, max_tokens=64, system=system, messages=MESSAGES_HI, stream=True
            )
            events = [event async for event in stream]
        finally:
            await client.close()
        after_stream, estimated = await tokens(url)
    first = message.usage
    assert (first.input_tokens, first.cache_creation_input_tokens) == (3, 4)
    assert after_message == {
        "prompt": 3,
        "completion": first.output_tokens,
        "cache_write": 4,
    }
    start = next(e for e in events if e.type == "message_start").message.usage
    delta = next(e for e in events if e.type == "message_delta").usage
    assert (start.input_tokens, start.cache_read_input_tokens) == (3, 4)
    assert after_stream == {
        "prompt": 6,
        "completion": first.output_tokens + delta.output_tokens,
        "cache_write": 4,
        "cache_read": 4,
    }
    assert estimated == 0


async def test_a_stream_cut_before_its_usage_is_counted_as_estimated(
    gateway_clock: GatewayClock,
) -> None:
    """Cut after two chunks: the OpenAI stream had reported nothing (no tokens counted), the
    Anthropic one its input (message_start); both are estimated. The clients see the cut as
    for any cut (tests/test_failover.py), and nothing else."""
    async with served(gateway_clock) as (sim, url):
        sim.faults.add("mid_stream_cut", count=2)
        through = openai_to(f"{url}/v1")
        claude = anthropic_sdk.AsyncAnthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0)
        try:
            with pytest.raises(openai.APIError, match="the upstream stream broke"):
                await chunks_of(through)
            after_openai = await tokens(url)
            stream = await claude.messages.create(
                model=MODEL, max_tokens=64, messages=MESSAGES_HI, stream=True
            )
            # The gateway's error event has Anthropic's shape: the SDK raises it.
            events: list[str] = []

            async def read_all() -> None:
                async for event in stream:
                    events.append(event.type)

            with pytest.raises(anthropic_sdk.APIError, match="the upstream stream broke"):
                await read_all()
        finally:
            await through.close()
            await claude.close()
        after_anthropic = await tokens(url)
    assert events == ["message_start", "content_block_start"]
    assert after_openai == ({}, 1)
    assert after_anthropic == ({"prompt": 3, "completion": 1}, 2)


@pytest.mark.parametrize("fault", ["no_usage", "bad_usage"])
async def test_missing_or_malformed_usage_never_fails_an_answer(
    gateway_clock: GatewayClock, fault: str
) -> None:
    """An upstream that reports no usage (one that ignores stream_options), or a malformed one:
    every answer is served whole, the stream ends with [DONE] and is counted as estimated,
    and a usage chunk the client did not ask for is still taken out."""
    async with served(gateway_clock) as (sim, url):
        sim.faults.add(fault, count=4)
        through = openai_to(f"{url}/v1")
        claude = anthropic_sdk.AsyncAnthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0)
        try:
            chat = await through.chat.completions.create(model=MODEL, messages=MESSAGES_HI)
            plain = await chunks_of(through)
            message = await claude.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES_HI)
            stream = await claude.messages.create(
                model=MODEL, max_tokens=64, messages=MESSAGES_HI, stream=True
            )
            events = [event async for event in stream]
        finally:
            await through.close()
            await claude.close()
        counted, estimated = await tokens(url)
        assert sim.faults.pending() == []
    assert chat.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in plain).startswith("sim reply")
    assert all(chunk.choices for chunk in plain)
    assert message.content
    assert events[-1].type == "message_stop"
    assert counted == {}
    assert estimated == 2  # the two streams
