"""One pipelined connection to Redis for the two hot-path scripts (reserve and settle).

redis-py's asyncio client spends ~90 µs of CPU on one EVALSHA (a pool checkout, a
StreamReader read, a timeout per call, its own parser and encoder). A ScriptLane is one
connection as an asyncio.Protocol with a hiredis Reader: a caller writes its whole command at
once (callers never interleave) and waits on a future; replies arrive in the order the
commands were written and resolve the oldest waiting future. Any number of callers share the
connection, each command pipelined behind the others.

Failures: a connect that fails or takes longer than the timeout, a lost connection or a
reply overdue by more than the timeout (a watchdog timer, armed while replies are pending,
instead of a timer per call) fail every pending caller with a redis-py ``RedisError``
(RedisStore turns it into a StoreError) and the next call reconnects. A command whose reply
was lost is never sent again: the script may have run, and a settle run twice would give a
call back twice. Only NOSCRIPT (the script did not run) is answered by SCRIPT LOAD and one
retry. A caller cancelled while waiting leaves its future cancelled; its reply is dropped
when it arrives, so every other caller still gets its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def bulks(*args: str | int | bytes) -> bytes:
    """Arguments as RESP bulk strings: text as UTF-8, an int as its digits (as redis-py)."""
    return b"".join(bulk(arg if isinstance(arg, bytes) else str(arg).encode()) for arg in args)


def pack(*args: str | int | bytes) -> bytes:
    """A command as a RESP array of bulk strings (the plain reference encoder)."""
    return b"*%d\r\n%s" % (len(args), bulks(*args))


def pack_fast(args: tuple[str | int | bytes, ...]) -> bytes:
    """``pack(*args)`` in C (hiredis): the same bytes, tested against ``pack``."""
    packed: bytes = hiredis.pack_command(cast(Any, args))  # its stub types a 1-tuple
    return packed


class LaneScript:
    """A Lua script run by EVALSHA on a lane (its SHA1, and SCRIPT LOAD after a NOSCRIPT)."""

    def __init__(self, source: str) -> None:
        data = source.encode()
        self.sha = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        self.load = pack("SCRIPT", "LOAD", data)


def _reply_error(reply: hiredis.ReplyError) -> RedisError:
    text = str(reply)
    code = text.partition(" ")[0]
    if code == "NOSCRIPT":
        return NoScriptError(text)
    if code in ("WRONGPASS", "NOAUTH"):
        return AuthenticationError(text)
    return ResponseError(text)


class LaneConnection(asyncio.Protocol):
    """One connection of a lane: writes whole commands, matches replies in FIFO order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, addr: str) -> None:
        self._loop = loop
        self._timeout = timeout
        self._addr = addr
        self._reader = hiredis.Reader()
        # (future, when the command was written); None: a handshake reply that must be OK.
        self._waiting: deque[tuple[asyncio.Future[Any] | None, float]] = deque()
        self._transport: asyncio.Transport | None = None
        # Commands written in one turn of the event loop go out in one write (one syscall,
        # which costs more than the rest of a reserve together): see _write.
        self._outbox: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = loop.create_future()
        # Set once the connection is dead: (error type, message) its callers got.
        self.failed: tuple[type[RedisError], str] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            reply = reader.gets()
            while reply is not False:
                if not waiting:
                    self.fail(RedisConnectionError, f"Unexpected reply from {self._addr}")
                    return
                future = waiting.popleft()[0]
                if future is None:  # AUTH / SELECT / CLIENT SETNAME
                    if reply != b"OK":
                        error = (
                            _reply_error(reply) if isinstance(reply, hiredis.ReplyError) else None
                        )
                        kind = type(error) if error is not None else RedisConnectionError
                        self.fail(kind, f"Handshake with {self._addr} refused: {reply}")
                        return
                elif not future.done():  # a cancelled caller's reply is dropped
                    future.set_result(reply)
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            self.fail(RedisConnectionError, f"Protocol error from {self._addr}: {exc}")

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost fails whatever is pending

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ""
        self.fail(RedisConnectionError, f"Connection to {self._addr} lost{why}")
        self._transport = None
        if not self._lost.done():
            self._lost.set_result(None)

    # -- the lane's side -----------------------------------------------------------------

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Write one whole command; the future gets its reply (a ReplyError as a value)."""
        if self.failed is not None:
            raise self.failed[0](self.failed[1])
        future: asyncio.Future[Any] = self._loop.create_future()
        self._write(command, future)
        return future

    def send_checked(self, command: bytes) -> None:
        """Write a handshake command whose reply must be +OK (else the connection fails)."""
        self._write(command, None)

    def _write(self, command: bytes, future: asyncio.Future[Any] | None) -> None:
        assert self._transport is not None
        now = self._loop.time()
        self._waiting.append((future, now))
        outbox = self._outbox
        if len(self._waiting) == 1 and not outbox:
            # Nothing else in flight: out at once (a lone request does not wait a turn).
            self._transport.write(command)
        else:
            outbox.append(command)
            if len(outbox) == 1:
                self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(now + self._timeout, self._check)

    def _flush(self) -> None:
        """Write what this turn of the loop queued behind replies still awaited: requests that
        reach their reserve together share one send (auto-pipelining)."""
        outbox = self._outbox
        if not outbox:
            return  # failed in between: fail() emptied it
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        if self._transport is not None:
            self._transport.write(data)

    def _check(self) -> None:
        """Watchdog: fail the connection when the oldest pending reply is overdue."""
        self._watchdog = None
        if not self._waiting or self.failed is not None:
            return  # disarmed until the next write
        deadline = self._waiting[0][1] + self._timeout
        if self._loop.time() >= deadline:
            self.fail(RedisTimeoutError, f"Timeout reading from {self._addr}")
        else:
            self._watchdog = self._loop.call_at(deadline, self._check)

    def fail(self, kind: type[RedisError], message: str) -> None:
        """Mark the connection dead, fail every pending caller, drop the transport."""
        if self.failed is None:
            self.failed = (kind, message)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._outbox.clear()
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if future is not None and not future.done():
                future.set_exception(kind(message))  # one instance per caller
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self) -> None:
        """Fail what is pending and wait (at most the timeout) until the transport is gone."""
        if self._transport is not None:
            self.fail(RedisConnectionError, f"Connection to {self._addr} closed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(self._lost)


class ScriptLane:
    """EVALSHA of the hot-path scripts on one auto-pipelined connection (see the module doc).

    Build it with ``for_url`` or ``for_client``: they read redis-py's own connection
    settings and return None for settings a lane does not carry out (the caller keeps
    redis-py then). ``timeout`` bounds the connect and how long a reply may be overdue.
    """

    def __init__(
        self,
        *,
        timeout: float,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        tls: RedisSSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        client_name: str | None = None,
        keepalive: bool = False,
    ) -> None:
        self._timeout = timeout
        self._host = host
        self._port = port
        self._path = path
        self._tls = tls
        self._keepalive = keepalive
        self._addr = path if path is not None else f"{host}:{port}"
        handshake: list[bytes] = []
        if password is not None:
            auth = ("AUTH", password) if username is None else ("AUTH", username, password)
            handshake.append(pack(*auth))
        if db:
            handshake.append(pack("SELECT", db))
        if client_name:
            handshake.append(pack("CLIENT", "SETNAME", client_name))
        self._handshake = tuple(handshake)
        self._link: LaneConnection | None = None
        self._connecting: asyncio.Task[LaneConnection] | None = None
        self._closed = False

    def __repr__(self) -> str:  # never the password
        return f"ScriptLane({self._addr!r}, tls={self._tls is not None})"

    @classmethod
    def for_url(cls, url: str, *, timeout: float) -> ScriptLane | None:
        """A lane with the settings redis-py reads from ``url`` (None: keep redis-py)."""
        pool = ConnectionPool.from_url(url)
        return cls.from_settings(pool.connection_class, pool.connection_kwargs, timeout=timeout)

    @classmethod
    def for_client(cls, client: Redis, *, timeout: float) -> ScriptLane | None:
        """A lane to where ``client`` connects, with its settings (None: keep redis-py)."""
        pool = client.connection_pool
        return cls.from_settings(pool.connection_class, pool.connection_kwargs, timeout=timeout)

    @classmethod
    def from_settings(
        cls, connection_class: type[Any], kwargs: Mapping[str, Any], *, timeout: float
    ) -> ScriptLane | None:
        """A lane for redis-py's connection settings; None for what a lane does not do.

        Not done here (redis-py keeps reserve and settle): a credential provider, a connect
        callback, RESP3, and connection classes other than redis-py's own three.
        """
        if kwargs.get("credential_provider") is not None:
            return None
        if kwargs.get("redis_connect_func") is not None:
            return None
        if kwargs.get("protocol") not in (None, 2, "2"):
            return None
        common: dict[str, Any] = {
            "timeout": timeout,
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "db": int(kwargs.get("db") or 0),
            "client_name": kwargs.get("client_name"),
        }
        if connection_class is UnixDomainSocketConnection:
            return cls(path=kwargs.get("path", ""), **common)
        if connection_class not in (Connection, SSLConnection):
            return None  # a subclass of redis-py's connections may do anything
        common.update(
            host=kwargs.get("host", "localhost"),
            port=int(kwargs.get("port", 6379)),
            keepalive=bool(kwargs.get("socket_keepalive")),
        )
        if connection_class is Connection:
            return cls(**common)
        try:  # as SSLConnection builds it, with SSLConnection's defaults
            context = RedisSSLContext(
                keyfile=kwargs.get("ssl_keyfile"),
                certfile=kwargs.get("ssl_certfile"),
                cert_reqs=kwargs.get("ssl_cert_reqs", "required"),
                include_verify_flags=kwargs.get("ssl_include_verify_flags"),
                exclude_verify_flags=kwargs.get("ssl_exclude_verify_flags"),
                ca_certs=kwargs.get("ssl_ca_certs"),
                ca_data=kwargs.get("ssl_ca_data"),
                ca_path=kwargs.get("ssl_ca_path"),
                check_hostname=kwargs.get("ssl_check_hostname", True),
                min_version=kwargs.get("ssl_min_version"),
                ciphers=kwargs.get("ssl_ciphers"),
                password=kwargs.get("ssl_password"),
            )
        except RedisError:
            return None  # a setting redis-py refuses: let it say so, on the first call
        return cls(tls=context, **common)  # its SSLContext is built (files read) at connect

    async def run(self, script: LaneScript, command: bytes) -> Any:
        """EVALSHA ``command`` (packed for ``script``): its reply; RedisError on failure."""
        link = self._link
        if link is None or link.failed is not None:
            link = await self._connect()
        reply = await link.send(command)
        if isinstance(reply, hiredis.ReplyError):
            error = _reply_error(reply)
            if not isinstance(error, NoScriptError):
                raise error
            # NOSCRIPT: the script did not run, so loading it and running again is safe.
            await self.call(script.load)
            reply = await self.call(command)
        return reply

    async def call(self, command: bytes) -> Any:
        """Any packed command: its reply; an error reply is raised as a RedisError."""
        link = self._link
        if link is None or link.failed is not None:
            link = await self._connect()
        reply = await link.send(command)
        if isinstance(reply, hiredis.ReplyError):
            raise _reply_error(reply)
        return reply

    async def _connect(self) -> LaneConnection:
        """One connect for every caller that needs it now (a failed one is not retried)."""
        if self._closed:
            raise RedisConnectionError(f"Connection to {self._addr} closed")
        task = self._connecting
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(self._opened)
            self._connecting = task
        # shield: a cancelled caller does not cancel the connect the others wait for
        return await asyncio.shield(task)

    def _opened(self, task: asyncio.Task[LaneConnection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled

    async def _open(self) -> LaneConnection:
        loop = asyncio.get_running_loop()
        link = LaneConnection(loop, self._timeout, self._addr)
        try:
            async with asyncio.timeout(self._timeout):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: link, self._path)
                else:
                    tls = None if self._tls is None else self._tls.get()
                    transport, _ = await loop.create_connection(
                        lambda: link, self._host, self._port, ssl=tls
                    )
                    sock = transport.get_extra_info("socket")
                    if self._keepalive and sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"Timeout connecting to {self._addr}") from exc
        except OSError as exc:  # refused, unreachable, TLS verification failed
            raise RedisConnectionError(f"Error connecting to {self._addr}: {exc}") from exc
        if self._closed:
            await link.aclose()
            raise RedisConnectionError(f"Connection to {self._addr} closed")
        for command in self._handshake:  # pipelined ahead of the first command
            link.send_checked(command)
        self._link = link
        return link

    async def aclose(self) -> None:
        """Close the connection (callers still waiting fail); later calls fail too."""
        self._closed = True
        task = self._connecting
        if task is not None:  # a connect under way closes its connection itself (_open)
            with contextlib.suppress(RedisError):
                await asyncio.shield(task)
        link, self._link = self._link, None
        if link is not None:
            await link.aclose()
