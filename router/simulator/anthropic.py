"""Anthropic Messages API bodies, as ModelScope's Anthropic-compatible endpoint answers them.

Usage as Anthropic reports it: ``input_tokens`` (the input not read from or written to the
prompt cache), ``cache_creation_input_tokens``, ``cache_read_input_tokens`` and
``output_tokens``. The prompt cache is simulated: the blocks up to the last one marked
``cache_control`` (``system`` first, then the messages) are a cacheable prefix, written the
first time an account sends it for a model and read every time after (it never expires here).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Literal

import orjson

from router.simulator.sse import BAD_USAGE, count_tokens, split_pieces

#: How an answer reports its usage: truly, not at all, or malformed (fault injection).
UsageMode = Literal["real", "none", "bad"]


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def _blocks(body: dict[str, Any]) -> list[Any]:
    """The prompt's blocks in order: ``system``, then each message's content."""
    found: list[Any] = []
    for part in [body.get("system"), *(body.get("messages") or [])]:
        content = part.get("content") if isinstance(part, dict) else part
        if isinstance(content, list):
            found.extend(content)
        elif content is not None:
            found.append(content)
    return found


def _tokens(block: Any) -> int:
    if isinstance(block, dict) and isinstance(block.get("text"), str):
        return count_tokens(block["text"])
    return count_tokens(block if isinstance(block, str) else orjson.dumps(block).decode())


def prompt_usage(body: dict[str, Any], cache: set[str], scope: str) -> dict[str, int]:
    """The input side of the usage of ``body``, remembering its cacheable prefix in ``cache``
    (``scope`` names the account and model the cache belongs to)."""
    blocks = _blocks(body)
    marked = [i for i, b in enumerate(blocks) if isinstance(b, dict) and "cache_control" in b]
    total = max(1, sum(_tokens(b) for b in blocks))
    cached = read = 0
    if marked:
        prefix = blocks[: marked[-1] + 1]
        cached = min(total, sum(_tokens(b) for b in prefix))
        digest = hashlib.sha256(scope.encode() + orjson.dumps(prefix)).hexdigest()
        if digest in cache:
            read = cached
        cache.add(digest)
    return {
        "input_tokens": total - cached,
        "cache_creation_input_tokens": cached - read,
        "cache_read_input_tokens": read,
    }


def message(
    model: str, text: str, prompt: dict[str, int], mode: UsageMode = "real"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if mode != "none":
        body["usage"] = (
            {**prompt, "output_tokens": count_tokens(text)} if mode == "real" else BAD_USAGE
        )
    return body


def event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(
    model: str, text: str, prompt: dict[str, int], n_chunks: int, mode: UsageMode = "real"
) -> list[bytes]:
    """message_start carries the input usage (and 1 output token), message_delta the output's."""
    start = message(model, "", prompt, mode)
    start["content"] = []
    start["stop_reason"] = None
    events = [
        event("message_start", {"type": "message_start", "message": start}),
        event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]
    for piece in split_pieces(text, n_chunks):
        delta = {"type": "text_delta", "text": piece}
        events.append(
            event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        )
    final: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }
    if mode != "none":
        final["usage"] = {"output_tokens": count_tokens(text)} if mode == "real" else BAD_USAGE
    events += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", final),
        event("message_stop", {"type": "message_stop"}),
    ]
    return events
