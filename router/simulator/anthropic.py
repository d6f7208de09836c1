"""Anthropic Messages API bodies, as ModelScope's Anthropic-compatible endpoint answers them."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from router.simulator.sse import count_tokens, split_pieces


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def message(model: str, text: str, prompt: int) -> dict[str, Any]:
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": count_tokens(text)},
    }


def event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(model: str, text: str, prompt: int, n_chunks: int) -> list[bytes]:
    start = message(model, "", prompt)
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
    events += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": count_tokens(text)},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
    return events
