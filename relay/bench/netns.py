"""Network namespaces, veths and processes for ``relay bench nat``, all removed on the way out.

Everything here needs root. Every namespace and link gets a unique name, so a run never
touches anything it did not make; :class:`Resources` remembers what was made and
:meth:`Resources.aclose` removes it whatever happened (error, timeout, Ctrl-C).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import trio

from relay.bench.procs import STARTUP_TIMEOUT, BenchError, Child, Server, python

ATTACHED = re.compile(r"Attached (\S+) \((\S+)\) to (\S+) as (\S+)")
GUEST_MTU, SLIRP_MTU = 936, 1500
"""The relay's guest MTU (DHCP option 26), and slirp4netns's default MTU."""
SLIRP_GUEST = "10.0.2.100"
COMMAND_TIMEOUT = 30.0
"""Seconds any short command (``ip``, ``udhcpc``) may take."""

TOOLS = {
    "ip": "iproute2",
    "iperf3": "iperf3",
    "curl": "curl",
    "udhcpc": "udhcpc",
    "sha256sum": "coreutils",
}
"""Executables the benchmark runs, and the Debian package that has each."""

DHCP_SCRIPT = """#!/bin/sh
# udhcpc calls this with the lease in its environment: record it, then configure the link
# (never /etc/resolv.conf: that file is the host's).
env | grep -E '^(ip|subnet|router|dns|mtu|domain|lease|serverid)=' > "{out}.$1"
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "$router" dev "$interface"
    ;;
esac
exit 0
"""


def unique(prefix: str) -> str:
    """``prefix`` and 8 random hex digits; a 3-letter prefix fits IFNAMSIZ (15)."""
    return f"{prefix}{secrets.token_hex(4)}"


def check_host(tools: dict[str, str]) -> None:
    """BenchError (one line) unless we are root, with a TUN device and every tool."""
    if os.geteuid() != 0:
        raise BenchError("needs root (it makes network namespaces, veths and TAP devices)")
    if not Path("/dev/net/tun").exists():
        raise BenchError("/dev/net/tun is missing (TAP devices need it)")
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (Debian package {package})")


async def run(
    *cmd: str,
    limit: float = COMMAND_TIMEOUT,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to its end (bounded), without blocking the trio loop."""
    try:
        with trio.fail_after(limit):
            done = await trio.run_process(
                list(cmd), capture_stdout=True, capture_stderr=True, check=False, env=env
            )
    except trio.TooSlowError:
        raise BenchError(f"{' '.join(cmd)}: no answer after {limit:g} s") from None
    if check and done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(
            f"{' '.join(cmd)} exited {done.returncode}" + (f": {err[-1]}" if err else "")
        )
    return done


async def wait_for_text(path: Path, text: str, process: trio.Process, what: str) -> None:
    """Poll a log file until ``text`` shows (there is no event for "server ready")."""
    with trio.move_on_after(COMMAND_TIMEOUT):
        while process.returncode is None:
            try:
                if text in await trio.Path(path).read_text(errors="replace"):
                    return
            except FileNotFoundError:
                pass
            await trio.sleep(0.05)
        raise BenchError(f"{what} exited {process.returncode} before it was ready")
    raise BenchError(f"{what} not ready after {COMMAND_TIMEOUT:g} s")


async def wait_listening(host: str, port: int, what: str) -> None:
    """Another process's TCP server (in a namespace we reach) has bound its port."""
    with trio.move_on_after(COMMAND_TIMEOUT):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
    raise BenchError(f"{what} is not listening on {host}:{port} after {COMMAND_TIMEOUT:g} s")


@dataclass
class Resources:
    """What a run made: namespaces, root-namespace links, processes, child processes."""

    workdir: Path
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    processes: list[tuple[trio.Process, IO[bytes]]] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    async def netns(self, role: str) -> str:
        """A new namespace ``rbench-<role>-<hex>`` with ``lo`` up."""
        name = unique(f"rbench-{role}-")
        await run("ip", "netns", "add", name)
        self.namespaces.append(name)
        await run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    async def veth(self, ns: str, outer_cidr: str, inner_cidr: str) -> None:
        """A veth from the root namespace into ``ns``, addressed and up on both ends."""
        outer, inner = unique("rbv"), unique("rbv")
        await run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        await run("ip", "link", "set", inner, "netns", ns)
        await run("ip", "addr", "add", outer_cidr, "dev", outer)
        await run("ip", "link", "set", outer, "up")
        await run("ip", "-n", ns, "addr", "add", inner_cidr, "dev", inner)
        await run("ip", "-n", ns, "link", "set", inner, "up")

    async def start(self, name: str, *cmd: str, ns: str | None = None) -> trio.Process:
        """A long-running process (in ``ns`` if given), stdout and stderr to ``name``.log."""
        log = (self.workdir / f"{name}.log").open("wb")
        argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        try:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        except BaseException:
            log.close()
            raise
        self.processes.append((process, log))
        return process

    async def dhcp(self, ns: str, dev: str) -> dict[str, str]:
        """Configure ``dev`` in ``ns`` with busybox udhcpc; the lease it got."""
        script = self.workdir / f"udhcpc-{dev}.sh"
        out = self.workdir / f"lease-{dev}"
        script.write_text(DHCP_SCRIPT.format(out=out))
        script.chmod(0o755)
        udhcpc = ("udhcpc", "-f", "-q", "-n", "-i", dev, "-t", "5", "-T", "2", "-s", str(script))
        await run("ip", "netns", "exec", ns, *udhcpc, limit=40)
        lease = await trio.Path(f"{out}.bound").read_text()
        return dict(line.split("=", 1) for line in lease.splitlines() if "=" in line)

    async def aclose(self) -> None:
        """Remove everything, last made first; never raises, never waits long."""
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                await child.close(terminate=True)
            for process, log in reversed(self.processes):
                if process.returncode is None:
                    process.terminate()
                with trio.move_on_after(3):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    with trio.move_on_after(3):
                        await process.wait()
                log.close()
            for ns in reversed(self.namespaces):
                pids = await run("ip", "netns", "pids", ns, check=False)
                for pid in pids.stdout.split():
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, ValueError):
                        pass
                await run("ip", "netns", "del", ns, check=False)
            for link in self.links:
                await run("ip", "link", "del", link, check=False)


@dataclass
class Vm:
    """A guest: a namespace, its interface, its address, and who carries its frames."""

    ns: str
    dev: str
    ip: str
    pids: dict[str, int] = field(default_factory=dict)
    """Processes whose CPU a transfer of this guest costs, by label."""


def tap_command(url: str, cert_hash: str, dev: str, *extra: str) -> list[str]:
    """``relay tap`` attaching a new TAP device ``dev`` to the relay at ``url``."""
    return [
        python(),
        "-m",
        "relay",
        "tap",
        "--url",
        url,
        "--cert-hash",
        cert_hash,
        "--dev",
        dev,
        *extra,
    ]


async def attach_vm(res: Resources, role: str, relay: Server, url: str) -> Vm:
    """A namespace whose interface is a ``relay tap`` device, configured by DHCP."""
    ns, dev = await res.netns(role), unique("rbt")
    tap = await Child.start(f"tap-{role}", tap_command(url, relay.cert_hash, dev), res.workdir)
    res.children.append(tap)
    match = None
    with trio.move_on_after(STARTUP_TIMEOUT):
        while match is None:
            match = ATTACHED.search(await tap.readline())
    if match is None:
        raise tap.failure(f"not attached after {STARTUP_TIMEOUT:g} s")
    await run("ip", "link", "set", dev, "netns", ns)
    await run("ip", "-n", ns, "link", "set", dev, "up")
    lease = await res.dhcp(ns, dev)
    if lease.get("ip") != match.group(4) or lease.get("mtu") != str(GUEST_MTU):
        raise BenchError(f"{role}: DHCP gave {lease}, relay tap said {match.group(4)}")
    return Vm(ns, dev, match.group(4), {"relay": relay.pid, "tap": tap.pid})


async def attach_slirp(res: Resources, mtu: int = SLIRP_MTU) -> Vm:
    """A namespace connected by slirp4netns (10.0.2.100, default route via its 10.0.2.2)."""
    ns = await res.netns("slirp")
    process = await res.start(
        "slirp4netns",
        "slirp4netns",
        "--configure",
        f"--mtu={mtu}",
        "--disable-host-loopback",
        "--netns-type=path",
        f"/run/netns/{ns}",
        "tap0",
    )
    with trio.move_on_after(STARTUP_TIMEOUT):
        while process.returncode is None:
            shown = await run(
                "ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "tap0", check=False
            )
            if SLIRP_GUEST.encode() in shown.stdout:
                return Vm(ns, "tap0", SLIRP_GUEST, {"slirp4netns": process.pid})
            await trio.sleep(0.1)
        raise BenchError(f"slirp4netns exited {process.returncode}; see slirp4netns.log")
    raise BenchError(f"slirp4netns did not configure tap0 after {STARTUP_TIMEOUT:g} s")
