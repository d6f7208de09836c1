"""Private Redis deployments on free loopback ports, for tests (never the shared one on 6379).

``RedisServer``: one redis-server. ``LocalCluster``: a Redis Cluster of masters with a replica
each. ``LocalSentinel``: a master, a replica and three sentinels watching them. All run from
Debian's binaries in temporary directories and are torn down by ``close``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import redis

START_TIMEOUT_S = 10.0
# A cluster forms, or a failover ends, well within this (node timeouts here are ~1 s).
SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.05  # polling a starting or converging process, not synchronising tests


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(200):
        port = _free_port()
        if port + 10000 <= 65535 and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port with a free port + 10000 for a cluster node")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds (bounded); returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (redis.RedisError, OSError):
            pass  # a node still starting or failing over: ask again
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(POLL_S)


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
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """``password``: --requirepass; ``tls``: listen with TLS only (--port 0 --tls-port);
        ``args``: more redis-server options (a later ``start`` uses ``self.args`` as it is then).
        """
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.binary = binary
        self.port = _free_port() if port is None else port
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.args = list(args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL a client uses: with the password, and for TLS rediss:// and the CA file."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client to this one server (plain TCP), for test set-up."""
        return redis.Redis(
            port=self.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=2,
            **kwargs,
        )

    def _extra_args(self) -> list[str]:
        args = [] if self.password is None else ["--requirepass", self.password]
        args += self.args
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


def _cli_auth(password: str | None) -> list[str]:
    return [] if password is None else ["-a", password, "--no-auth-warning"]


class _Started:
    """A group of servers as a context manager: started on entry, and nothing left running
    when it could not start or once the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalCluster(_Started):
    """A Redis Cluster on loopback: ``masters`` masters with ``replicas`` replicas each.

    Every node runs with ``--cluster-node-timeout node_timeout_ms`` (a master unreachable that
    long is failed over to its replica) and the same ``password`` (requirepass and masterauth).
    A killed node restarted by ``restart`` rejoins from its nodes.conf (as a replica once its
    slots were failed over).
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        password: str | None = None,
    ) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.replicas = replicas
        auth = [] if password is None else ["--masterauth", password]
        cluster_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--repl-diskless-sync-delay", "0",  # a (re)joining replica syncs at once
            *auth,
        ]  # fmt: skip
        self.nodes = [
            RedisServer(port=_free_cluster_port(), password=password, args=cluster_args)
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def seeds(self) -> str:
        """Every node as host:port, comma-separated (the host list of a redis+cluster:// URL)."""
        return ",".join(node.address for node in self.nodes)

    def url(self, *nodes: RedisServer) -> str:
        """A redis+cluster:// URL with the password, seeded by ``nodes`` (default: all)."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        seeds = ",".join(node.address for node in nodes) if nodes else self.seeds
        return f"redis+cluster://{auth}{seeds}"

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        create = [
            shutil.which("redis-cli") or "/usr/bin/redis-cli",
            *_cli_auth(self.password),
            "--cluster", "create", *(node.address for node in self.nodes),
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(create, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}"
            )
        self.wait_healthy()
        return self

    def _state(self, node: RedisServer) -> tuple[str, list[Any]]:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
            slots = client.execute_command("CLUSTER", "SLOTS")
        text = info if isinstance(info, str) else str(info)
        state = next(
            (
                line.split(":", 1)[1].strip()
                for line in text.splitlines()
                if "cluster_state" in line
            ),
            "",
        )
        return state, sorted((int(s[0]), int(s[1]), int(s[2][1]), len(s) - 3) for s in slots)

    def healthy(self) -> bool:
        """Every node up, cluster_state:ok on each, one slot map on all, every master
        with its replicas attached."""
        if not all(node.running for node in self.nodes):
            return False
        views = [self._state(node) for node in self.nodes]
        if any(state != "ok" for state, _ in views):
            return False
        maps = {tuple(tuple(r) for r in slots) for _, slots in views}
        if len(maps) != 1:
            return False
        (slot_map,) = maps
        covered = sum(end - start + 1 for start, end, _, _ in slot_map)
        return covered == 16384 and all(n == self.replicas for _, _, _, n in slot_map)

    def wait_healthy(self, timeout: float = SETTLE_TIMEOUT_S) -> float:
        return wait_for(self.healthy, timeout, "the cluster healthy (state ok, replicas synced)")

    def owner(self, key: str) -> RedisServer:
        """The master serving ``key``'s slot, as the running nodes see it."""
        node = next(n for n in self.nodes if n.running)
        with node.client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves the slot of {key!r}")

    def masters(self) -> list[RedisServer]:
        node = next(n for n in self.nodes if n.running)
        with node.client() as client:
            ports = {int(s[2][1]) for s in client.execute_command("CLUSTER", "SLOTS")}
        return [n for n in self.nodes if n.port in ports]

    def restart(self, node: RedisServer) -> None:
        """Start a killed node again (it rejoins from its nodes.conf)."""
        node.resume()
        if not node.running:
            node.start()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class SentinelProcess:
    """One redis-sentinel with its own config file (sentinels rewrite it) in a temp dir."""

    def __init__(self, port: int, config: str) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="sentinel-test-"))
        self.config = self.dir / "sentinel.conf"
        # Its log and its rewritten config stay in its own dir.
        self.config.write_text(f"dir {self.dir}\n{config}", encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-sentinel")
        command = (
            [binary, str(self.config)]
            if binary is not None
            else [shutil.which("redis-server") or "/usr/bin/redis-server", str(self.config),
                  "--sentinel"]
        )  # fmt: skip
        self._proc = subprocess.Popen(
            command, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)


class LocalSentinel(_Started):
    """A master and a replica (``password`` on both) watched by three sentinels (their own
    ``sentinel_password``): quorum 2, a master unreachable ``down_after_ms`` is failed over."""

    service = "mymaster"

    def __init__(
        self,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        sentinels: int = 3,
        quorum: int = 2,
    ) -> None:
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        auth = [] if password is None else ["--masterauth", password]
        auth += ["--repl-diskless-sync-delay", "0"]  # a (re)joining replica syncs at once
        self.master = RedisServer(password=password, args=auth)
        self.replica = RedisServer(
            password=password, args=[*auth, "--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.nodes = [self.master, self.replica]
        self.sentinels: list[SentinelProcess] = []
        for _ in range(sentinels):
            port = _free_port()
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                "daemonize no",
                "logfile sentinel.log",
                "sentinel resolve-hostnames no",
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} {quorum}",
                f"sentinel down-after-milliseconds {self.service} {down_after_ms}",
                f"sentinel failover-timeout {self.service} {failover_timeout_ms}",
                f"sentinel parallel-syncs {self.service} 1",
            ]
            if password is not None:
                lines.append(f"sentinel auth-pass {self.service} {password}")
            if sentinel_password is not None:
                lines += [
                    f"requirepass {sentinel_password}",
                    f"sentinel sentinel-pass {sentinel_password}",
                ]
            self.sentinels.append(SentinelProcess(port, "\n".join(lines) + "\n"))

    def url(self, db: int = 0, *, sentinel_password: bool = True) -> str:
        """redis+sentinel://:password@s1,s2,s3/service/db?sentinel_password=..."""
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        hosts = ",".join(s.address for s in self.sentinels)
        query = ""
        if sentinel_password and self.sentinel_password is not None:
            query = f"?sentinel_password={quote(self.sentinel_password, safe='')}"
        return f"redis+sentinel://{auth}{hosts}/{self.service}/{db}{query}"

    def _sentinel(self, sentinel: SentinelProcess) -> redis.Redis:
        return redis.Redis(port=sentinel.port, password=self.sentinel_password, socket_timeout=2)

    def current_master(self) -> RedisServer:
        """The node the sentinels name as master (asking the first that answers)."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError), self._sentinel(sentinel) as ask:
                _, port = ask.sentinel_get_master_addr_by_name(self.service)
                return next(n for n in self.nodes if n.port == int(port))
        raise RuntimeError("no sentinel answers")

    def start(self) -> LocalSentinel:
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_healthy()
        return self

    def healthy(self) -> bool:
        """Both nodes up, one master (with its replica in sync) that every sentinel names, and
        every sentinel seeing the other two and the replica up."""
        if not all(node.running for node in self.nodes) or not all(
            s.running for s in self.sentinels
        ):
            return False
        ports = set()
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            with self._sentinel(sentinel) as ask:
                state = ask.sentinel_master(self.service)
                replicas = ask.sentinel_slaves(self.service)
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return False
            if int(state["num-other-sentinels"]) != others:
                return False
            if not replicas or any(r["is_sdown"] or r["is_odown"] for r in replicas):
                return False
            ports.add(int(state["port"]))
        if len(ports) != 1:
            return False
        (port,) = ports
        master = next(n for n in self.nodes if n.port == port)
        with master.client() as client:
            info = client.info("replication")
        return (
            info.get("role") == "master"
            and int(info.get("connected_slaves", 0)) == 1
            and str(info.get("slave0", {}).get("state", "")) == "online"
        )

    def wait_healthy(self, timeout: float = SETTLE_TIMEOUT_S) -> float:
        return wait_for(self.healthy, timeout, "sentinel: one master with its replica in sync")

    def restart(self, node: RedisServer) -> None:
        """Start a killed node again, as a replica of the master the sentinels name now (as
        the master itself if they still name it: no failover happened)."""
        node.resume()
        if node.running:
            return
        master = self.current_master()
        auth = [] if self.password is None else ["--masterauth", self.password]
        auth += ["--repl-diskless-sync-delay", "0"]
        if master is not node:
            auth += ["--replicaof", "127.0.0.1", str(master.port)]
        node.args = auth
        node.start()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for node in self.nodes:
            node.close()
