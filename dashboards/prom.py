"""A private Prometheus server on loopback, and a tiny client for its HTTP API.

Used by ``dashboards/render.py --demo`` and by the tests (``tests/prometheus_server.py``), so
there is one implementation. The server gets a free port, a temporary storage directory and a
config that scrapes the given targets every second (optionally loading rule files, evaluated
every second too). ``start()`` waits until ``/-/ready`` answers; ``stop()`` sends SIGTERM and
waits, then removes the directory.

The binary is ``$PROMETHEUS``, else ``prometheus`` on PATH, else ``/usr/bin/prometheus``
(Debian/Ubuntu: ``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

INSTALL_HINT = (
    "the prometheus binary was not found (looked at $PROMETHEUS, PATH and /usr/bin/prometheus); "
    "install it (Debian/Ubuntu: apt-get install prometheus) or set PROMETHEUS=/path/to/prometheus"
)
START_TIMEOUT_S = 30.0


class PrometheusNotFound(RuntimeError):
    """No prometheus binary; the message says how to install one."""


class PrometheusError(RuntimeError):
    """The HTTP API answered with an error (bad expression, server failure)."""


def find_prometheus() -> str:
    """The prometheus binary, or PrometheusNotFound with an install hint."""
    for candidate in (
        os.environ.get("PROMETHEUS"),
        shutil.which("prometheus"),
        "/usr/bin/prometheus",
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PrometheusNotFound(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def api_get(base_url: str, path: str, params: dict[str, str] | None = None) -> Any:
    """GET ``/api/v1/<path>``; returns ``data`` or raises PrometheusError."""
    url = f"{base_url.rstrip('/')}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - checked above
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 400/422/503 carry a JSON error body
        try:
            body = json.loads(exc.read())
        except ValueError:
            raise PrometheusError(f"GET {url}: HTTP {exc.code}") from None
    except OSError as exc:  # refused, unreachable, timed out
        raise PrometheusError(f"GET {url}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"{body.get('errorType')}: {body.get('error')} (GET {url})")
    return body["data"]


def query(base_url: str, expr: str, at: float | None = None) -> dict[str, Any]:
    """An instant query: ``{"resultType": ..., "result": [...]}``."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data: dict[str, Any] = api_get(base_url, "query", params)
    return data


def query_range(
    base_url: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    """A range query: the ``result`` list of matrix series."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    data = api_get(base_url, "query_range", params)
    result: list[dict[str, Any]] = data["result"]
    return result


class PrometheusServer:
    """``with PrometheusServer(["127.0.0.1:8080"]) as prom: prom.query("up")``."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        job: str = "modelscope-router",
        metrics_path: str = "/metrics",
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_prometheus()
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.metrics_path = metrics_path
        self.port = 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout: float = START_TIMEOUT_S) -> PrometheusServer:
        if self._proc is not None:
            raise RuntimeError("prometheus is already running")
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        config_path = self.dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        self.port = free_port()
        args = [
            self.binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - our own argument list
                args, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except OSError:  # refused while starting, 503 while replaying the WAL
                pass
            time.sleep(0.05)  # polling a starting process
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if self.dir is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 10 s), then delete the storage directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        return query(self.url, expr, at)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return query_range(self.url, expr, start, end, step)

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        return api_get(self.url, path, params)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
