"""OpenAI-shaped bodies the simulator answers with: chat completions, chunks, embeddings."""

from __future__ import annotations

import base64
import hashlib
import struct
import uuid
from typing import Any

import orjson

EMBEDDING_DIM = 8
DONE = b"data: [DONE]\n\n"
#: The usage a ``bad_usage`` fault answers with: no field holds a token count.
BAD_USAGE: dict[str, Any] = {
    "prompt_tokens": "12",
    "completion_tokens": -1,
    "total_tokens": None,
    "input_tokens": [3],
    "output_tokens": True,
    "cache_read_input_tokens": 1.5,
    "cache_creation_input_tokens": {"tokens": 2},
}


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def reply_text(provider: str, account: str, model: str) -> str:
    return f"sim reply from {provider}/{account} for {model}"


def reasoning_text(model: str) -> str:
    return f"sim reasoning about the question for {model}"


def is_reasoning(model: str, body: dict[str, Any]) -> bool:
    return "r1" in model.lower() or body.get("enable_thinking") is True


def split_pieces(text: str, n: int) -> list[str]:
    """``text`` cut into exactly ``n`` non-empty pieces (padded if too short)."""
    while len(text) < n:
        text += " ok"
    base, extra = divmod(len(text), n)
    pieces: list[str] = []
    pos = 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: about one token per word."""
    return max(1, len(text.split()))


def prompt_tokens(body: dict[str, Any]) -> int:
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                total += count_tokens(content)
            elif isinstance(content, list):
                total += sum(count_tokens(str(part)) for part in content)
    return max(1, total)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_completion(
    cid: str, created: int, model: str, content: str, reasoning: str | None, prompt: int
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    completion = count_tokens(content)
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        completion += count_tokens(reasoning)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": usage(prompt, completion),
    }


def chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(cid: str, created: int, model: str, usage_: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_,
    }


def stream_events(
    model: str,
    created: int,
    content: str,
    reasoning: str | None,
    n_chunks: int,
    prompt: int,
    include_usage: bool,
    bad_usage: bool = False,
) -> list[bytes]:
    """All SSE events of one streamed completion, ``[DONE]`` included; with
    ``include_usage``, a last chunk with ``choices: []`` and the usage (``bad_usage``: a
    malformed one) before ``[DONE]``."""
    cid = completion_id()
    events = [sse_event(chunk(cid, created, model, {"role": "assistant", "content": ""}))]
    completion = count_tokens(content)
    if reasoning is not None:
        completion += count_tokens(reasoning)
        for piece in split_pieces(reasoning, n_chunks):
            delta = {"content": "", "reasoning_content": piece}
            events.append(sse_event(chunk(cid, created, model, delta)))
    for piece in split_pieces(content, n_chunks):
        events.append(sse_event(chunk(cid, created, model, {"content": piece})))
    events.append(sse_event(chunk(cid, created, model, {}, "stop")))
    if include_usage:
        usage_ = BAD_USAGE if bad_usage else usage(prompt, completion)
        events.append(sse_event(usage_chunk(cid, created, model, usage_)))
    events.append(DONE)
    return events


def embedding_vector(model: str, text: str) -> list[float]:
    """Deterministic 8 floats in [-1, 1) for (model, text)."""
    digest = hashlib.sha256(f"{model}\x00{text}".encode()).digest()
    return [round(b / 128.0 - 1.0, 6) for b in digest[:EMBEDDING_DIM]]


def embeddings_body(model: str, inputs: list[str], encoding_format: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for i, text in enumerate(inputs):
        vector = embedding_vector(model, text)
        value: list[float] | str = vector
        if encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(count_tokens(t) for t in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
