"""The benchmark (bench/run.py) end to end, as short as it goes: every system answers.

No timing assertions: a shared CI machine says nothing about speed. Needs wrk and redis-server
(CI installs both with apt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SYSTEMS = {
    "direct",
    "passthrough",
    "gateway-redis",
    "gateway-sqlite",
    "gateway-redis-k2",
    "gateway-redis-k50",
}
KEYS = {
    "schema",
    "date",
    "machine",
    "settings",
    "modes",
    "systems",
    "results",
    "ttfc",
    "checks",
    "targets",
    "not_measured",
}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_benchmark_answers_on_every_system(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail(
            "wrk is not installed; the benchmark uses it as its load generator. "
            "Install it with `apt-get install wrk` (CI: add wrk to the apt list in .ci/run)."
        )
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: `apt-get install redis-server`")
    out = tmp_path / "results"
    args = ["--quick", "--skip-alternatives", "--duration", "1", "--connections", "1,4"]
    args += ["--modes", "json,stream", "--accounting-limit", "100", "--out", str(out)]
    args += ["--pool-sizes", "2,50"]  # the pool-size axis, small
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")},
            "COLUMNS": "160",
        },
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    assert report.keys() >= KEYS
    assert {"nproc", "cpu_model"} <= report["machine"].keys()
    assert {"redis_round_trips", "accounting", "memory", "workers"} <= report["checks"].keys()
    rows = report["results"]
    assert {r["system"] for r in rows} >= SYSTEMS
    for system in SYSTEMS:
        cells = {(r["mode"], r["connections"]) for r in rows if r["system"] == system}
        assert cells == {("json", 1), ("json", 4), ("stream", 1), ("stream", 4)}, system
    for row in rows:
        where = f"{row['system']} {row['mode']} @{row['connections']}"
        assert row["errors"] == 0, f"{where}: {row['error_detail']}"
        assert row["rps"] > 0, where
        for key in ("p50_ms", "p99_ms", "rss_mb"):
            assert key in row, where
    assert {r["system"] for r in report["ttfc"]} >= SYSTEMS
    assert all(t["samples"] > 0 and t["errors"] == 0 for t in report["ttfc"])
    assert report["targets"], "no targets judged"
    judged = {t["target"] for t in report["targets"]}
    assert "p50 50 keys / 2 keys, json @1 conn" in judged
    assert "| system |" in (out / "latest.md").read_text(encoding="utf-8")
