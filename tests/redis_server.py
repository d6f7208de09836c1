"""A private redis-server on a free loopback port, for tests (never the shared one on 6379)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Start, stop, SIGKILL and restart one redis-server; its data dir survives restarts."""

    def __init__(self, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.binary = binary
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.appendonly = appendonly
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, appendonly: bool | None = None) -> RedisServer:
        """Start (again) on the same port; ``appendonly`` True keeps data across restarts."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        if appendonly is not None:
            self.appendonly = appendonly
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            # fsync every write: a SIGKILL right after a write must not lose it in tests
            "--appendfsync", "always",
            "--dir", str(self.dir),
            "--logfile", "redis.log",
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _answers_ping(self.port):
                return
            if not self.running:
                break
            time.sleep(0.02)  # polling a starting process, not synchronising tests
        log = self.dir / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self._reap(signal.SIGKILL)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}:\n{tail}")

    def _reap(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM)."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once (SIGKILL), as on a crash."""
        self._reap(signal.SIGKILL)

    def close(self) -> None:
        """Stop and delete the data dir."""
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
