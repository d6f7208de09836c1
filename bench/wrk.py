"""Driving wrk: a Lua script per target (POST body, headers, a ``done`` callback printing JSON)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = "BENCH_JSON "
LIMIT_MARK = "BENCH_LIMIT_REACHED"

# wrk runs one Lua state per thread plus one for setup/done; with one thread, the counters
# of the thread are read back in done() through thread:get().
_LUA = """\
wrk.method = "POST"
wrk.body = {body}
{headers}
local limit = {limit}
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
end
{response}
function done(summary, latency, requests)
  local ok, refused = 0, 0
  for _, t in ipairs(threads) do
    ok = ok + (t:get("ok") or 0)
    refused = refused + (t:get("refused") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "{mark}{{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,"
    .. "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,"
    .. "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"mean_us\\":%.1f,\\"max_us\\":%d,"
    .. "\\"ok\\":%d,\\"refused\\":%d}}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, ok, refused))
end
"""

# Only when counting: a response() callback makes wrk parse every answer's headers into Lua.
_COUNTING = """\
ok, refused = 0, 0
local seen = 0
function response(status, headers, body)
  seen = seen + 1
  if status == 200 then ok = ok + 1 else refused = refused + 1 end
  if limit > 0 and seen == limit then
    wrk.thread:stop()
    -- wrk's main thread sleeps for the whole -d; the runner answers this line with SIGINT
    io.write("{limit_mark}\\n")
    io.flush()
  end
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII


@dataclass(frozen=True)
class Target:
    """Where and what wrk sends."""

    url: str  # full URL of the endpoint
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    error_detail: dict[str, int]
    ok: int = 0  # only counted when a request limit was given
    refused: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit(
            "wrk is not installed: the benchmark needs it as its load generator.\n"
            "  Debian/Ubuntu: sudo apt-get install wrk\n"
            "  macOS:         brew install wrk"
        )
    return found


def write_script(path: Path, target: Target, limit: int = 0, count: bool = False) -> Path:
    headers = "\n".join(
        f"wrk.headers[{lua_string(k)}] = {lua_string(v)}"
        for k, v in {"Content-Type": "application/json", **target.headers}.items()
    )
    script = _LUA.format(
        body=lua_string(json.dumps(target.body, separators=(",", ":"))),
        headers=headers,
        limit=limit,
        response=_COUNTING.replace("{limit_mark}", LIMIT_MARK) if (count or limit) else "",
        mark=MARK,
    )
    path.write_text(script, encoding="utf-8")
    return path


def parse(stdout: str) -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result line:\n{stdout[-2000:]}")
    raw = json.loads(line[len(MARK) :])
    detail = {k: int(raw[k]) for k in ("connect", "read", "write", "status", "timeout")}
    duration = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"],
        duration_s=round(duration, 3),
        rps=round(raw["requests"] / duration, 1) if duration else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        mean_ms=round(raw["mean_us"] / 1000, 3),
        max_ms=raw["max_us"] / 1000,
        errors=sum(detail.values()),
        error_detail=detail,
        ok=raw["ok"],
        refused=raw["refused"],
    )


async def run_wrk(
    target: Target,
    *,
    connections: int,
    duration_s: int,
    script_dir: Path,
    limit: int = 0,
    count: bool = False,
    timeout_s: int = 10,
) -> WrkResult:
    """One wrk run with one thread; ``limit`` stops it after that many answers."""
    script = write_script(script_dir / "wrk-script.lua", target, limit=limit, count=count)
    args = [
        wrk_binary(),
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        target.url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith(LIMIT_MARK):
                # SIGINT ends wrk's sleep at once; it then prints its summary as usual
                proc.send_signal(signal.SIGINT)
            lines.append(line)
        err = await proc.stderr.read() if proc.stderr is not None else b""
        await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0 or b"wrk-script.lua" in err:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode(errors='replace')}")
    return parse("".join(lines))
