"""Network namespaces and TAP attachments for end-to-end tests with real Linux stacks.

Every namespace, veth and TAP device a test makes has a unique name and is removed when the
test ends, pass or fail. Needs root (CI runs as root); otherwise the tests skip, or fail in
strict mode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from conftest import skip_or_fail

from relay.bench.netns import ATTACHED, DHCP_SCRIPT, tap_command, unique


def require_netns() -> None:
    """Skip (or fail in strict mode) where namespaces cannot be made."""
    if os.geteuid() != 0:
        skip_or_fail("network namespace tests need root")
    if shutil.which("ip") is None:
        skip_or_fail("ip (iproute2) is not installed (scripts/test installs it)")
    if not Path("/dev/net/tun").exists():
        skip_or_fail("/dev/net/tun is missing")


def sh(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class Netns:
    """A network namespace of the test's own; :meth:`create` it, :meth:`aclose` removes it."""

    name: str
    processes: list[trio.Process] = field(default_factory=list)

    @classmethod
    def create(cls) -> Netns:
        """A new namespace ``relay-t-<random>`` with ``lo`` up."""
        require_netns()
        ns = cls(unique("relay-t-"))
        try:
            sh("ip", "netns", "add", ns.name)
        except subprocess.CalledProcessError as exc:
            skip_or_fail(f"ip netns add failed: {exc.stderr.strip()}")
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    async def aclose(self) -> None:
        """Kill what runs inside, then delete the namespace (its virtual links go with it)."""
        with trio.CancelScope(shield=True):
            for process in self.processes:
                if process.returncode is None:
                    process.kill()
                with trio.move_on_after(5):
                    await process.wait()
            for pid in sh("ip", "netns", "pids", self.name, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", self.name, check=False)

    def run(
        self, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, timeout=timeout, check=check)

    async def arun(
        self, *cmd: str, seconds: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run in the namespace without blocking the test's trio loop (the relay runs there)."""
        with trio.fail_after(seconds):
            return await trio.run_process(
                ["ip", "netns", "exec", self.name, *cmd],
                capture_stdout=True,
                capture_stderr=True,
                check=check,
            )

    async def popen(self, *cmd: str, **options: Any) -> trio.Process:
        """Start a long-running command inside (killed by :meth:`aclose` at the latest)."""
        process = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", self.name, *cmd], **options
        )
        self.processes.append(process)
        return process

    def move_in(self, dev: str) -> None:
        """Move link ``dev`` from the root namespace in here and bring it up."""
        sh("ip", "link", "set", dev, "netns", self.name)
        self.run("ip", "link", "set", dev, "up")

    async def ping(self, target: str, *extra: str, count: int = 3, wait: int = 2) -> bool:
        """``ping -c count -W wait`` got replies (async: the relay under test shares our loop).
        Where no reply is expected, ``wait=1`` keeps it short: a local LAN answers in ms."""
        done = await self.arun(
            "ping", "-c", str(count), "-i", "0.2", "-W", str(wait), *extra, target, check=False
        )
        return done.returncode == 0

    async def dhcp(self, dev: str, tmp: Path) -> dict[str, str]:
        """Run udhcpc on ``dev``; the lease it got, as udhcpc reported it."""
        script = tmp / f"udhcpc-{dev}.sh"
        out = tmp / f"lease-{dev}"
        script.write_text(DHCP_SCRIPT.format(out=out))
        script.chmod(0o755)
        await self.arun(
            "udhcpc",
            "-f",
            "-q",
            "-n",
            "-i",
            dev,
            "-t",
            "5",
            "-T",
            "2",
            "-s",
            str(script),
            seconds=40,
        )
        lease = await trio.Path(f"{out}.bound").read_text()
        return dict(line.split("=", 1) for line in lease.splitlines() if "=" in line)


@dataclass
class Tap:
    """A ``relay tap`` process and the TAP device it attached, moved into a namespace."""

    process: trio.Process
    dev: str
    mac: str
    ip: str
    url: str
    lines: list[str] = field(default_factory=list)
    _buffer: bytes = b""

    async def next_attached(self, seconds: float = 30) -> re.Match[str]:
        """Wait for the next ``Attached ...`` line on the tool's stdout."""
        assert self.process.stdout is not None
        with trio.fail_after(seconds):
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    self.lines.append(text)
                    match = ATTACHED.search(text)
                    if match:
                        return match
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"relay tap exited: {self.lines}")
                self._buffer += chunk


@asynccontextmanager
async def namespaces(count: int) -> AsyncIterator[list[Netns]]:
    """``count`` fresh namespaces, removed on the way out whatever happened."""
    made: list[Netns] = []
    try:
        for _ in range(count):
            made.append(Netns.create())
        yield made
    finally:
        for ns in made:
            await ns.aclose()


@asynccontextmanager
async def tap_into(
    ns: Netns, url: str, cert_hash: str, extra: Sequence[str] = (), log: Path | None = None
) -> AsyncIterator[Tap]:
    """Run ``relay tap`` in the root namespace (it reaches the relay on loopback) and move its
    device into ``ns``: the open TAP file descriptor stays attached across the move. Its log
    (stderr) goes to ``log`` if given."""
    dev = unique("rt")
    stderr = None if log is None else log.open("ab")
    process = await trio.lowlevel.open_process(
        tap_command(url, cert_hash, dev, *extra),
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    tap = Tap(process, dev, "", "", url)
    try:
        attached = await tap.next_attached()
        tap.mac, tap.url, tap.ip = attached.group(2), attached.group(3), attached.group(4)
        ns.move_in(dev)
        yield tap
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        if stderr is not None:
            stderr.close()
        sh("ip", "link", "del", dev, check=False)
        ns.run("ip", "link", "del", dev, check=False)


@asynccontextmanager
async def veth_to(ns: Netns, host_ip: str, ns_ip: str) -> AsyncIterator[None]:
    """A veth pair from the root namespace into ``ns``, addressed /30 on both ends."""
    outer, inner = unique("rv"), unique("rv")
    sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    try:
        sh("ip", "link", "set", inner, "netns", ns.name)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", outer)
        sh("ip", "link", "set", outer, "up")
        ns.run("ip", "addr", "add", f"{ns_ip}/30", "dev", inner)
        ns.run("ip", "link", "set", inner, "up")
        yield
    finally:
        sh("ip", "link", "del", outer, check=False)
