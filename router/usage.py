"""Token usage as the upstreams report it, read from their answers. Pure.

- A non-stream answer: the body's ``usage`` (``from_body``): OpenAI's ``prompt_tokens``,
  ``completion_tokens`` and ``total_tokens`` (chat completions, embeddings), or Anthropic's
  ``input_tokens``, ``output_tokens``, ``cache_creation_input_tokens`` and
  ``cache_read_input_tokens`` (/v1/messages).
- A stream (``StreamUsage``), fed chunk by chunk as the relay passes it on: OpenAI's chunk
  that carries ``usage`` (the last one, with ``choices: []``, when the request had
  ``stream_options.include_usage``), or Anthropic's ``message_start`` (input usage) and
  ``message_delta`` (output usage, cumulative). When the gateway asked for the usage chunk on
  the client's behalf, ``StreamUsage(strip=True)`` also takes that chunk out of what the client
  gets.

Nothing here raises on what an upstream sends: a usage that is missing or malformed is None
(or, in a stream, leaves the usage ``estimated``). The kinds are disjoint: for Anthropic,
``input_tokens`` excludes the cache reads and writes, which are counted apart; OpenAI's
``prompt_tokens`` is the whole input (its cached part is not read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

#: The key looked for before any JSON is parsed.
USAGE_KEY = b'"usage"'
#: A non-stream body up to this size is parsed whole; a larger one (embeddings of many inputs)
#: only from its last ``"usage"`` key: parsing a 2 MB embeddings answer took 7 ms of CPU.
WHOLE_BODY_BYTES = 64 * 1024
#: Closing braces tried for the end of a large body's usage object (it has a few).
MAX_CLOSING_BRACES = 64
#: Bytes of one unfinished SSE line (or, when stripping, event) kept across chunks: a usage
#: line is far shorter; a longer one is passed on (or dropped from the scan) as it is.
MAX_HELD = 1024 * 1024
#: A count past this is not a token count (JSON allows any number).
MAX_TOKENS = 2**53

_ANTHROPIC_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens of one answer. ``estimated``: a stream ended before its usage was complete,
    so these are only the figures it had reported (zero when it reported none)."""

    prompt: int = 0
    completion: int = 0
    total: int = 0
    cache_read: int = 0
    cache_write: int = 0
    estimated: bool = False

    def kinds(self) -> tuple[tuple[str, int], ...]:
        """(kind, tokens) for the ``router_tokens_total`` counter: disjoint, no total."""
        return (
            ("prompt", self.prompt),
            ("completion", self.completion),
            ("cache_read", self.cache_read),
            ("cache_write", self.cache_write),
        )


#: A stream that reported nothing about its usage.
UNKNOWN = Usage(estimated=True)


def _count(value: Any) -> int | None:
    """A token count, or None for anything that is not one (bools, negatives, fractions)."""
    if type(value) is int:
        return value if 0 <= value <= MAX_TOKENS else None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_TOKENS:
        return int(value)
    return None


def openai_usage(raw: Any) -> Usage | None:
    """OpenAI's ``usage`` object; None when it holds no valid count."""
    if not isinstance(raw, dict):
        return None
    prompt = _count(raw.get("prompt_tokens"))
    completion = _count(raw.get("completion_tokens"))
    total = _count(raw.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    return Usage(prompt, completion, prompt + completion if total is None else total)


def _anthropic_counts(raw: Any) -> dict[str, int]:
    """The valid counts of an Anthropic ``usage`` object, by field."""
    if not isinstance(raw, dict):
        return {}
    counts = {}
    for name in _ANTHROPIC_FIELDS:
        value = _count(raw.get(name))
        if value is not None:
            counts[name] = value
    return counts


def _anthropic(counts: dict[str, int], estimated: bool = False) -> Usage | None:
    if not counts:
        return None
    prompt = counts.get("input_tokens", 0)
    completion = counts.get("output_tokens", 0)
    write = counts.get("cache_creation_input_tokens", 0)
    read = counts.get("cache_read_input_tokens", 0)
    return Usage(prompt, completion, prompt + completion + write + read, read, write, estimated)


def anthropic_usage(raw: Any) -> Usage | None:
    """Anthropic's ``usage`` object; None when it holds no valid count."""
    return _anthropic(_anthropic_counts(raw))


def from_body(body: bytes, anthropic: bool = False) -> Usage | None:
    """The usage of a non-stream answer's body; None when it has none that can be read."""
    if len(body) > WHOLE_BODY_BYTES:
        raw = _last_usage_object(body)
    else:
        try:
            data = orjson.loads(body)
        except ValueError:  # orjson.JSONDecodeError, also for too deep nesting
            return None
        raw = data.get("usage") if isinstance(data, dict) else None
    return anthropic_usage(raw) if anthropic else openai_usage(raw)


#: A ``"usage"`` key with an object for its value (not the null some upstreams put in every
#: chunk): looked for only in bytes that hold ``"usage"``.
_USAGE_OBJECT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')


def _last_usage_object(body: bytes) -> Any:
    """The object of the body's last ``"usage"`` key that has one (a large body is not parsed
    whole): the top-level usage, unless a later object holds a ``"usage"`` object of its own.

    In JSON text ``"usage"`` followed by a colon is a key: inside a string its quotes would be
    escaped. The object ends at the first of its closing braces up to which it parses (a brace
    inside one of its strings leaves it unfinished); past MAX_CLOSING_BRACES it is None.
    """
    at = len(body)
    while True:
        at = body.rfind(USAGE_KEY, 0, at)
        if at < 0:
            return None
        key = _USAGE_OBJECT.match(body, at)
        if key is not None:
            break
    start = close = key.end() - 1  # the object's "{"
    for _ in range(MAX_CLOSING_BRACES):
        close = body.find(b"}", close + 1)
        if close < 0:
            return None
        try:
            return orjson.loads(body[start : close + 1])
        except ValueError:
            continue
    return None


def _last_boundary(data: bytes) -> int:
    """The end of the last complete SSE event in ``data`` (after its blank line); 0 if none."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _event_bounds(region: bytes, low: int, at: int) -> tuple[int, int]:
    """The event of ``region`` (which ends at an event boundary) holding byte ``at``."""
    lf, crlf = region.rfind(b"\n\n", low, at), region.rfind(b"\n\r\n", low, at)
    start = max(low, lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
    lf, crlf = region.find(b"\n\n", at), region.find(b"\n\r\n", at)
    ends = [i + n for i, n in ((lf, 2), (crlf, 3)) if i >= 0]
    return start, min(ends, default=len(region))


class StreamUsage:
    """The usage of one SSE stream, read from the chunks as they pass (``feed``).

    Only a line that holds ``"usage"`` with an object for its value is parsed, so the cost of
    most chunks is a byte search or two (bench/usage_scan.py measures it). A line split across
    chunks is kept until its end arrives. With ``strip``, an OpenAI chunk that carries usage
    and no choices is taken out of the stream: the bytes of an unfinished event are held back
    until the event is complete (an SSE client cannot use half an event anyway), so that chunk
    can be dropped whole.
    """

    __slots__ = ("_anthropic", "_counts", "_done", "_held", "_openai", "_strip")

    def __init__(self, *, anthropic: bool = False, strip: bool = False) -> None:
        self._anthropic = anthropic
        self._strip = strip and not anthropic
        self._held = b""  # an unfinished line (reading) or event (stripping)
        self._openai: Usage | None = None
        self._counts: dict[str, int] = {}  # Anthropic's, merged from message_start and _delta
        self._done = False  # the usage that closes the stream was read

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` to pass on (all of them unless stripping)."""
        if self._strip:
            return self._feed_stripping(chunk)
        if not self._held and chunk.endswith(b"\n"):  # whole lines: the common case
            if USAGE_KEY in chunk:
                self._read(chunk)
            return chunk
        end = chunk.rfind(b"\n") + 1
        if not end:  # a line longer than MAX_HELD is no usage line: its rest is not read
            held = len(self._held) + len(chunk)
            self._held = self._held + chunk if held <= MAX_HELD else b""
            return chunk
        if self._held:
            lines = self._held + chunk[:end]
            if USAGE_KEY in lines:
                self._read(lines)
        elif chunk.find(USAGE_KEY, 0, end) >= 0:
            self._read(chunk[:end])
        self._held = chunk[end:] if len(chunk) - end <= MAX_HELD else b""
        return chunk

    def _feed_stripping(self, chunk: bytes) -> bytes:
        if not self._held and (chunk.endswith(b"\n\n") or chunk.endswith(b"\n\r\n")):
            region = chunk  # whole events: the common case
        else:
            data = self._held + chunk if self._held else chunk
            cut = _last_boundary(data)
            if not cut:
                if len(data) > MAX_HELD:  # no event ends here: pass it on as it is
                    self._held = b""
                    return data
                self._held = data
                return b""
            region, self._held = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
        if USAGE_KEY in region and _USAGE_OBJECT.search(region):
            return self._without_usage_chunk(region)
        return region

    def flush(self) -> bytes:
        """At the stream's clean end: what is still held back, to pass on."""
        held, self._held = self._held, b""
        if not self._strip:
            if USAGE_KEY in held:
                self._read(held)
            return b""
        return self._without_usage_chunk(held) if USAGE_KEY in held else held

    def result(self) -> Usage:
        """The stream's usage: ``estimated`` unless the usage that closes it was read."""
        if self._anthropic:
            return _anthropic(self._counts, estimated=not self._done) or UNKNOWN
        if self._openai is None:
            return UNKNOWN
        return self._openai

    def _without_usage_chunk(self, region: bytes) -> bytes:
        """``region`` (whole events) without the usage-only chunks; reads every usage."""
        kept: list[bytes] = []
        low = 0
        at = region.find(USAGE_KEY)
        while at >= 0:
            start, end = _event_bounds(region, low, at)
            kept.append(region[low:start] if self._read(region[start:end]) else region[low:end])
            low = end
            at = region.find(USAGE_KEY, low)
        if not kept:
            return region
        kept.append(region[low:])
        return b"".join(kept)

    def _read(self, lines: bytes) -> bool:
        """Read the usage of every ``data:`` line in ``lines``; whether one was a usage-only
        OpenAI chunk."""
        if _USAGE_OBJECT.search(lines) is None:
            return False
        usage_only = False
        for line in lines.split(b"\n"):
            if line.startswith(b"data:") and _USAGE_OBJECT.search(line):
                usage_only |= self._read_data(line[5:])
        return usage_only

    def _read_data(self, payload: bytes) -> bool:
        try:
            event = orjson.loads(payload)
        except ValueError:
            return False
        if not isinstance(event, dict):
            return False
        if self._anthropic:
            self._read_anthropic(event)
            return False
        raw = event.get("usage")
        usage = openai_usage(raw)
        if usage is not None:
            self._openai = usage
            self._done = True
        return isinstance(raw, dict) and event.get("choices") == []

    def _read_anthropic(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._counts.update(_anthropic_counts(message.get("usage")))
        elif kind == "message_delta":
            counts = _anthropic_counts(event.get("usage"))
            if "output_tokens" in counts:
                self._done = True
            self._counts.update(counts)
