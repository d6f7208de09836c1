"""Where the gateway's CPU per request goes: the same gateway with one part turned off at a time.

    .venv/bin/python -m bench.ablate                  # 3 x 20,000 requests per variant, 2 rounds
    .venv/bin/python -m bench.ablate --requests 5000 --rounds 1

Each variant is the Redis gateway of ``bench.run`` (3 pooled tokens, Bailian fallback, client
auth on, the fast simulator) started on its own, warmed with 2,000 requests, then sent a fixed
number of JSON requests by wrk at 16 connections, ``--repeat`` times; CPU per request is the
gateway's CPU time over that count (the median of the repeats). The variants take turns,
``--rounds`` times, so a noisy minute does not land on one of them; the median of the rounds is
reported, with the bare pass-through measured the same way. The variants:

- ``full``: as configured in production (INFO access log, usage recorded, Redis store);
- ``no access log``: ``--log-level WARNING``;
- ``no usage``: ``usage.record: false``;
- ``memory store``: ``memory://``, no store round trip;
- ``none of the three``: all three at once.

What a part costs is the full gateway's CPU per request minus that variant's. The last variant
shows what is left: the HTTP server and client, auth, parsing, classification and metrics.
Results go to bench/results/ablation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.procs import free_port
from bench.systems import (
    FAST,
    Endpoint,
    Simulator,
    chat_body,
    gateway_settings,
    start_gateway,
    start_passthrough,
)
from bench.wrk import Target, run_wrk
from tests.redis_server import RedisServer

WARMUP = 2000


@dataclass(frozen=True)
class Ablation:
    name: str
    log_level: str = "INFO"
    usage: bool = True
    memory: bool = False


ABLATIONS = [
    Ablation("full"),
    Ablation("no access log", log_level="WARNING"),
    Ablation("no usage", usage=False),
    Ablation("memory store", memory=True),
    Ablation("none of the three", log_level="WARNING", usage=False, memory=True),
]


async def cpu_per_request(
    endpoint: Endpoint, workdir: Path, requests: int, connections: int, repeat: int
) -> tuple[float, float, int]:
    """The median CPU µs per request and req/s over ``repeat`` runs of ``requests``."""
    target = Target(endpoint.url, chat_body(False), endpoint.headers)
    await run_wrk(target, connections=connections, duration_s=60, script_dir=workdir, limit=WARMUP)
    cpu, rps, errors = [], [], 0
    for _ in range(repeat):
        before = endpoint.proc.cpu_s()
        result = await run_wrk(
            target, connections=connections, duration_s=120, script_dir=workdir, limit=requests
        )
        spent = endpoint.proc.cpu_s() - before
        cpu.append(spent * 1e6 / max(result.requests, 1))
        rps.append(result.rps)
        errors += result.errors
    return statistics.median(cpu), statistics.median(rps), errors


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ablate-"))
    # variant -> one (CPU µs per request, req/s, errors) per round
    samples: dict[str, list[tuple[float, float, int]]] = {"pass-through": []}
    samples.update((a.name, []) for a in ABLATIONS)
    with RedisServer() as redis:  # started by the with
        sim = await Simulator(workdir, FAST).start()
        try:
            for round_ in range(args.rounds):
                pt = await start_passthrough(workdir, sim)
                try:
                    measured = await cpu_per_request(
                        pt, workdir, args.requests, args.connections, args.repeat
                    )
                finally:
                    pt.proc.stop()
                samples["pass-through"].append(measured)
                for ab in ABLATIONS:
                    store = "memory://" if ab.memory else redis.url
                    name = f"gateway-{round_}-{ab.name.replace(' ', '-')}"
                    settings = gateway_settings(sim, store, port=free_port(), prefix=name)
                    if not ab.usage:
                        settings["usage"] = {"record": False}
                    gw = await start_gateway(workdir, name, settings, log_level=ab.log_level)
                    try:
                        measured = await cpu_per_request(
                            gw, workdir, args.requests, args.connections, args.repeat
                        )
                    finally:
                        gw.proc.stop()
                    samples[ab.name].append(measured)
                    Console().print(f"round {round_ + 1}: {ab.name}: {measured[0]:.0f} µs/req")
        finally:
            sim.stop()
    full = round(statistics.median(m[0] for m in samples["full"]))
    rows = []
    for name, rounds in samples.items():
        cpu = round(statistics.median(m[0] for m in rounds))
        rows.append(
            {
                "variant": name,
                "cpu_us_per_request": cpu,
                "cpu_us_runs": [round(m[0]) for m in rounds],
                "saves_us": None if name == "pass-through" else full - cpu,
                "rps": round(statistics.median(m[1] for m in rounds)),
                "errors": sum(m[2] for m in rounds),
            }
        )
    return {
        "settings": {
            "requests": args.requests,
            "connections": args.connections,
            "repeat": args.repeat,
            "rounds": args.rounds,
        },
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    table = Table(title=f"CPU per request, JSON at {args.connections} connections (medians)")
    for column in ("variant", "CPU µs/req", "saves µs", "req/s", "runs", "errors"):
        table.add_column(column)
    for r in result["rows"]:
        saves = "" if r["saves_us"] is None else str(r["saves_us"])
        runs = ", ".join(str(x) for x in r["cpu_us_runs"])
        table.add_row(
            r["variant"],
            str(r["cpu_us_per_request"]),
            saves,
            str(r["rps"]),
            runs,
            str(r["errors"]),
        )
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
