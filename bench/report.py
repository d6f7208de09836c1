"""The targets of issues #5 and #12, judged from one run; the JSON, the Markdown and the terminal
tables. Every target row says which issue set it (``issue``); the #12 rows' names start "#12"."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

GATEWAYS = ("gateway-redis", "gateway-sqlite")
#: The issue sets its targets for one process with quota accounting on Redis; the embedded store
#: (SQLite on a worker thread, safe for several processes on one file) is reported beside it.
JUDGED = "gateway-redis"
COLUMNS = (
    "system",
    "mode",
    "connections",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "RSS MB",
    "CPU µs/req",
)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        wrk_version = (wrk.stdout or wrk.stderr).split("Copyright")[0].strip()
    except OSError:
        wrk_version = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_version,
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and whether router/ had uncommitted changes at the time."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "router_dirty": bool(git("status", "--porcelain", "router")),
    }


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _row(results: list[dict[str, Any]], system: str, mode: str, c: int) -> dict[str, Any] | None:
    for row in results:
        if row["system"] == system and row["mode"] == mode and row["connections"] == c:
            return row
    return None


def _target(
    name: str, value: Any, target: str, passed: bool | None, detail: str = "", issue: int = 5
) -> dict[str, Any]:
    return {
        "target": name,
        "value": value,
        "goal": target,
        "pass": passed,
        "detail": detail,
        "issue": issue,
    }


def _t12(name: str, value: Any, goal: str, passed: bool | None, detail: str = "") -> dict[str, Any]:
    """A row of issue #12: its name starts with "#12"."""
    return _target(f"#12 {name}", value, goal, passed, detail, issue=12)


def _missing12(name: str, goal: str, why: str) -> dict[str, Any]:
    """A #12 target this run did not measure: still a row, so the table lists every target."""
    return _t12(name, None, goal, None, f"not measured: {why}")


def _gateway_target(
    gw: str, name: str, value: Any, target: str, passed: bool, detail: str
) -> dict[str, Any]:
    """A target row of a gateway: judged for JUDGED, reported (pass None) for the others."""
    if gw == JUDGED:
        return _target(name, value, target, passed, detail)
    met = "would meet" if passed else "would not meet"
    return _target(name, value, target, None, f"{detail}; reported only ({met} it)")


def _throughput(results: list[dict[str, Any]], connections: list[int]) -> list[dict[str, Any]]:
    out = []
    c = 16 if 16 in connections else max(connections)
    for mode in ("json", "stream"):
        floor = _row(results, "passthrough", mode, c)
        for gw in GATEWAYS:
            row = _row(results, gw, mode, c)
            if floor is None or row is None or not floor["rps"]:
                continue
            ratio = round(row["rps"] / floor["rps"], 2)
            out.append(
                _gateway_target(
                    gw,
                    f"throughput {gw} {mode} @{c} conn / pass-through",
                    ratio,
                    ">= 0.6x (aim 0.8x)",
                    ratio >= 0.6,
                    f"{row['rps']:.0f} vs {floor['rps']:.0f} req/s"
                    + ("" if ratio >= 0.8 or ratio < 0.6 else "; below the 0.8x aim"),
                )
            )
    return out


def _added_p50(
    results: list[dict[str, Any]], gw: str, mode: str
) -> tuple[float, float, dict[str, Any], dict[str, Any]] | None:
    """(p50 the gateway adds over the upstream directly, what the pass-through adds, the
    gateway's row, the direct row) at 1 connection; None when a row is missing."""
    base = _row(results, "direct", mode, 1)
    floor = _row(results, "passthrough", mode, 1)
    row = _row(results, gw, mode, 1)
    if base is None or floor is None or row is None:
        return None
    added = round(row["p50_ms"] - base["p50_ms"], 3)
    return added, floor["p50_ms"] - base["p50_ms"], row, base


def _latency(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode in ("json", "stream"):
        base = _row(results, "direct", mode, 1)
        floor = _row(results, "passthrough", mode, 1)
        for gw in GATEWAYS:
            measured = _added_p50(results, gw, mode)
            if measured is None or base is None or floor is None:
                continue
            added, floor_added, row, _ = measured
            bound = 2 * max(floor_added, 0.0)
            out.append(
                _gateway_target(
                    gw,
                    f"added p50 {gw} {mode} @1 conn",
                    added,
                    f"<= 2x pass-through's added ({bound:.3f} ms)",
                    added <= bound,
                    f"pass-through adds {floor_added:.3f} ms",
                )
            )
            added99 = round(row["p99_ms"] - base["p99_ms"], 3)
            out.append(
                _gateway_target(
                    gw,
                    f"added p99 {gw} {mode} @1 conn",
                    added99,
                    "< 2 ms",
                    added99 < 2.0,
                    f"pass-through adds {floor['p99_ms'] - base['p99_ms']:.3f} ms",
                )
            )
    return out


def _ttfc(ttfc: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in ("realistic", "fast"):
        rows = {r["system"]: r for r in ttfc if r["variant"] == variant}
        if "direct" not in rows or "passthrough" not in rows:
            continue
        base = rows["direct"]["ttfc_p50_ms"]
        floor_added = rows["passthrough"]["ttfc_p50_ms"] - base
        for gw in GATEWAYS:
            if gw not in rows:
                continue
            added = round(rows[gw]["ttfc_p50_ms"] - base, 3)
            bound = 2 * max(floor_added, 0.0)
            out.append(
                _gateway_target(
                    gw,
                    f"stream first-chunk overhead {gw} ({variant} upstream)",
                    added,
                    f"<= 2x pass-through's ({bound:.3f} ms)",
                    added <= bound,
                    f"p50 time to first chunk {rows[gw]['ttfc_p50_ms']:.3f} ms, direct "
                    f"{base:.3f} ms, pass-through adds {floor_added:.3f} ms",
                )
            )
        break  # one variant: the realistic one when it ran
    return out


def _checks(checks: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    mem = checks.get("memory")
    if isinstance(mem, dict) and "samples" in mem:
        out.append(
            _target(
                f"RSS of the Redis gateway after {mem['samples'][-1]['requests']} requests "
                f"({mem.get('keys', 3)} keys)",
                mem["rss_after_total_mb"],
                "< 80 MB",
                mem["under_80mb"],
                " -> ".join(f"{s['requests']}: {s['rss_mb']} MB" for s in mem["samples"]),
            )
        )
        out.append(
            _target(
                "RSS growth between 50k and 100k requests",
                mem["growth_second_half_mb"],
                "flat (<= max(2 MB, 5%))",
                mem["flat"],
            )
        )
    else:
        out.append(_target("RSS after 100k requests", None, "< 80 MB, flat", None, str(mem)))
    rt = checks.get("redis_round_trips")
    if isinstance(rt, dict) and "runs" in rt:
        for run in rt["runs"]:
            value = _reserves(run)
            commands = run["client_commands_per_request"]
            out.append(
                _target(
                    f"Redis round trips per request @{run['connections']} conn (steady state)",
                    value,
                    "== 1",
                    abs(value - 1.0) < 0.005,
                    f"reservations per request over {run['proxied']} requests, and "
                    f"{run.get('usage_writes', 0)} usage batches; all socket reads: "
                    f"{run['round_trips_per_request']}/request; client commands: "
                    + ", ".join(f"{k} {v}" for k, v in commands.items()),
                )
            )
    for acct in checks.get("accounting", []):
        if "exact" not in acct:
            out.append(_target(f"accounting exact ({acct.get('store')})", None, "exact", None))
            continue
        out.append(
            _target(
                f"accounting exact ({acct['store']}, {acct['tokens']}x{acct['limit_per_token']}"
                f" @{acct['connections']} conn)",
                acct["upstream_used"],
                "every token used == its limit, none over",
                acct["exact"],
                f"{acct['answered_200']} answered 200, {acct['answered_other']} refused; "
                f"over limit: {acct['over_limit'] or 'none'}",
            )
        )
    workers = checks.get("workers")
    if isinstance(workers, dict) and workers.get("ratio") is not None:
        out.append(
            _target(
                "server.workers 2 vs 1 (json @16 conn)",
                workers["ratio"],
                "> 1x (info)",
                None,
                workers.get("detail", ""),
            )
        )
    else:
        out.append(_target("server.workers 1 vs 2", None, "TODO", None, str(workers)))
    return out


def _sizes(results: list[dict[str, Any]]) -> list[int]:
    """The pool sizes of the gateway-redis-k<N> systems in the results."""
    return sorted(
        {
            int(r["system"].removeprefix("gateway-redis-k"))
            for r in results
            if r["system"].startswith("gateway-redis-k")
            and r["system"].removeprefix("gateway-redis-k").isdigit()
        }
    )


def _gateways12(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The gateways #12 judges, with a label: the smallest and largest pools of the pool-size
    axis (2 and 1,000 keys by default), else the default gateway (3 keys)."""
    sizes = _sizes(results)
    if sizes:
        return [(f"gateway-redis-k{n}", f"{n} keys") for n in sorted({sizes[0], sizes[-1]})]
    return [("gateway-redis", "3 keys")]


def _busy(connections: list[int]) -> int:
    return 16 if 16 in connections else max(connections)


def _pool_sizes(results: list[dict[str, Any]], connections: list[int]) -> list[dict[str, Any]]:
    """Issue #12: the largest pool against the smallest, in the same run, json and stream."""
    sizes = _sizes(results)
    c = _busy(connections)
    out = []
    # (connections, field, unit, goal, whether the ratio large/small meets it)
    checks: tuple[tuple[int, str, str, str, Callable[[float], bool]], ...] = (
        (c, "rps", "req/s", ">= 0.9x", lambda r: r >= 0.9),
        (1, "p50_ms", "ms", "<= 1.1x", lambda r: r <= 1.1),
    )
    for mode in ("json", "stream"):
        for conns, field, unit, goal, met in checks:
            what = "throughput" if field == "rps" else "p50"
            if len(sizes) < 2:
                out.append(
                    _missing12(
                        f"{what} 1000 keys / 2 keys, {mode} @{conns} conn",
                        goal,
                        "needs two pool sizes (--pool-sizes 2,1000)",
                    )
                )
                continue
            small, large = f"gateway-redis-k{sizes[0]}", f"gateway-redis-k{sizes[-1]}"
            name = f"{what} {sizes[-1]} keys / {sizes[0]} keys, {mode} @{conns} conn"
            lo, hi = _row(results, small, mode, conns), _row(results, large, mode, conns)
            if lo is None or hi is None or not lo[field]:
                out.append(_missing12(name, goal, f"no {mode} @{conns} rows for both pools"))
                continue
            ratio = round(hi[field] / lo[field], 2)
            out.append(
                _t12(name, ratio, goal, met(ratio), f"{hi[field]:.2f} vs {lo[field]:.2f} {unit}")
            )
    return out


#: #12: the gateway's throughput at 16 connections against each of these, at least this much.
VERSUS12 = (
    ("passthrough", "pass-through", 0.5),
    ("portkey", "Portkey", 3.0),
    ("litellm", "LiteLLM", 40.0),
)


def _throughput12(results: list[dict[str, Any]], connections: list[int]) -> list[dict[str, Any]]:
    c = _busy(connections)
    out = []
    for mode in ("json", "stream"):
        for gw, label in _gateways12(results):
            row = _row(results, gw, mode, c)
            for other, other_label, floor in VERSUS12:
                name = f"throughput {label} ({gw}) / {other_label}, {mode} @{c} conn"
                goal = f">= {floor:g}x"
                base = _row(results, other, mode, c)
                if row is None or base is None or not base["rps"]:
                    missing = other if base is None or not base["rps"] else gw
                    out.append(_missing12(name, goal, f"no {mode} @{c} row of {missing}"))
                    continue
                ratio = round(row["rps"] / base["rps"], 2)
                out.append(
                    _t12(
                        name,
                        ratio,
                        goal,
                        ratio >= floor,
                        f"{row['rps']:.0f} vs {base['rps']:.0f} req/s",
                    )
                )
    return out


def _latency12(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Added p50 at 1 connection (over the upstream directly) <= 3x the pass-through's."""
    out = []
    for mode in ("json", "stream"):
        for gw, label in _gateways12(results):
            name = f"added p50 {label} ({gw}), {mode} @1 conn"
            measured = _added_p50(results, gw, mode)
            if measured is None:
                out.append(_missing12(name, "<= 3x pass-through's added", f"no {mode} @1 rows"))
                continue
            added, floor_added, row, base = measured
            bound = 3 * max(floor_added, 0.0)
            out.append(
                _t12(
                    name,
                    added,
                    f"<= 3x pass-through's added ({bound:.3f} ms)",
                    added <= bound,
                    f"p50 {row['p50_ms']:.2f} ms, direct {base['p50_ms']:.2f} ms, pass-through "
                    f"adds {floor_added:.3f} ms",
                )
            )
    return out


def _memory12(checks: dict[str, Any]) -> list[dict[str, Any]]:
    mem = checks.get("memory")
    if not (isinstance(mem, dict) and "samples" in mem):
        return [
            _missing12("RSS after 100k requests, 1000 keys", "<= 80 MB", str(mem)),
            _missing12("Redis memory per key", "reported", str(mem)),
        ]
    keys, requests = mem.get("keys", 3), mem["samples"][-1]["requests"]
    note = "" if keys >= 1000 else f"; {keys} keys, fewer than the issue's 1,000"
    note += "" if requests >= 100_000 else f"; {requests} requests, fewer than the issue's 100k"
    out = [
        _t12(
            f"RSS after {requests} requests, {keys} keys",
            mem["rss_after_total_mb"],
            "<= 80 MB",
            mem["rss_after_total_mb"] <= 80,
            " -> ".join(f"{s['requests']}: {s['rss_mb']} MB" for s in mem["samples"]) + note,
        )
    ]
    red = mem.get("redis")
    if isinstance(red, dict):
        out.append(
            _t12(
                f"Redis memory per key ({keys} keys)",
                red["bytes_per_key"],
                "reported (bytes)",
                None,
                f"used_memory {red['used_memory_empty']} B empty -> {red['used_memory_after']} B "
                f"after {requests} requests; {red['bytes_per_key_data']} B/key once the gateway "
                f"left ({red['used_memory_gateway_stopped']} B, {red['redis_keys']} Redis keys)",
            )
        )
    else:
        out.append(_missing12("Redis memory per key", "reported", "no used_memory readings"))
    return out


def _round_trips12(checks: dict[str, Any]) -> list[dict[str, Any]]:
    rt = checks.get("redis_round_trips_pool") or checks.get("redis_round_trips")
    name = "store round trips per request"
    if not (isinstance(rt, dict) and rt.get("runs")):
        return [_missing12(name, "== 1", str(rt))]
    runs = rt["runs"]
    worst = max(runs, key=lambda r: abs(_reserves(r) - 1.0))
    return [
        _t12(
            f"{name}, {rt.get('keys', 3)} keys (worst of {len(runs)} concurrencies)",
            _reserves(worst),
            "== 1 at every concurrency",
            all(abs(_reserves(r) - 1.0) < 0.005 for r in runs),
            "; ".join(
                f"@{r['connections']} conn: {_reserves(r)} reservations/request over "
                f"{r['proxied']}, + {r.get('usage_writes', 0)} usage batches "
                f"({r['scripts_per_request']} EVALSHA/request in all)"
                for r in runs
            ),
        )
    ]


def _reserves(run: dict[str, Any]) -> float:
    """Scripts before each call: every EVALSHA but the usage batches (after the answers)."""
    value: float = run.get("reserves_per_request", run["scripts_per_request"])
    return value


def _slow_streams12(checks: dict[str, Any]) -> list[dict[str, Any]]:
    """--slow-streams: no errors; added TTFB p99 (over the upstream directly, warm round) of the
    gateway <= 2x the pass-through's; the gateway's RSS reported."""
    slow = checks.get("slow_streams")
    if not (isinstance(slow, dict) and "systems" in slow):
        why = str(slow) if slow is not None else "not run (--slow-streams N)"
        return [
            _missing12("1000 concurrent slow streams: errors", "== 0", why),
            _missing12("1000 concurrent slow streams: added TTFB p99", "<= 2x pass-through's", why),
            _missing12("1000 concurrent slow streams: gateway RSS", "reported", why),
        ]
    n, gw, systems = slow["streams"], slow["gateway"], slow["systems"]
    what = f"{n} concurrent slow streams"
    out = []
    g = systems.get(gw)
    if g is None:
        return [_missing12(f"{what}: errors", "== 0", f"{gw} not measured")]
    others = ", ".join(f"{k} {v['errors']}" for k, v in systems.items() if k != gw)
    kinds = {r: g[r]["error_kinds"] for r in ("cold", "warm") if g[r]["error_kinds"]}
    out.append(
        _t12(
            f"{what}: errors ({gw}, cold + warm rounds)",
            g["errors"],
            "== 0",
            g["errors"] == 0,
            f"{g['cold']['errors']} cold + {g['warm']['errors']} warm of {2 * n}"
            + (f" {kinds}" if kinds else "")
            + f"; {others}",
        )
    )
    floor, direct = systems.get("passthrough"), systems.get("direct")
    upstream = slow.get("upstream_first_chunk_ms", 0)
    for rnd, judged in (("warm", True), ("cold", False)):
        name = f"{what}: added TTFB p99, {rnd} round ({gw})"
        goal = "<= 2x pass-through's added"
        if floor is None:
            out.append(_missing12(name, goal, "no pass-through measurement"))
            continue
        # added over the upstream measured the same way; its own first-chunk delay without one
        ref = direct[rnd]["ttfb_p99_ms"] if direct is not None else upstream
        floor_added = floor[rnd]["ttfb_p99_ms"] - ref
        added = round(g[rnd]["ttfb_p99_ms"] - ref, 1)
        bound = 2 * max(floor_added, 0.0)
        passed = added <= bound
        detail = (
            f"TTFB p99 {g[rnd]['ttfb_p99_ms']} ms (p50 {g[rnd]['ttfb_p50_ms']}), pass-through "
            f"{floor[rnd]['ttfb_p99_ms']} ms (p50 {floor[rnd]['ttfb_p50_ms']}), "
            + (
                f"direct {ref} ms"
                if direct is not None
                else f"the upstream's first-chunk delay {upstream} ms"
            )
            + f"; over the upstream's own {upstream} ms delay: gateway "
            f"+{g[rnd]['ttfb_p99_ms'] - upstream:.1f}, pass-through "
            f"+{floor[rnd]['ttfb_p99_ms'] - upstream:.1f} ms"
        )
        if judged:
            out.append(_t12(name, added, f"{goal} ({bound:.1f} ms)", passed, detail))
        else:
            met = "would meet" if passed else "would not meet"
            out.append(
                _t12(
                    name,
                    added,
                    f"{goal} ({bound:.1f} ms)",
                    None,
                    f"{detail}; reported only, every connection new ({met} it)",
                )
            )
    pt_peak = floor["rss_peak_mb"] if floor is not None else "?"
    out.append(
        _t12(
            f"{what}: RSS of {gw}",
            g["rss_peak_mb"],
            "reported (MB, peak)",
            None,
            f"{g['rss_before_mb']} MB before, {g['rss_peak_mb']} peak, {g['rss_after_mb']} "
            f"after; pass-through peak {pt_peak} MB",
        )
    )
    return out


def _cluster12(
    results: list[dict[str, Any]], checks: dict[str, Any], connections: list[int]
) -> list[dict[str, Any]]:
    cluster = checks.get("cluster")
    rows = [r for r in results if r["system"] == "gateway-cluster"]
    name = "Redis Cluster run (gateway-cluster)"
    goal = "every cell answered, no errors"
    if not isinstance(cluster, dict) or not rows:
        why = str(cluster) if cluster is not None else "not run (use --cluster)"
        return [_missing12(name, goal, why)]
    replicas = cluster["masters"] * cluster["replicas_per_master"]
    shape = f"{cluster['masters']} masters + {replicas} replicas"
    errors = sum(r["errors"] for r in rows)
    out = [
        _t12(
            f"{name}, {shape}",
            errors,
            goal,
            errors == 0,
            f"{len(rows)} cells, {errors} errors; {cluster['url']}",
        )
    ]
    c = _busy(connections)
    for mode in ("json", "stream"):
        row, floor = (
            _row(results, "gateway-cluster", mode, c),
            _row(results, "passthrough", mode, c),
        )
        if row is None or floor is None or not floor["rps"]:
            continue
        ratio = round(row["rps"] / floor["rps"], 2)
        same = _row(results, "gateway-redis", mode, c)
        vs = f"; one Redis server (gateway-redis): {same['rps']:.0f}" if same else ""
        met = "would meet" if ratio >= 0.5 else "would not meet"
        out.append(
            _t12(
                f"throughput gateway-cluster / pass-through, {mode} @{c} conn",
                ratio,
                ">= 0.5x",
                None,
                f"{row['rps']:.0f} vs {floor['rps']:.0f} req/s{vs}; reported only ({met} it)",
            )
        )
    return out


def judge12(
    results: list[dict[str, Any]], checks: dict[str, Any], connections: list[int]
) -> list[dict[str, Any]]:
    """Every target of issue #12, a row each (``value`` None when this run did not measure it)."""
    return [
        *_pool_sizes(results, connections),
        *_throughput12(results, connections),
        *_latency12(results),
        *_memory12(checks),
        *_round_trips12(checks),
        *_slow_streams12(checks),
        *_cluster12(results, checks, connections),
    ]


def judge13(results: list[dict[str, Any]], connections: list[int]) -> list[dict[str, Any]]:
    """Issue #13: usage accounting costs at most 10% of throughput (gateway-redis against the
    same gateway with usage.record off, same run), JSON and streams, at 1 and the busy count."""
    out = []
    for mode in ("json", "stream"):
        for c in sorted({1, _busy(connections)}):
            name = f"#13 throughput with usage / without, {mode} @{c} conn"
            on = _row(results, JUDGED, mode, c)
            off = _row(results, "gateway-redis-nousage", mode, c)
            if on is None or off is None or not off["rps"]:
                out.append(_target(name, None, ">= 0.9x", None, "not measured", issue=13))
                continue
            ratio = round(on["rps"] / off["rps"], 2)
            detail = f"{on['rps']:.0f} vs {off['rps']:.0f} req/s"
            cpu_on, cpu_off = on.get("cpu_us_per_request"), off.get("cpu_us_per_request")
            if cpu_on and cpu_off:
                detail += f"; CPU {cpu_on:.0f} vs {cpu_off:.0f} µs/req"
            out.append(_target(name, ratio, ">= 0.9x", ratio >= 0.9, detail, issue=13))
    return out


def judge(
    results: list[dict[str, Any]],
    ttfc: list[dict[str, Any]],
    checks: dict[str, Any],
    connections: list[int],
) -> list[dict[str, Any]]:
    return [
        *judge13(results, connections),
        *judge12(results, checks, connections),
        *_throughput(results, connections),
        *_latency(results),
        *_ttfc(ttfc),
        *_checks(checks),
    ]


def write(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "latest.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = out_dir / "latest.md"
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["system"],
        row["mode"],
        str(row["connections"]),
        f"{row['rps']:.0f}",
        f"{row['p50_ms']:.2f}",
        f"{row['p99_ms']:.2f}",
        str(row["errors"]),
        f"{row['rss_mb']:.0f}",
        str(row.get("cpu_us_per_requestuest", "")),
    ]


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def _value(value: Any) -> str:
    return "—" if value is None else str(value)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


SLOW_COLUMNS = (
    "system",
    "round",
    "completed",
    "errors",
    "TTFB p50 ms",
    "TTFB p99 ms",
    "TTFB max ms",
    "whole p50 ms",
    "wall s",
    "RSS peak MB",
)


def _slow_rows(slow: Any) -> list[list[str]]:
    if not (isinstance(slow, dict) and "systems" in slow):
        return []
    rows = []
    for name, found in slow["systems"].items():
        for rnd in ("cold", "warm"):
            r = found[rnd]
            rows.append(
                [
                    name,
                    rnd,
                    f"{r['completed']}/{r['streams']}",
                    str(r["errors"]),
                    f"{r['ttfb_p50_ms']:.1f}",
                    f"{r['ttfb_p99_ms']:.1f}",
                    f"{r['ttfb_max_ms']:.1f}",
                    f"{r['total_p50_ms']:.1f}",
                    str(r["wall_s"]),
                    str(found.get("rss_peak_mb", "")),
                ]
            )
    return rows


def _slow_streams_md(slow: Any) -> list[str]:
    rows = _slow_rows(slow)
    if not rows:
        return []
    lines = [
        "",
        f"{slow['streams']} streams at once (upstream: {slow['upstream']}); gateway "
        f"{slow['gateway']} ({slow['keys']} keys):",
        "",
        "| " + " | ".join(SLOW_COLUMNS) + " |",
        "|" + "---|" * len(SLOW_COLUMNS),
    ]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Benchmark of {report['date']} on {m['nproc']} x {m['cpu_model']} "
        f"(Linux {m['kernel']}, Python {m['python']}, {m['wrk']}); wrk 1 thread, "
        f"{report['settings']['duration_s']} s per cell, loopback, one process per system.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report["results"]]
    lines += ["", "Modes: " + "; ".join(f"`{k}`: {v}" for k, v in report["modes"].items()) + "."]
    if report["ttfc"]:
        lines += [
            "",
            "| system | upstream | first chunk p50 ms | p99 ms | whole stream p50 ms |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['system']} | {r['variant']} | {r['ttfc_p50_ms']:.2f} | {r['ttfc_p99_ms']:.2f}"
            f" | {r['total_p50_ms']:.2f} |"
            for r in report["ttfc"]
        ]
    lines += _slow_streams_md(report["checks"].get("slow_streams"))
    for issue, title in (
        (13, "Targets of issue #13"),
        (12, "Targets of issue #12"),
        (5, "Targets of issue #5"),
    ):
        rows = [t for t in report["targets"] if t.get("issue", 5) == issue]
        if not rows:
            continue
        lines += ["", f"{title}:", ""]
        lines += ["| target | value | goal | result | detail |", "|---|---|---|---|---|"]
        for t in rows:
            cells = [t["target"], _value(t["value"]), t["goal"], _verdict(t["pass"]), t["detail"]]
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    profile = report.get("profile")
    if isinstance(profile, dict):
        lines += _profile_md(profile)
    if report["not_measured"]:
        lines += ["", "Not measured:"]
        lines += [f"- {item}" for item in report["not_measured"]]
    return "\n".join(lines) + "\n"


def _profile_md(profile: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for mode in ("json", "stream"):
        part = profile.get(mode)
        if not isinstance(part, dict) or "self" not in part:
            continue
        lines += [
            "",
            f"py-spy, gateway-redis, {mode} @{profile['connections']} conn, "
            f"{part['samples']} samples ({part['rps_while_profiled']:.0f} req/s while sampled):",
            "",
            "| self % | function | | inclusive % | function |",
            "|---|---|---|---|---|",
        ]
        for own, incl in zip(part["self"][:15], part["inclusive"][:15], strict=False):
            lines.append(
                f"| {own['percent']} | `{own['function']}` | | "
                f"{incl['percent']} | `{incl['function']}` |"
            )
    return lines


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"modelscope-router benchmark ({report['date']})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("system", "mode") else "right")
    for row in report["results"]:
        table.add_row(*_cells(row))
    console.print(table)
    if report["ttfc"]:
        ttfc = Table(title="streaming: time to first chunk (1 connection)")
        for col in ("system", "upstream", "first chunk p50 ms", "p99 ms", "whole p50 ms"):
            ttfc.add_column(col)
        for r in report["ttfc"]:
            ttfc.add_row(
                r["system"],
                r["variant"],
                f"{r['ttfc_p50_ms']:.2f}",
                f"{r['ttfc_p99_ms']:.2f}",
                f"{r['total_p50_ms']:.2f}",
            )
        console.print(ttfc)
    slow = report["checks"].get("slow_streams")
    slow_rows = _slow_rows(slow)
    if slow_rows:
        table = Table(title=f"{slow['streams']} slow streams at once ({slow['upstream']})")
        for col in SLOW_COLUMNS:
            table.add_column(col)
        for r in slow_rows:
            table.add_row(*r)
        console.print(table)
    for issue, title in ((12, "targets of issue #12"), (5, "targets of issue #5")):
        rows = [t for t in report["targets"] if t.get("issue", 5) == issue]
        if not rows:
            continue
        targets = Table(title=title)
        for col in ("target", "value", "goal", "result", "detail"):
            targets.add_column(col)
        for t in rows:
            verdict = _verdict(t["pass"])
            style = {"PASS": "green", "FAIL": "red"}.get(verdict, "yellow")
            targets.add_row(
                escape(t["target"]),
                _value(t["value"]),
                escape(t["goal"]),
                f"[{style}]{verdict}[/]",
                escape(t["detail"]),
            )
        console.print(targets)
    for item in report["not_measured"]:
        console.print(f"[yellow]not measured:[/] {item}")
