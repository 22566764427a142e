"""The LAN over real QUIC on loopback: switch, port security, gateway, raw framing, leases."""

from __future__ import annotations

import io
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import dpkt
import trio
import trio.testing
from conftest import StartRelay, relay_url

from relay.client import RelayClient, connect, random_mac
from relay.config import RelayConfig
from relay.packets import build
from relay.server import Listening, serve

GATEWAY_MAC = bytes.fromhex("525400123456")
GATEWAY_IP = IPv4Address("10.0.2.2").packed
BROADCAST = b"\xff" * 6


async def receive_matching(
    client: RelayClient, accept: type[dpkt.Packet], test: object
) -> dpkt.Packet:
    """The ``accept`` layer of the first frame where it satisfies ``test`` (others skipped);
    the whole frame is its ``frame`` attribute."""
    with trio.fail_after(5):
        while True:
            raw = await client.receive_frame()
            layer: object = dpkt.ethernet.Ethernet(raw)
            while layer is not None and not isinstance(layer, accept):
                layer = getattr(layer, "data", None)
            if isinstance(layer, accept) and test(layer):  # type: ignore[operator]
                layer.frame = raw
                return layer


def ping_frame(
    src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, seq: int, data: bytes
) -> bytes:
    rest = (0x1234).to_bytes(2, "big") + seq.to_bytes(2, "big")
    return build.icmp_frame(dst_mac, src_mac, src, dst, build.icmp(8, 0, rest, data))


def echo_reply_to(request: bytes) -> bytes:
    """What a guest answers to an echo request frame."""
    eth = dpkt.ethernet.Ethernet(request)
    echo = eth.data.data.data
    rest = int(echo.id).to_bytes(2, "big") + int(echo.seq).to_bytes(2, "big")
    message = build.icmp(0, 0, rest, bytes(echo.data))
    return build.icmp_frame(eth.src, eth.dst, bytes(eth.data.dst), bytes(eth.data.src), message)


async def bavy(nursery: trio.Nursery, relay: Listening, path: str = "/") -> RelayClient:
    client = await connect(nursery, relay_url(relay, path), cert_hash=relay.identity.hash_hex)
    await client.register(random_mac())
    return client


def own(client: RelayClient) -> tuple[bytes, bytes]:
    assert client.mac is not None and client.assigned is not None
    return client.mac, client.assigned.ip.packed


async def test_gateway_answers_arp_and_ping(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    relay = await start_relay()
    vm = await bavy(nursery, relay)
    mac, ip = own(vm)
    vm.send_frame(build.arp_frame(build.ARP_REQUEST, mac, ip, bytes(6), GATEWAY_IP))
    arp = await receive_matching(vm, dpkt.arp.ARP, lambda a: a.op == 2)
    assert (arp.sha, arp.spa, arp.tha, arp.tpa) == (GATEWAY_MAC, GATEWAY_IP, mac, ip)
    vm.send_frame(ping_frame(mac, GATEWAY_MAC, ip, GATEWAY_IP, 1, b"RISCV_PING"))
    icmp = await receive_matching(vm, dpkt.icmp.ICMP, lambda m: m.type == 0)
    assert (icmp.data.id, icmp.data.seq, icmp.data.data) == (0x1234, 1, b"RISCV_PING")
    await vm.aclose()


async def test_dns_is_forwarded_to_the_upstream(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    upstream = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await upstream.bind(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    async def answer() -> None:
        query, addr = await upstream.recvfrom(2048)
        reply = dpkt.dns.DNS(query)
        reply.qr, reply.rcode = 1, 0
        reply.an = [
            dpkt.dns.DNS.RR(
                name=reply.qd[0].name, type=1, cls=1, ttl=60, rdata=bytes((192, 0, 2, 9))
            )
        ]
        await upstream.sendto(bytes(reply), addr)

    nursery.start_soon(answer)
    relay = await start_relay(dns_upstreams=(f"127.0.0.1:{port}",))
    vm = await bavy(nursery, relay)
    mac, ip = own(vm)
    query = dpkt.dns.DNS(id=77, qd=[dpkt.dns.DNS.Q(name="host.example.test", type=1, cls=1)])
    vm.send_frame(
        build.udp_frame(
            GATEWAY_MAC, mac, ip, IPv4Address("10.0.2.3").packed, 10053, 53, bytes(query)
        )
    )
    udp = await receive_matching(vm, dpkt.udp.UDP, lambda u: u.sport == 53)
    assert udp.dport == 10053
    answer = dpkt.dns.DNS(bytes(udp.data))
    assert answer.id == 77 and answer.an[0].rdata == bytes((192, 0, 2, 9))
    await vm.aclose()
    upstream.close()


async def test_bavy_and_raw_clients_ping_each_other(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    vm = await bavy(nursery, relay, "/lan/mixed")
    vm_mac, vm_ip = own(vm)
    raw = await connect(
        nursery, relay_url(relay, "/lan/mixed/raw"), cert_hash=relay.identity.hash_hex
    )
    assert raw.raw
    raw_mac = random_mac()
    # The raw client learns its address by DHCP, like a v86 guest.
    discover = dpkt.dhcp.DHCP(
        chaddr=raw_mac,
        xid=1,
        flags=0x8000,
        opts=((dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER])),),
    )
    raw.send_frame(
        build.udp_frame(BROADCAST, raw_mac, bytes(4), b"\xff" * 4, 68, 67, bytes(discover))
    )
    udp = await receive_matching(raw, dpkt.udp.UDP, lambda u: u.sport == 67)
    offer = dpkt.dhcp.DHCP(bytes(udp.data))
    assert offer.xid == 1
    raw_ip = int(offer.yiaddr).to_bytes(4, "big")
    assert IPv4Address(raw_ip) != IPv4Address(vm_ip)
    # raw -> bavy, bavy answers
    raw.send_frame(ping_frame(raw_mac, vm_mac, raw_ip, vm_ip, 1, b"from raw"))
    request = await receive_matching(vm, dpkt.icmp.ICMP, lambda m: m.type == 8)
    vm.send_frame(echo_reply_to(request.frame))
    icmp = await receive_matching(raw, dpkt.icmp.ICMP, lambda m: m.type == 0)
    assert icmp.data.data == b"from raw"
    # bavy -> raw, raw answers
    vm.send_frame(ping_frame(vm_mac, raw_mac, vm_ip, raw_ip, 2, b"from bavy"))
    request = await receive_matching(raw, dpkt.icmp.ICMP, lambda m: m.type == 8)
    raw.send_frame(echo_reply_to(request.frame))
    icmp = await receive_matching(vm, dpkt.icmp.ICMP, lambda m: m.type == 0)
    assert icmp.data.data == b"from bavy"
    network = relay.relay.lans.networks["mixed"]
    assert not network.switch.drops
    await vm.aclose()
    await raw.aclose()


async def test_spoofed_frames_are_dropped_and_counted(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    a, b = await bavy(nursery, relay), await bavy(nursery, relay)
    mac_a, ip_a = own(a)
    mac_b, ip_b = own(b)
    spoofs = [
        build.udp_frame(mac_b, random_mac(), ip_a, ip_b, 1, 2, b"other MAC"),
        build.udp_frame(mac_b, mac_a, ip_b, ip_b, 1, 2, b"other IP"),
        build.arp_frame(build.ARP_REPLY, mac_a, GATEWAY_IP, mac_b, ip_b),  # gateway impersonation
    ]
    for spoof in spoofs:
        a.send_frame(spoof)
    genuine = build.udp_frame(mac_b, mac_a, ip_a, ip_b, 1, 2, b"genuine")
    a.send_frame(genuine)
    with trio.fail_after(5):
        assert await b.receive_frame() == genuine  # the spoofs never arrived; this did
    drops = relay.relay.lans.networks["default"].switch.drops
    assert (drops["spoofed_source_mac"], drops["spoofed_source_ip"], drops["arp_spoof"]) == (
        1,
        1,
        1,
    )
    await a.aclose()
    await b.aclose()


async def test_same_mac_same_ip_across_relay_restarts(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = RelayConfig(
        binds=("127.0.0.1",), port=0, data_dir=tmp_path, dns_upstreams=("127.0.0.1:9",)
    )
    macs = [random_mac() for _ in range(3)]

    async def addresses() -> list[IPv4Address]:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                relay: Listening = await inner.start(partial(serve, config, out=io.StringIO()))
                url, h = relay_url(relay), relay.identity.hash_hex
                got = []
                for mac in macs:
                    client = await connect(inner, url, cert_hash=h)
                    got.append((await client.register(mac)).ip)
                    await client.aclose()
                scope.cancel()
        return got

    first = await addresses()
    macs.reverse()
    second = await addresses()
    assert second == first[::-1]
    assert len(set(first)) == 3
    assert (tmp_path / "leases.sqlite3").exists()
