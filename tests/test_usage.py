"""Token usage: the pure reader (router/usage.py), then end to end through the gateway.

The reader's tests feed it the simulator's own bodies and streams (router/simulator/sse.py and
anthropic.py), cut at every byte, and anything hypothesis makes of a usage object. The end to
end tests run the simulator over real HTTP, the gateway in this process and the official
``openai`` and ``anthropic`` SDKs, and read ``router_tokens_total`` from GET /metrics.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.simulator import anthropic as sim_anthropic
from router.simulator import sse
from router.usage import MAX_HELD, UNKNOWN, StreamUsage, Usage, from_body

MODEL = "Qwen/Qwen3-32B"

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


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"usage": {"prompt_tokens": 1}', b"[" * 5000 + b"]" * 5000, b"\xff\xfe"],
)
def test_unreadable_bodies_have_no_usage(raw: bytes) -> None:
    assert from_body(raw) is None
    assert from_body(raw, anthropic=True) is None


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
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
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


def _valid(usage: Usage | None) -> bool:
    if usage is None:
        return True
    counts = (usage.prompt, usage.completion, usage.total, usage.cache_read, usage.cache_write)
    return all(type(n) is int and n >= 0 for n in counts) and not usage.estimated


@settings(max_examples=300, deadline=None)
@given(usage=JSON, padding=st.integers(min_value=0, max_value=1), anthropic=st.booleans())
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
