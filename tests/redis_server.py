"""A private redis-server on a free loopback port, for tests (never the shared one on 6379)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RedisTls:
    """PEM files for a TLS-only redis-server: its certificate and key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


def _answers_ping(
    port: int, password: str | None = None, tls: ssl.SSLContext | None = None
) -> bool:
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            if tls is not None:
                sock = stack.enter_context(tls.wrap_socket(sock, server_hostname="127.0.0.1"))
            if password is not None:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Start, stop, SIGKILL and restart one redis-server; its data dir survives restarts."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        """``password``: --requirepass; ``tls``: listen with TLS only (--port 0 --tls-port)."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.binary = binary
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL a client uses: with the password, and for TLS rediss:// and the CA file."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"

    def _extra_args(self) -> list[str]:
        args = [] if self.password is None else ["--requirepass", self.password]
        if self.tls is not None:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return args

    def _ping_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca))

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
            *self._extra_args(),  # later options win: --port 0 when TLS-only
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _answers_ping(self.port, self.password, self._ping_context()):
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

    def pause(self) -> None:
        """Hang (SIGSTOP): connections are accepted by the kernel but nothing answers."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Carry on after pause() (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop and delete the data dir."""
        self.resume()  # a paused server would not act on SIGTERM
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
