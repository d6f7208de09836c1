"""Processes of the benchmark: start in their own session, wait until ready, RSS, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int) -> tuple[float, int]:
    """RSS of ``pid`` and its descendants in MB, and how many processes that is."""
    pids = process_tree(pid)
    return round(sum(rss_kb(p) for p in pids) / 1024, 1), len(pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (alive ones)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


class Proc:
    """A child process in its own session (so npx or uvicorn children go with it)."""

    def __init__(
        self, name: str, args: Sequence[str], workdir: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.args = list(args)
        self.log_path = workdir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def rss_mb(self) -> tuple[float, int]:
        return tree_rss_mb(self.pid) if self.alive() else (0.0, 0)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid) if self.alive() else 0.0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the session this process leads, then SIGKILL after 10 s."""
        if self.popen is None:
            return
        pgid = self.popen.pid  # start_new_session: the child leads its own process group
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.popen.wait(5)
        # leftovers of the group (workers whose parent already left)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    async def wait_ready(
        self,
        url: str,
        limit_s: float = 30,
        headers: dict[str, str] | None = None,
        ok: Sequence[int] = (200,),
    ) -> None:
        deadline = time.monotonic() + limit_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode if self.popen else '?'}"
                        f":\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(
                        url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)
                    ) as reply:
                        if reply.status in ok:
                            return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready at {url} after {limit_s} s:\n{self.log_tail()}")
