"""The LAN with real Linux network stacks: namespaces attached by ``relay tap``, real udhcpc,
ping, arping and dig against the relay's switch and gateway."""

from __future__ import annotations

import io
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import relay_url, require_tool
from netns import Netns, namespaces, tap_into, veth_to

from relay.config import RelayConfig
from relay.server import Listening, serve
from relay.tls import TlsIdentity

pytestmark = pytest.mark.netns

GATEWAY_MAC = "52:54:00:12:34:56"
UPSTREAM_HOST, UPSTREAM_NS = "192.168.77.1", "192.168.77.2"


def relay_config(data_dir: Path, port: int = 0, dns: str = "127.0.0.1:9") -> RelayConfig:
    return RelayConfig(binds=("127.0.0.1",), port=port, data_dir=data_dir, dns_upstreams=(dns,))


async def start_relay_in(
    nursery: trio.Nursery, config: RelayConfig, identity: TlsIdentity | None = None
) -> tuple[Listening, Callable[[], Awaitable[None]]]:
    """A relay in ``nursery``, and a function that stops it and waits until it is gone."""
    scope, gone = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[Listening]) -> None:
        try:
            with scope:
                await serve(config, identity=identity, out=io.StringIO(), task_status=task_status)
        finally:
            gone.set()

    async def stop() -> None:
        scope.cancel()
        await gone.wait()

    listening: Listening = await nursery.start(run)
    return listening, stop


@asynccontextmanager
async def dnsmasq_in(ns: Netns) -> AsyncIterator[None]:
    """A real DNS server in a namespace of its own, reachable from the relay over a veth."""
    require_tool("dnsmasq")
    async with veth_to(ns, UPSTREAM_HOST, UPSTREAM_NS):
        process = await trio.lowlevel.open_process(
            [
                "ip",
                "netns",
                "exec",
                ns.name,
                "dnsmasq",
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--listen-address={UPSTREAM_NS}",
                "--conf-file=/dev/null",
                "--address=/vm-lookup.test/192.0.2.44",
                "--txt-record=vm-lookup.test,relay",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with trio.fail_after(15):
                while True:  # ready when it answers
                    probe = await trio.run_process(
                        [
                            "dig",
                            f"@{UPSTREAM_NS}",
                            "vm-lookup.test",
                            "+short",
                            "+time=1",
                            "+tries=1",
                        ],
                        capture_stdout=True,
                        check=False,
                    )
                    if b"192.0.2.44" in probe.stdout:
                        break
            yield
        finally:
            process.kill()
            await process.wait()


async def ping(ns: Netns, target: str, *extra: str) -> bool:
    done = await ns.arun(
        "ping", "-c", "2", "-i", "0.3", "-W", "2", *extra, target, seconds=20, check=False
    )
    return done.returncode == 0


async def test_dhcp_ping_arp_dns_and_named_lan_isolation(tmp_path: Path) -> None:
    for tool in ("udhcpc", "ping", "arping", "dig"):
        require_tool(tool)
    async with (
        namespaces(4) as (vm1, vm2, vm3, upstream),
        dnsmasq_in(upstream),
        trio.open_nursery() as nursery,
    ):
        relay, stop = await start_relay_in(
            nursery, relay_config(tmp_path / "data", dns=UPSTREAM_NS)
        )
        h = relay.identity.hash_hex
        async with (
            tap_into(vm1, relay_url(relay), h) as tap1,
            tap_into(vm2, relay_url(relay), h) as tap2,
            tap_into(vm3, relay_url(relay), h, ["--lan", "other"]) as tap3,
        ):
            leases = [
                await vm.dhcp(tap.dev, tmp_path)
                for vm, tap in ((vm1, tap1), (vm2, tap2), (vm3, tap3))
            ]
            # DHCP hands out the very address Register got, with the gateway's settings.
            for lease, tap in zip(leases, (tap1, tap2, tap3), strict=True):
                assert lease["ip"] == tap.ip
                assert (lease["router"], lease["dns"]) == ("10.0.2.2", "10.0.2.3")
                assert (lease["subnet"], lease["mtu"]) == ("255.255.255.0", "936")
            assert "mtu 936" in vm1.run("ip", "link", "show", tap1.dev).stdout

            assert await ping(vm1, "10.0.2.2")
            assert await ping(vm1, tap2.ip)
            assert await ping(vm2, tap1.ip)
            neigh = vm1.run("ip", "neigh", "show", "dev", tap1.dev).stdout
            assert f"10.0.2.2 lladdr {GATEWAY_MAC}" in neigh
            assert f"{tap2.ip} lladdr {tap2.mac}" in neigh
            arping = await vm2.arun(
                "arping", "-c", "1", "-w", "3", "-I", tap2.dev, "10.0.2.3", check=False
            )
            assert GATEWAY_MAC.upper() in arping.stdout.decode().upper()

            answer = await vm1.arun(
                "dig", "@10.0.2.3", "vm-lookup.test", "+short", "+time=2", "+tries=2"
            )
            assert answer.stdout.decode().split() == ["192.0.2.44"]
            txt = await vm2.arun(
                "dig", "@10.0.2.2", "TXT", "vm-lookup.test", "+short", "+time=2", "+tries=2"
            )
            assert txt.stdout.decode().strip() == '"relay"'

            # vm3 is on another LAN: same addressing, its own switch, nobody else there.
            assert await ping(vm3, "10.0.2.2")
            assert not await ping(vm3, tap2.ip)
            other = relay.relay.lans.networks["other"]
            default = relay.relay.lans.networks["default"]
            assert other.switch.lookup(bytes.fromhex(tap2.mac.replace(":", ""))) is None
            assert default.switch.lookup(bytes.fromhex(tap3.mac.replace(":", ""))) is None
            assert default.gateway.stats.answered["dns_query"] >= 2
        await stop()


async def test_spoofing_is_dropped_and_leases_survive_a_relay_restart(tmp_path: Path) -> None:
    for tool in ("udhcpc", "ping"):
        require_tool(tool)
    data = tmp_path / "data"
    async with namespaces(2) as (vm1, vm2), trio.open_nursery() as nursery:
        relay, stop = await start_relay_in(nursery, relay_config(data))
        port, h, url = relay.addresses[0][1], relay.identity.hash_hex, relay_url(relay)
        async with tap_into(vm1, url, h) as tap1, tap_into(vm2, url, h) as tap2:
            await vm1.dhcp(tap1.dev, tmp_path)
            await vm2.dhcp(tap2.dev, tmp_path)
            assert await ping(vm1, tap2.ip)
            switch = relay.relay.lans.networks["default"].switch

            # Another source IP: the kernel sends it, the switch drops it.
            vm1.run("ip", "addr", "add", "10.0.2.77/24", "dev", tap1.dev)
            before = switch.drops["spoofed_source_ip"]
            assert not await ping(vm1, tap2.ip, "-I", "10.0.2.77")
            assert switch.drops["spoofed_source_ip"] > before
            vm1.run("ip", "addr", "del", "10.0.2.77/24", "dev", tap1.dev)

            # Another source MAC: dropped too; the real one works again afterwards.
            vm1.run("ip", "link", "set", tap1.dev, "address", "02:aa:bb:cc:dd:ee")
            before = switch.drops["spoofed_source_mac"]
            assert not await ping(vm1, tap2.ip)
            assert switch.drops["spoofed_source_mac"] > before
            vm1.run("ip", "link", "set", tap1.dev, "address", tap1.mac)
            assert await ping(vm1, tap2.ip)

            # Restart the relay (same port, certificate and data directory): the tools
            # reconnect, register again, and every MAC gets its address back.
            await stop()
            relay, stop = await start_relay_in(
                nursery, relay_config(data, port=port), relay.identity
            )
            for tap in (tap1, tap2):
                again = await tap.next_attached(seconds=30)
                assert again.group(4) == tap.ip
            lease = await vm2.dhcp(tap2.dev, tmp_path)
            assert lease["ip"] == tap2.ip
            assert await ping(vm1, tap2.ip)
            assert await ping(vm2, "10.0.2.2")
        await stop()
