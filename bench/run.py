"""The benchmark of issues #5 and #12: what the gateway costs in front of the same upstream.

    .venv/bin/python -m bench.run                 # full: 10 s per cell, 1/16/64 connections
    .venv/bin/python -m bench.run --quick         # 2 s per cell, 1/16 connections
    .venv/bin/python -m bench.run --memory        # also 100k requests for the RSS target
    .venv/bin/python -m bench.run --profile       # also a py-spy profile of the hot path
    .venv/bin/python -m bench.run --pool-sizes 2,1000   # the pool-size axis (the default)
    .venv/bin/python -m bench.run --cluster       # also the gateway on a 3-master Redis Cluster
    .venv/bin/python -m bench.run --slow-streams 1000   # 1000 streams open at once (the default)

One process per system, all on loopback, all in front of the project's simulator: the upstream
directly, a bare aiohttp pass-through (the floor), this gateway on Redis and on SQLite (client
auth on; with N keys for --pool-sizes, on a Redis Cluster for --cluster), and LiteLLM's proxy
and Portkey's gateway when they install. Load comes from wrk (one thread); --slow-streams opens
many streams at once from aiohttp. Results go to bench/results/latest.json and latest.md; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from bench import alternatives, checks, report, slowstreams
from bench.procs import free_port
from bench.systems import (
    CLIENT_KEY,
    FAST,
    MODEL,
    REALISTIC,
    SLOW,
    TOKENS,
    Endpoint,
    Simulator,
    Variant,
    chat_body,
    direct,
    gateway_settings,
    pool_tokens,
    start_gateway,
    start_passthrough,
    workers_supported,
)
from bench.ttfc import measure_ttfc
from bench.wrk import Target, run_wrk, wrk_binary

MODES: dict[str, tuple[Variant, bool]] = {
    "json": (FAST, False),
    "stream": (FAST, True),
    "stream-50ms": (REALISTIC, True),
}
# gateway-redis-nousage: the Redis gateway with usage.record off (#13: what usage costs)
CORE = ["direct", "passthrough", "gateway-redis", "gateway-redis-nousage", "gateway-sqlite"]
ALTERNATIVES = ["litellm", "portkey"]
console = Console()


@dataclass
class Options:
    quick: bool
    duration: int
    connections: list[int]
    modes: list[str]
    skip_alternatives: bool
    skip_checks: bool
    memory: bool
    memory_requests: int
    profile: bool
    accounting_limit: int
    repeat: int
    out: Path
    alt_cache: Path | None
    pool_sizes: list[int]
    slow_streams: int = 0
    cluster: bool = False
    memory_keys: int = 1000


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s per cell, 1 and 16 connections")
    p.add_argument("--duration", type=int, help="seconds per cell (default 10, --quick 2)")
    p.add_argument("--connections", help="comma list (default 1,16,64; --quick 1,16)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--skip-alternatives", action="store_true", help="no LiteLLM, no Portkey")
    p.add_argument("--skip-checks", action="store_true", help="no round-trip/accounting checks")
    p.add_argument("--memory", action="store_true", help="100k requests for the RSS target")
    p.add_argument("--memory-requests", type=int, default=100_000)
    p.add_argument(
        "--memory-keys",
        type=int,
        default=1000,
        help="keys in the provider of the --memory gateway (default 1000, issue #12)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the Redis gateway under load")
    p.add_argument(
        "--accounting-limit", type=int, help="calls per token (default 20000; quick 200)"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is kept")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    p.add_argument("--alt-cache", type=Path, help="reuse LiteLLM/Portkey installs in this dir")
    p.add_argument(
        "--pool-sizes",
        default="2,1000",
        help="keys in the provider for the gateway-redis-k<N> systems (comma list; '' for none)",
    )
    p.add_argument(
        "--slow-streams",
        type=int,
        help="streams held open at once against a slow upstream (default 1000; --quick 100; "
        "0: not run)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also the gateway on a local 3-master Redis Cluster (system gateway-cluster)",
    )
    a = p.parse_args(argv)
    conns = a.connections or ("1,16" if a.quick else "1,16,64")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return Options(
        quick=a.quick,
        duration=a.duration or (2 if a.quick else 10),
        connections=sorted({int(c) for c in conns.split(",")}),
        modes=modes,
        skip_alternatives=a.skip_alternatives,
        skip_checks=a.skip_checks,
        memory=a.memory,
        memory_requests=a.memory_requests,
        profile=a.profile,
        accounting_limit=a.accounting_limit or (200 if a.quick else 20_000),
        repeat=max(1, a.repeat),
        out=a.out,
        alt_cache=a.alt_cache,
        pool_sizes=sorted({int(n) for n in a.pool_sizes.split(",") if n.strip()}),
        slow_streams=max(
            0, a.slow_streams if a.slow_streams is not None else (100 if a.quick else 1000)
        ),
        cluster=a.cluster,
        memory_keys=max(0, a.memory_keys),
    )


class Bench:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.alt_root = opts.alt_cache or workdir / "alternatives"
        self.redis: Any = None
        self.cluster: Any = None  # tests.redis_server.LocalCluster, with --cluster
        self.cluster_url = ""
        self.cluster_info: dict[str, Any] | str = "not run (use --cluster)"
        self.nofile: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []
        self.ttfc: list[dict[str, Any]] = []
        self.systems: dict[str, dict[str, Any]] = {}
        self.not_measured: list[str] = []
        self.skip: set[str] = set()
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]

    # -- systems ------------------------------------------------------------------------------

    def system_names(self) -> list[str]:
        names = list(CORE)
        names += [f"gateway-redis-k{n}" for n in self.opts.pool_sizes]
        if self.cluster is not None:
            names.append("gateway-cluster")
        if workers_supported():
            names.append("gateway-redis-2w")
        if not self.opts.skip_alternatives:
            names += ALTERNATIVES
        return names

    async def start(self, name: str, sim: Simulator) -> Endpoint:
        v = sim.variant.name
        if name == "direct":
            return direct(sim)
        if name == "passthrough":
            return await start_passthrough(self.workdir, sim)
        if name.startswith("gateway-"):
            if name.startswith("gateway-redis"):
                store = self.redis.url
            elif name == "gateway-cluster":
                store = self.cluster_url
            else:
                store = f"sqlite:///{self.workdir / f'quota-{v}.db'}"
            workers = 2 if name.endswith("-2w") else None
            pool = name.removeprefix("gateway-redis-k")
            tokens = pool_tokens(int(pool)) if pool.isdigit() else TOKENS
            settings = gateway_settings(
                sim,
                store,
                port=free_port(),
                prefix=f"bench-{name}-{v}",
                workers=workers,
                tokens=tokens,
            )
            if name == "gateway-redis-nousage":
                settings["usage"] = {"record": False}
            return await start_gateway(self.workdir, f"{name}-{v}", settings)
        if name == "litellm":
            s = await alternatives.start_litellm(
                self.alt_root, sim.v1, TOKENS[0][1], MODEL, CLIENT_KEY
            )
            return Endpoint(s.url, s.headers, s.proc, s.version)
        if name == "portkey":
            s = await alternatives.start_portkey(self.alt_root, sim.v1, TOKENS[0][1])
            return Endpoint(s.url, s.headers, s.proc, s.version)
        raise ValueError(name)

    async def install_alternatives(self) -> None:
        if self.opts.skip_alternatives:
            self.not_measured.append("LiteLLM, Portkey: skipped (--skip-alternatives)")
            return
        self.alt_root.mkdir(parents=True, exist_ok=True)
        console.print(f"installing LiteLLM and Portkey under {self.alt_root} (cap 5 min each)")
        found = await asyncio.gather(
            alternatives.install_litellm(self.alt_root),
            alternatives.install_portkey(self.alt_root),
            return_exceptions=True,
        )
        for name, outcome in zip(ALTERNATIVES, found, strict=True):
            if isinstance(outcome, BaseException):
                self._unavailable(name, outcome)

    def _unavailable(self, name: str, exc: BaseException) -> None:
        reason = f"not installable here: {exc}"
        self.systems[name] = {"status": reason}
        self.not_measured.append(f"{name}: {reason}")
        self.skip.add(name)
        console.print(f"[yellow]{name}: {reason}[/]")

    # -- measuring ------------------------------------------------------------------------------

    async def measure_variant(self, variant: Variant, modes: list[str]) -> None:
        """Every system runs at once; each cell is measured on all of them back to back.

        Interleaved, a cell's numbers are close in time, so load that comes and goes on the
        box (the cores are shared) biases one system less than a system-after-system order.
        Idle systems cost nothing meanwhile (sampled: 0 % of a core over 5 s, LiteLLM included).
        """
        pool = max(self.opts.pool_sizes, default=0)
        sim = await Simulator(self.workdir, variant, pool_size=pool).start()
        endpoints: dict[str, Endpoint] = {}
        try:
            for name in self.system_names():
                if name in self.skip:
                    continue
                console.print(f"starting [bold]{name}[/] on the {variant.name} upstream")
                try:
                    endpoints[name] = await self.start(name, sim)
                except alternatives.NotInstallable as exc:
                    self._unavailable(name, exc)
                    continue
                info = self.systems.setdefault(name, {"status": "measured"})
                if endpoints[name].version:
                    info["version"] = endpoints[name].version
            for mode in modes:
                await self.measure_mode(mode, endpoints)
            if any(MODES[m][1] for m in modes):
                for name, ep in endpoints.items():
                    await self.measure_first_chunk(name, ep, variant)
        finally:
            for name, ep in endpoints.items():
                if name != "direct":
                    ep.proc.stop()
            sim.stop()

    async def measure_mode(self, mode: str, endpoints: dict[str, Endpoint]) -> None:
        stream = MODES[mode][1]
        targets = {n: Target(ep.url, chat_body(stream), ep.headers) for n, ep in endpoints.items()}
        for target in targets.values():  # warm pools and caches, not counted
            await run_wrk(
                target,
                connections=min(16, max(self.opts.connections)),
                duration_s=60,
                script_dir=self.workdir,
                limit=100 if self.opts.quick else 500,
            )
        for c in self.opts.connections:
            samples: dict[str, list[dict[str, Any]]] = {n: [] for n in endpoints}
            for _ in range(self.opts.repeat):
                for name, ep in endpoints.items():
                    samples[name].append(await self.cell(ep, targets[name], c))
            for name, runs in samples.items():
                # the median run by throughput, when --repeat gave several
                row = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
                row = {"system": name, "mode": mode, "connections": c, **row}
                if len(runs) > 1:
                    row["rps_runs"] = [r["rps"] for r in runs]
                self.results.append(row)
                self.systems[name]["processes"] = row.pop("processes")
                console.print(
                    f"  {name:17} {mode:12} c={c:<3} {row['rps']:8.0f} req/s  "
                    f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                    f"errors {row['errors']}  RSS {row['rss_mb']} MB  "
                    f"CPU {row['cpu_us_per_request']} us/req"
                )

    async def cell(self, ep: Endpoint, target: Target, c: int) -> dict[str, Any]:
        cpu_before = ep.proc.cpu_s()
        r = await run_wrk(
            target, connections=c, duration_s=self.opts.duration, script_dir=self.workdir
        )
        cpu = ep.proc.cpu_s() - cpu_before
        rss, procs = ep.proc.rss_mb()
        return {
            "rps": r.rps,
            "p50_ms": r.p50_ms,
            "p90_ms": r.p90_ms,
            "p99_ms": r.p99_ms,
            "max_ms": r.max_ms,
            "requests": r.requests,
            "errors": r.errors,
            "error_detail": r.error_detail,
            "rss_mb": rss,
            "processes": procs,
            # CPU time of the system's own process(es) per request: steadier on a busy box
            "cpu_us_per_request": round(1e6 * cpu / r.requests) if r.requests else 0,
        }

    async def measure_first_chunk(self, name: str, ep: Endpoint, variant: Variant) -> None:
        samples = 100 if variant.latency_ms else 300
        if self.opts.quick:
            samples //= 10
        t = await measure_ttfc(Target(ep.url, chat_body(True), ep.headers), samples)
        self.ttfc.append({"system": name, "variant": variant.name, **t})
        console.print(
            f"  {name:17} first chunk p50 {t['ttfc_p50_ms']:.2f} ms "
            f"p99 {t['ttfc_p99_ms']:.2f} ms ({variant.name} upstream)"
        )

    # -- issue #12: many slow streams at once, a Redis Cluster -------------------------------------

    async def measure_slow_streams(self) -> dict[str, Any] | str:
        """``--slow-streams N``: N streams at once to direct, pass-through and gateway in turn.

        The gateway is the Redis one with the largest pool of ``--pool-sizes`` (the default
        three keys without the axis). One system runs at a time (the others are stopped), all
        in front of one slow simulator.
        """
        n = self.opts.slow_streams
        if not n:
            self.not_measured.append("slow streams: not run (--slow-streams 0)")
            return "not run (--slow-streams 0)"
        pool = max(self.opts.pool_sizes, default=0)
        gateway = f"gateway-redis-k{pool}" if pool else "gateway-redis"
        out: dict[str, Any] = {
            "streams": n,
            "upstream": SLOW.describe(),
            "upstream_first_chunk_ms": SLOW.latency_ms,
            "gateway": gateway,
            "keys": pool or len(TOKENS),
            "nofile": self.nofile,
            "systems": {},
        }
        console.print(f"[bold]slow streams[/]: {n} at once, upstream {SLOW.describe()}")
        sim = await Simulator(self.workdir, SLOW, name="sim-slow", pool_size=pool).start()
        try:
            for name in ("direct", "passthrough", gateway):
                ep = await self.start(name, sim)
                try:
                    before = ep.proc.rss_mb()[0]
                    target = Target(ep.url, chat_body(True), ep.headers)
                    found = await slowstreams.open_streams(target, n, ep.proc)
                finally:
                    if name != "direct":
                        ep.proc.stop()
                out["systems"][name] = {"rss_before_mb": before, **found}
                for r in slowstreams.ROUNDS:
                    x = found[r]
                    console.print(
                        f"  {name:19} {r}: {x['completed']}/{x['streams']} completed, "
                        f"errors {x['errors']} {escape(str(x['error_kinds'] or ''))} TTFB p50 "
                        f"{x['ttfb_p50_ms']:.1f} ms p99 {x['ttfb_p99_ms']:.1f} ms "
                        f"({x['wall_s']} s)"
                    )
                console.print(
                    f"  {name:19} RSS {before} -> peak {found['rss_peak_mb']} MB, "
                    f"after {found['rss_after_mb']} MB"
                )
        finally:
            sim.stop()
        return out

    async def start_cluster(self) -> None:
        """``--cluster``: 3 masters with a replica each (masters only if that fails)."""
        from tests.redis_server import LocalCluster  # no pytest in it: a plain helper

        problems = []
        for replicas in (1, 0):
            # the default node timeout (15 s): a master slowed down by the load on the box is
            # not failed over in the middle of a cell
            cluster = LocalCluster(masters=3, replicas=replicas, node_timeout_ms=15_000)
            console.print(f"starting a Redis Cluster: 3 masters, {replicas} replica(s) each")
            try:
                await asyncio.to_thread(cluster.start)
                masters = await asyncio.to_thread(cluster.masters)
            except Exception as exc:  # reported, and tried again without replicas
                await asyncio.to_thread(cluster.close)
                problems.append(f"{replicas} replica(s): {exc}")
                continue
            self.cluster = cluster
            self.cluster_url = cluster.url(*masters[:2])  # two masters as seeds: it finds the rest
            self.cluster_info = {
                "masters": 3,
                "replicas_per_master": replicas,
                "nodes": [n.address for n in cluster.nodes],
                "url": self.cluster_url,
                "problems": problems,
            }
            return
        self.cluster_info = "could not start: " + "; ".join(problems)
        self.not_measured.append(f"gateway-cluster: {self.cluster_info}")

    # -- checks ---------------------------------------------------------------------------------

    async def run_checks(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        o = self.opts
        port = self.redis.port
        if o.skip_checks:
            out["redis_round_trips"] = "skipped (--skip-checks)"
            out["accounting"] = []
            self.not_measured.append("Redis round trips, accounting: skipped (--skip-checks)")
        else:
            console.print("[bold]check[/]: Redis commands per request")
            load = [1, *[c for c in o.connections if c > 1]]
            out["redis_round_trips"] = await checks.redis_round_trips(
                self.workdir, port, 300 if o.quick else 3000, sorted(set(load))
            )
            pool = max(o.pool_sizes, default=0)
            if pool:  # issue #12: one round trip whatever the size of the pool
                console.print(f"[bold]check[/]: Redis commands per request, {pool} keys")
                out["redis_round_trips_pool"] = await checks.redis_round_trips(
                    self.workdir, port, 300 if o.quick else 3000, sorted(set(load)), keys=pool
                )
            out["accounting"] = []
            acct_conns = 64 if not o.quick else max(o.connections)
            for label, url in (
                ("redis", self.redis.url),
                ("sqlite", f"sqlite:///{self.workdir / 'acct.db'}"),
            ):
                console.print(f"[bold]check[/]: exact accounting on {label}")
                out["accounting"].append(
                    await checks.accounting(
                        self.workdir, url, label, o.accounting_limit, acct_conns
                    )
                )
        if o.memory:
            console.print(
                f"[bold]check[/]: RSS over {o.memory_requests} requests, {o.memory_keys} keys"
            )
            out["memory"] = await checks.memory(
                self.workdir, o.memory_requests, 16, keys=o.memory_keys
            )
        else:
            out["memory"] = "not run (use --memory)"
            self.not_measured.append("RSS after 100k requests: not run (use --memory)")
        out["workers"] = self.workers_check()
        if o.profile:
            console.print("[bold]profile[/]: py-spy on the Redis gateway")
            raw_dir = o.out / "profile"  # raw py-spy stacks (git-ignored), for flamegraph tools
            raw_dir.mkdir(parents=True, exist_ok=True)
            out["profile"] = await checks.profile(
                self.workdir, raw_dir, port, o.duration, min(16, max(o.connections))
            )
        return out

    def _row(self, system: str, mode: str, c: int) -> dict[str, Any] | None:
        for r in self.results:
            if (r["system"], r["mode"], r["connections"]) == (system, mode, c):
                return r
        return None

    def workers_check(self) -> dict[str, Any] | str:
        if not workers_supported():
            note = (
                "TODO: router/config.py ServerSettings has no 'workers' yet; "
                "1 vs 2 workers is measured once it lands"
            )
            self.not_measured.append("server.workers 1 vs 2: " + note)
            return note
        c = 16 if 16 in self.opts.connections else max(self.opts.connections)
        one = self._row("gateway-redis", "json", c)
        two = self._row("gateway-redis-2w", "json", c)
        if one is None or two is None or not one["rps"]:
            return "not measured (no json rows for both)"
        cores = report.machine()["nproc"]
        return {
            "connections": c,
            "rps_1_worker": one["rps"],
            "rps_2_workers": two["rps"],
            "ratio": round(two["rps"] / one["rps"], 2),
            "detail": f"{one['rps']:.0f} -> {two['rps']:.0f} req/s; {cores} cores shared "
            "with wrk and the simulator",
        }

    async def run(self) -> dict[str, Any]:
        from tests.redis_server import RedisServer

        if self.opts.slow_streams:
            # one socket per stream in this process, two in the system (client and upstream),
            # one in the simulator: the systems are started by this process and inherit it
            self.nofile = slowstreams.raise_nofile(4 * self.opts.slow_streams + 1024)
            if not self.nofile["enough"]:
                console.print(f"[yellow]open files limit below what is wanted: {self.nofile}[/]")
        await self.install_alternatives()
        self.redis = RedisServer().start()
        try:
            if self.opts.cluster:
                await self.start_cluster()
            for variant in (FAST, REALISTIC):
                modes = [m for m in self.opts.modes if MODES[m][0] is variant]
                if modes:
                    await self.measure_variant(variant, modes)
            slow = await self.measure_slow_streams()
            found_checks = await self.run_checks()
            found_checks["slow_streams"] = slow
            found_checks["cluster"] = self.cluster_info
        finally:
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.close)
            self.redis.close()
        return self.assemble(found_checks)

    def assemble(self, found_checks: dict[str, Any]) -> dict[str, Any]:
        o = self.opts
        profile = found_checks.pop("profile", None)
        result: dict[str, Any] = {
            "schema": 1,
            "date": report.now_iso(),
            "machine": {
                **report.machine(),
                # other work on the box shows here: the runs share its cores
                "loadavg_at_start": self.load_at_start,
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "code": report.code_version(),
            "settings": {
                "quick": o.quick,
                "duration_s": o.duration,
                "connections": o.connections,
                "modes": o.modes,
                "wrk_threads": 1,
                "repeat": o.repeat,
                "order": "all systems up at once; each cell measured on every system in turn",
                "gateway": "python -m router serve, 1 process, uvloop, INFO access log to a "
                "file, client auth on, 3 pooled tokens + Bailian fallback",
                "pool_sizes": o.pool_sizes,
                "slow_streams": o.slow_streams,
                "cluster": o.cluster,
                "memory_keys": o.memory_keys if o.memory else None,
            },
            "modes": {
                m: f"{'SSE' if s else 'JSON'} chat completion; upstream {v.describe()}"
                for m, (v, s) in MODES.items()
                if m in o.modes
            },
            "systems": self.systems,
            "results": self.results,
            "ttfc": self.ttfc,
            "checks": found_checks,
        }
        result["targets"] = report.judge(self.results, self.ttfc, found_checks, o.connections)
        result["not_measured"] = self.not_measured
        if profile is not None:
            result["profile"] = profile
        return result


async def main_async(opts: Options) -> dict[str, Any]:
    wrk_binary()  # exits with the install hint before anything starts
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: sudo apt-get install redis-server")
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        bench = Bench(opts, Path(tmp))
        return await bench.run()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    found = asyncio.run(main_async(opts))
    json_path, md_path = report.write(opts.out, found)
    report.print_report(found, console)
    console.print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
