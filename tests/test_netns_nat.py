"""The NAT with real Linux stacks: a VM namespace on the relay's LAN (``relay tap``) reaches
an "internet" namespace of the test's own over a veth, through the relay's host sockets.

The internet side runs dnsmasq, an HTTP server and iperf3 at 198.19.7.2 (a benchmarking
range the default egress policy denies; the tests open exactly it with ``--egress-allow``).
198.19.7.1 is the relay host's end of the veth, and so one of its own addresses.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from conftest import relay_url, require_tool
from netns import Netns, Tap, namespaces, sh, tap_into, unique
from test_netns_lan import relay_config, start_relay_in

from relay.bench.lossy import LossyForwarder
from relay.bench.netns import wait_listening
from relay.config import RelayConfig
from relay.nat.limits import NatLimits
from relay.nat.service import Nat
from relay.nat.settings import IcmpMode
from relay.server import Listening

pytestmark = pytest.mark.netns

TESTS = Path(__file__).resolve().parent
HOST_SIDE, SERVER, NOBODY = "198.19.7.1", "198.19.7.2", "198.19.7.3"
ALLOW = f"{SERVER}/31"  # the server and an address nobody answers at
HTTP_PORT, IPERF_PORT = 8080, 5201
BIG = 50 * 1024 * 1024
LOSSY = 10 * 1024 * 1024
"""Under loss the transfers take minutes at 50 MB on this machine: 10 MB each way."""


@asynccontextmanager
async def internet(ns: Netns, www: Path) -> AsyncIterator[None]:
    """The veth to ``ns`` (198.19.7.0/24: not the benchmark's 198.18.0.0/24) and its servers."""
    for tool in ("dnsmasq", "iperf3"):
        require_tool(tool)
    outer, inner = unique("rv"), unique("rv")
    sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    try:
        sh("ip", "link", "set", inner, "netns", ns.name)
        sh("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", outer)
        sh("ip", "link", "set", outer, "up")
        ns.run("ip", "addr", "add", f"{SERVER}/24", "dev", inner)
        ns.run("ip", "link", "set", inner, "up")
        await ns.popen(
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={SERVER}",
            "--conf-file=/dev/null",
            "--address=/nat-lookup.test/192.0.2.55",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await ns.popen("iperf3", "--server", "--bind", SERVER, stdout=subprocess.DEVNULL)
        http = await ns.popen(
            sys.executable,
            str(TESTS / "nat_http_server.py"),
            SERVER,
            str(HTTP_PORT),
            str(www),
            stdout=subprocess.PIPE,
        )
        assert http.stdout is not None
        with trio.fail_after(15):
            assert (await http.stdout.receive_some(64)).startswith(b"ready")
        with trio.fail_after(15):  # dnsmasq is up when it answers (dig waits 1 s per try)
            dig = ["dig", f"@{SERVER}", "nat-lookup.test", "+short", "+time=1", "+tries=1"]
            while True:
                done = await trio.run_process(dig, capture_stdout=True, check=False)
                if b"192.0.2.55" in done.stdout:
                    break
        await wait_listening(SERVER, IPERF_PORT, "iperf3 -s")
        yield
    finally:
        sh("ip", "link", "del", outer, check=False)


def big_file(directory: Path, size: int) -> str:
    """A file of ``size`` random bytes in ``directory``; its SHA-256."""
    data = os.urandom(size)
    (directory / "big.bin").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def nat_config(data: Path, **extra: object) -> RelayConfig:
    settings: dict[str, object] = {"egress_allow": (ALLOW,), **extra}
    return replace(relay_config(data), **settings)  # type: ignore[arg-type]


@asynccontextmanager
async def vm_on_relay(
    vm: Netns, relay: Listening, tmp: Path, url: str | None = None
) -> AsyncIterator[Tap]:
    async with tap_into(vm, url or relay_url(relay), relay.identity.hash_hex) as tap:
        await vm.dhcp(tap.dev, tmp)
        yield tap


@contextmanager
def files(tmp: Path, size: int = BIG) -> Iterator[tuple[Path, str]]:
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    yield www, big_file(www, size)


async def curl_sha256(vm: Netns, url: str, into: Path, seconds: float = 240) -> str:
    """Download ``url`` in the VM into the file ``into``; the SHA-256 of what arrived.
    curl's own failure (an incomplete transfer) fails the test with curl's message."""
    done = await vm.arun(
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        str(int(seconds)),
        "-o",
        str(into),
        url,
        seconds=seconds + 5,
        check=False,
    )
    data = await trio.Path(into).read_bytes() if done.returncode == 0 else b""
    assert done.returncode == 0, f"curl: {done.stderr.decode().strip()}"
    return hashlib.sha256(data).hexdigest()


async def upload(vm: Netns, path: Path, seconds: float = 240) -> list[str]:
    done = await vm.arun(
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        str(int(seconds)),
        "-T",
        str(path),
        f"http://{SERVER}:{HTTP_PORT}/upload",
        seconds=seconds,
    )
    return done.stdout.decode().split()


async def iperf(vm: Netns, *extra: str, seconds: int = 3) -> float:
    """iperf3 goodput in Mbit/s (receiver side)."""
    import json

    done = await vm.arun(
        "iperf3",
        "--client",
        SERVER,
        "--time",
        str(seconds),
        "--json",
        *extra,
        seconds=seconds + 60,
    )
    report = json.loads(done.stdout)
    assert "error" not in report, f"iperf3 {' '.join(extra)}: {report['error']}"
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def nat_of(relay: Listening) -> Nat:
    nat = relay.relay.lans.nat
    assert nat is not None
    return nat


async def test_ping_dns_http_and_iperf_through_the_nat(tmp_path: Path) -> None:
    for tool in ("udhcpc", "ping", "dig", "curl", "iperf3"):
        require_tool(tool)
    with files(tmp_path) as (www, digest):
        async with (
            namespaces(2) as (vm, inet),
            internet(inet, www),
            trio.open_nursery() as nursery,
        ):
            relay, stop = await start_relay_in(nursery, nat_config(tmp_path / "data"))
            async with vm_on_relay(vm, relay, tmp_path):
                nat = nat_of(relay)
                # Real echo replies with the guest's payload; nobody answers for NOBODY.
                assert await vm.ping(SERVER, "-p", "a5c3", "-s", "200")
                assert not await vm.ping(NOBODY, count=2, wait=1)
                assert nat.context.events["icmp_echo_in"] >= 3
                # DNS straight to an outside resolver, also from the BAVY guest's port 10053.
                for extra in ((), ("-b", "0.0.0.0#10053")):
                    answer = await vm.arun(
                        "dig", f"@{SERVER}", "nat-lookup.test", "+short", "+time=2", *extra
                    )
                    assert answer.stdout.decode().split() == ["192.0.2.55"]
                assert (
                    await curl_sha256(vm, f"http://{SERVER}:{HTTP_PORT}/big.bin", tmp_path / "got")
                    == digest
                )
                assert await upload(vm, www / "big.bin") == [digest, str(BIG)]
                up = await iperf(vm)
                down = await iperf(vm, "--reverse")
                print(f"iperf3 through the NAT: up {up:.1f} Mbit/s, down {down:.1f} Mbit/s")
                assert up > 1 and down > 1
                assert nat.context.events["tcp_connected"] >= 4
            await stop()


async def test_ping_command_fallback_answers_only_for_a_live_host(tmp_path: Path) -> None:
    """``--icmp-mode command``, where neither ping sockets nor raw sockets are permitted."""
    for tool in ("udhcpc", "ping"):
        require_tool(tool)
    with files(tmp_path, 1024) as (www, _):
        async with (
            namespaces(2) as (vm, inet),
            internet(inet, www),
            trio.open_nursery() as nursery,
        ):
            config = nat_config(tmp_path / "data", icmp_mode="command")
            relay, stop = await start_relay_in(nursery, config)
            async with vm_on_relay(vm, relay, tmp_path):
                nat = nat_of(relay)
                assert nat.icmp_mode is IcmpMode.COMMAND
                assert await vm.ping(SERVER, "-s", "100")
                assert not await vm.ping(NOBODY, count=2, wait=2)
                assert nat.context.events["icmp_echo_in"] >= 3
            await stop()


async def test_transfers_complete_with_five_percent_datagram_loss(tmp_path: Path) -> None:
    for tool in ("udhcpc", "curl", "iperf3"):
        require_tool(tool)
    with files(tmp_path, LOSSY) as (www, digest):
        async with (
            namespaces(2) as (vm, inet),
            internet(inet, www),
            trio.open_nursery() as nursery,
        ):
            relay, stop = await start_relay_in(nursery, nat_config(tmp_path / "data"))
            forwarder = LossyForwarder(relay.addresses[0], loss=0.05, seed=5)
            port = await nursery.start(forwarder.run)
            async with vm_on_relay(vm, relay, tmp_path, f"https://127.0.0.1:{port}/"):
                started = trio.current_time()
                assert (
                    await curl_sha256(vm, f"http://{SERVER}:{HTTP_PORT}/big.bin", tmp_path / "got")
                    == digest
                )
                downloaded = trio.current_time()
                assert await upload(vm, www / "big.bin") == [digest, str(LOSSY)]
                uploaded = trio.current_time()
                print(
                    f"10 MiB with 5% loss: down {downloaded - started:.1f} s, "
                    f"up {uploaded - downloaded:.1f} s"
                )
                up = await iperf(vm)
                down = await iperf(vm, "--reverse")
                print(f"iperf3 with 5% loss: up {up:.1f} Mbit/s, down {down:.1f} Mbit/s")
                assert up > 0.5 and down > 0.5
                assert forwarder.dropped > 1000
                events = nat_of(relay).context.events
                recovery = {k: v for k, v in events.items() if k.endswith(("retransmits", "outs"))}
                print(f"lossy forwarder dropped {forwarder.dropped}; NAT TCP recovery {recovery}")
            await stop()
            nursery.cancel_scope.cancel()  # the forwarder runs until cancelled


class Listeners:
    """TCP and UDP listeners on one port of ``address`` in the relay's namespace."""

    def __init__(self, address: str) -> None:
        self.tcp = socket.create_server((address, 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, self.port))
        self.udp.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._echo_udp, daemon=True)
        self._thread.start()

    def _echo_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(2048)
            except TimeoutError:
                continue
            self.udp.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.tcp.close()
        self.udp.close()


async def probe(vm: Netns, tap: Tap, proto: str, dst: str, port: int, count: int = 1) -> list[str]:
    done = await vm.arun(
        sys.executable,
        str(TESTS / "guest_probe.py"),
        tap.dev,
        tap.ip,
        proto,
        dst,
        str(port),
        str(count),
        seconds=10 + 4 * count,
    )
    return done.stdout.decode().split()


@contextmanager
def listening(address: str) -> Iterator[Listeners]:
    listeners = Listeners(address)
    try:
        yield listeners
    finally:
        listeners.close()


async def test_egress_policy_refuses_loopback_own_address_and_metadata(tmp_path: Path) -> None:
    require_tool("udhcpc")
    async with (
        namespaces(2) as (vm, inet),
        trio.open_nursery() as nursery,
        internet(inet, tmp_path),
    ):
        with listening("127.0.0.1") as loopback, listening(HOST_SIDE) as own:
            relay, stop = await start_relay_in(nursery, nat_config(tmp_path / "data"))
            async with vm_on_relay(vm, relay, tmp_path) as tap:
                for dst, port in (
                    ("127.0.0.1", loopback.port),
                    (HOST_SIDE, own.port),
                    ("169.254.169.254", 80),
                ):
                    for proto in ("tcp", "udp", "icmp"):
                        answer = await probe(vm, tap, proto, dst, port)
                        assert answer == ["admin_prohibited"], (proto, dst)
                drops = nat_of(relay).context.drops
                assert drops["egress_loopback"] == 3
                assert drops["egress_host_address"] == 3
                assert drops["egress_link_local"] + drops["egress_metadata"] == 3
            await stop()
            allowed = nat_config(
                tmp_path / "data",
                egress_allow=(ALLOW, f"127.0.0.1:{loopback.port}", f"{HOST_SIDE}/32"),
                egress_deny=(f"tcp/{SERVER}:{HTTP_PORT}",),
            )
            relay, stop = await start_relay_in(nursery, allowed)
            async with vm_on_relay(vm, relay, tmp_path) as tap:
                assert await probe(vm, tap, "tcp", "127.0.0.1", loopback.port) == ["synack"]
                assert await probe(vm, tap, "udp", "127.0.0.1", loopback.port) == ["udp_reply"]
                assert await probe(vm, tap, "tcp", HOST_SIDE, own.port) == ["synack"]
                assert await probe(vm, tap, "icmp", HOST_SIDE, 0) == ["echo_reply"]
                # The rule named one port: another port of loopback stays closed.
                closed = await probe(vm, tap, "udp", "127.0.0.1", loopback.port + 1)
                assert closed == ["admin_prohibited"]
                # A deny rule wins over the allow rule that covers the same address.
                assert await probe(vm, tap, "tcp", SERVER, HTTP_PORT) == ["admin_prohibited"]
                assert nat_of(relay).context.drops["egress_operator_deny"] == 1
            await stop()


HOLD = """
import socket, sys, time
held, refused = [], 0
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((sys.argv[1], 8080))
        held.append(s)
    except OSError:
        refused += 1
print(len(held), refused, flush=True)
sys.stdin.read()
"""


async def test_a_vm_past_its_flow_cap_is_refused_while_another_is_not(tmp_path: Path) -> None:
    require_tool("udhcpc")
    limits = NatLimits(tcp_per_vm=4)
    with files(tmp_path) as (www, _digest):
        async with (
            namespaces(3) as (vm1, vm2, inet),
            internet(inet, www),
            trio.open_nursery() as nursery,
        ):
            relay, stop = await start_relay_in(
                nursery, nat_config(tmp_path / "data", nat_limits=limits)
            )
            async with vm_on_relay(vm1, relay, tmp_path), vm_on_relay(vm2, relay, tmp_path):
                holder = await vm1.popen(
                    sys.executable,
                    "-c",
                    HOLD,
                    SERVER,
                    "6",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                assert holder.stdout is not None
                with trio.fail_after(60):
                    line = await holder.stdout.receive_some(64)
                assert line.decode().split() == ["4", "2"]
                assert nat_of(relay).context.drops["tcp_vm_flows"] == 2
                # The other VM still gets through, while vm1 holds its four.
                answer = await vm2.arun(
                    "curl",
                    "-sS",
                    "--fail",
                    "--max-time",
                    "20",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"http://{SERVER}:{HTTP_PORT}/big.bin",
                    seconds=60,
                )
                assert answer.stdout == b"200"
                holder.kill()
            await stop()
