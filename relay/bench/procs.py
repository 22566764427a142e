"""Child processes of the benchmarks: start, talk line by line over pipes, measure, reap.

Every piece of a benchmark runs in its own OS process (the server under test and each client),
so a client's CPU never counts as the server's and ``/proc/<pid>`` figures are the server's
alone. Linux only: CPU and memory come from ``/proc``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

import relay

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0
"""Seconds a server or worker may take to start (import, certificate, handshake)."""

_HASH_LINE = re.compile(r"Certificate SHA-256 Hash \(hex\): ([0-9a-fA-F]{64})")
_LISTEN_LINE = re.compile(r"Listening on https://([^/]+)/")
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark process failed or stalled."""


def python() -> str:
    return sys.executable


def child_env() -> dict[str, str]:
    """The child environment: our ``relay`` package importable whatever the cwd."""
    env = dict(os.environ)
    root = str(Path(relay.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # fields[0] is the state (field 3): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def process_memory(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (resident peak) of ``pid``, in bytes."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024  # the kernel writes "kB": KiB
    if "VmRSS" not in found:
        raise OSError(f"no VmRSS in /proc/{pid}/status")
    return found


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    """The median of the finite values; NaN for none."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else (finite[middle - 1] + finite[middle]) / 2


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """A subprocess with line-oriented stdin/stdout and stderr in a log file."""

    def __init__(self, name: str, process: trio.Process, log_path: Path, log: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self._log = log
        self._buffer = bytearray()

    @classmethod
    async def start(cls, name: str, command: list[str], workdir: Path) -> Child:
        log_path = workdir / f"{name}.log"
        log = log_path.open("wb")
        try:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=workdir,
                env=child_env(),
            )
        except BaseException:
            log.close()
            raise
        return cls(name, process, log_path, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self, what: str) -> BenchError:
        code = self.process.returncode
        status = "" if code is None else f" (exit status {code})"
        text = tail(self.log_path)
        return BenchError(
            f"{self.name}: {what}{status}" + (f"; its stderr ends:\n{text}" if text else "")
        )

    async def readline(self) -> str:
        """The next stdout line; BenchError at end of file."""
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            index = self._buffer.find(b"\n")
            if index >= 0:
                line = bytes(self._buffer[: index + 1])
                del self._buffer[: index + 1]
                return line.decode("utf-8", "replace").rstrip("\r\n")
            data = await stdout.receive_some(65536)
            if not data:
                await self._reap(1.0)
                raise self.failure("exited early")
            self._buffer += data

    async def read_event(self, event: str) -> dict[str, Any]:
        """The next JSON line, which must be ``event``."""
        line = await self.readline()
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise self.failure(f"printed {line[:200]!r} instead of JSON") from None
        if not isinstance(message, dict) or message.get("event") != event:
            raise self.failure(f"sent {line[:200]!r}, expected a {event!r} event")
        return message

    async def send(self, command: str) -> None:
        stdin = self.process.stdin
        if stdin is None:
            return
        try:
            await stdin.send_all(command.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _reap(self, grace: float) -> None:
        with trio.move_on_after(grace):
            await self.process.wait()

    async def close(self, *, terminate: bool = False, grace: float = 3.0) -> None:
        """Ask the child to end (EOF on stdin, or SIGTERM), then kill it; always reap it."""
        with trio.CancelScope(shield=True):
            try:
                if self.process.stdin is not None:
                    await self.process.stdin.aclose()
                if terminate and self.process.returncode is None:
                    self.process.send_signal(signal.SIGTERM)
                await self._reap(grace)
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()
            finally:
                if self.process.stdout is not None:
                    await self.process.stdout.aclose()
                self._log.close()


@dataclass(frozen=True, slots=True)
class Server:
    """A running relay or echo server."""

    child: Child
    url: str
    cert_hash: str

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu(self) -> float:
        try:
            return process_cpu(self.child.pid)
        except OSError:
            raise self.child.failure("is gone") from None

    def memory(self) -> dict[str, int]:
        try:
            return process_memory(self.child.pid)
        except OSError:
            raise self.child.failure("is gone") from None

    def check_alive(self, during: str) -> None:
        if self.child.process.returncode is not None:
            raise self.child.failure(f"died {during}")


async def start_server(name: str, command: list[str], workdir: Path) -> Server:
    """Start a server and read its stdout until it says where it listens."""
    child = await Child.start(name, command, workdir)
    try:
        cert_hash = None
        with trio.move_on_after(STARTUP_TIMEOUT):
            while True:
                line = await child.readline()
                if match := _HASH_LINE.search(line):
                    cert_hash = match.group(1)
                elif match := _LISTEN_LINE.search(line):
                    if cert_hash is None:
                        raise child.failure("listens but printed no certificate hash")
                    return Server(child, f"https://{match.group(1)}", cert_hash)
        raise child.failure(f"not listening after {STARTUP_TIMEOUT:g} s")
    except BaseException:
        await child.close(terminate=True)
        raise


def relay_command(workdir: Path, log_level: str = "warning") -> list[str]:
    """How the relay under test is started (a function, so investigations can wrap it)."""
    return [
        python(),
        "-m",
        "relay",
        "serve",
        "--bind",
        HOST,
        "--port",
        "0",
        "--log-level",
        log_level,
        "--data-dir",
        str(workdir / "relay-data"),
    ]


async def start_relay(workdir: Path, log_level: str = "warning") -> Server:
    return await start_server("relay", relay_command(workdir, log_level), workdir)
