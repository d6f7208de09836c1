"""What reading token usage costs the relay, per stream and per non-stream body (#13).

    .venv/bin/python -m bench.usage_scan
    .venv/bin/python -m bench.usage_scan --chunks 10 --streams 20000

A stream is the simulator's own (router/simulator/sse.py, anthropic.py) with ``--chunks``
content chunks, arriving one event per TCP chunk (or each event in two halves). For each
case the relay's per-chunk work is timed over ``--streams`` streams, best of ``--repeat``,
in CPU time of this process:

- before: what the relay did with each chunk before #13 (keep the tail for the done marker);
- after: the same, plus ``StreamUsage.feed`` on every chunk, ``flush`` and ``result``.

The writes to the client and the event loop cost the same in both, and are left out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from router.relay import TAIL_BYTES
from router.simulator import anthropic, sse
from router.usage import StreamUsage, from_body

MODEL = "Qwen/Qwen3-32B"


def openai_events(chunks: int, include_usage: bool, null_usage: bool = False) -> list[bytes]:
    text = " ".join(f"word{i}" for i in range(chunks * 3))
    events = sse.stream_events(MODEL, 1_700_000_000, text, None, chunks, 12, include_usage)
    if null_usage:  # Bailian's "usage":null in every chunk
        events = [e.replace(b'"choices":[{', b'"usage":null,"choices":[{') for e in events]
    return events


def anthropic_events(chunks: int) -> list[bytes]:
    text = " ".join(f"word{i}" for i in range(chunks * 3))
    prompt = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    return anthropic.stream_events(MODEL, text, prompt, chunks)


def halves(events: list[bytes]) -> list[bytes]:
    return [h for e in events for h in (e[: len(e) // 2], e[len(e) // 2 :])]


def before(chunks: list[bytes]) -> None:
    tail = b""
    for chunk in chunks:
        tail = (tail + chunk)[-TAIL_BYTES:]


def after(chunks: list[bytes], anthropic_: bool, strip: bool) -> None:
    usage = StreamUsage(anthropic=anthropic_, strip=strip)
    tail = b""
    for chunk in chunks:
        chunk = usage.feed(chunk)
        if chunk:
            tail = (tail + chunk)[-TAIL_BYTES:]
    rest = usage.flush()
    if rest:
        tail = (tail + rest)[-TAIL_BYTES:]
    usage.result()


def per_call_us(work: Callable[[], None], calls: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(calls):
            work()
        best = min(best, time.process_time() - started)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per stream")
    parser.add_argument("--streams", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, calls, repeat = args.chunks, args.streams, args.repeat
    cases = [
        ("chat, usage asked for the client (taken out)", openai_events(n, True), False, True),
        ("chat, client asked include_usage (read only)", openai_events(n, True), False, False),
        ("chat, events in two halves (taken out)", halves(openai_events(n, True)), False, True),
        (
            'chat, "usage":null in every chunk (taken out)',
            openai_events(n, True, True),
            False,
            True,
        ),
        ("messages (Anthropic), read only", anthropic_events(n), True, False),
    ]
    print(f"{n} content chunks per stream; CPU µs per stream, best of {repeat} x {calls}")
    print(f"{'case':48} {'chunks':>6} {'bytes':>6} {'before':>7} {'after':>7} {'added':>7}")
    for name, chunks, anthropic_, strip in cases:
        old = per_call_us(lambda c=chunks: before(c), calls, repeat)
        new = per_call_us(lambda c=chunks, a=anthropic_, s=strip: after(c, a, s), calls, repeat)
        size = sum(map(len, chunks))
        print(f"{name:48} {len(chunks):>6} {size:>6} {old:>7.2f} {new:>7.2f} {new - old:>7.2f}")
    chat = orjson.dumps(sse.chat_completion("chatcmpl-1", 1, MODEL, "word " * 200, None, 12))
    vectors = [
        {"object": "embedding", "index": i, "embedding": [0.123456] * 1024} for i in range(100)
    ]
    embeddings = orjson.dumps(
        {"object": "list", "data": vectors, "model": MODEL, "usage": {"prompt_tokens": 100}}
    )
    print(f"\n{'non-stream body':48} {'bytes':>13} {'parse all':>9} {'from_body':>9}")
    for name, body in (("chat completion", chat), ("embeddings, 100 x 1024", embeddings)):
        whole = per_call_us(lambda b=body: orjson.loads(b), max(1, calls // 100), repeat)
        read = per_call_us(lambda b=body: from_body(b), max(1, calls // 100), repeat)
        print(f"{name:48} {len(body):>13} {whole:>9.1f} {read:>9.1f}")


if __name__ == "__main__":
    main()
