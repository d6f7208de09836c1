"""The targets of issue #5, judged from one run; the JSON, the Markdown and the terminal table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
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
    name: str, value: Any, target: str, passed: bool | None, detail: str = ""
) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": target, "pass": passed, "detail": detail}


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


def _latency(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode in ("json", "stream"):
        base = _row(results, "direct", mode, 1)
        floor = _row(results, "passthrough", mode, 1)
        if base is None or floor is None:
            continue
        floor_added = floor["p50_ms"] - base["p50_ms"]
        for gw in GATEWAYS:
            row = _row(results, gw, mode, 1)
            if row is None:
                continue
            added = round(row["p50_ms"] - base["p50_ms"], 3)
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
                "RSS of the Redis gateway after 100k requests",
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
            value = run["scripts_per_request"]
            commands = run["client_commands_per_request"]
            out.append(
                _target(
                    f"Redis round trips per request @{run['connections']} conn (steady state)",
                    value,
                    "== 1",
                    abs(value - 1.0) < 0.005,
                    f"EVALSHA per request over {run['proxied']} requests; all socket reads: "
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


def _pool_sizes(results: list[dict[str, Any]], connections: list[int]) -> list[dict[str, Any]]:
    """Issue #12: the largest pool against the smallest, in the same run (json mode)."""
    sizes = sorted(
        int(r["system"].removeprefix("gateway-redis-k"))
        for r in results
        if r["system"].startswith("gateway-redis-k")
        and r["mode"] == "json"
        and r["connections"] == 1
    )
    if len(sizes) < 2:
        return []
    small, large = f"gateway-redis-k{sizes[0]}", f"gateway-redis-k{sizes[-1]}"
    c = 16 if 16 in connections else max(connections)
    out = []
    # (connections, field, unit, goal, whether the ratio large/small meets it)
    for conns, field, unit, goal, met in (
        (c, "rps", "req/s", ">= 0.9x", lambda r: r >= 0.9),
        (1, "p50_ms", "ms", "<= 1.1x", lambda r: r <= 1.1),
    ):
        lo, hi = _row(results, small, "json", conns), _row(results, large, "json", conns)
        if lo is None or hi is None or not lo[field]:
            continue
        ratio = round(hi[field] / lo[field], 2)
        what = "throughput" if field == "rps" else "p50"
        out.append(
            _target(
                f"{what} {sizes[-1]} keys / {sizes[0]} keys, json @{conns} conn",
                ratio,
                goal,
                met(ratio),
                f"{hi[field]:.2f} vs {lo[field]:.2f} {unit}",
            )
        )
    return out


def judge(
    results: list[dict[str, Any]],
    ttfc: list[dict[str, Any]],
    checks: dict[str, Any],
    connections: list[int],
) -> list[dict[str, Any]]:
    return [
        *_throughput(results, connections),
        *_pool_sizes(results, connections),
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
        str(row.get("cpu_us_per_request", "")),
    ]


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


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
    lines += ["", "| target | value | goal | result | detail |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        cells = [t["target"], str(t["value"]), t["goal"], _verdict(t["pass"]), t["detail"]]
        lines.append("| " + " | ".join(cells) + " |")
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
    targets = Table(title="targets")
    for col in ("target", "value", "goal", "result", "detail"):
        targets.add_column(col)
    for t in report["targets"]:
        verdict = _verdict(t["pass"])
        style = {"PASS": "green", "FAIL": "red"}.get(verdict, "yellow")
        targets.add_row(
            t["target"], str(t["value"]), t["goal"], f"[{style}]{verdict}[/]", t["detail"]
        )
    console.print(targets)
    for item in report["not_measured"]:
        console.print(f"[yellow]not measured:[/] {item}")
