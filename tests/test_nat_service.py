"""The NAT driver with real host sockets on loopback: frames in as a LAN would hand them over,
frames out as the guest would receive them (checksums checked by dpkt)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import dpkt
import pytest
import trio

from relay.gateway.core import GATEWAY_MAC
from relay.lan.port_security import Binding
from relay.nat.icmp import detect_mode
from relay.nat.limits import NatLimits
from relay.nat.policy import Address, EgressPolicy, Proto, parse_rule
from relay.nat.service import Nat
from relay.nat.settings import IcmpMode, NatSettings
from relay.packets import build
from relay.packets.headers import IPPROTO_ICMP, IPPROTO_UDP, read_header

VM = Binding(bytes.fromhex("525400aa0001"), IPv4Address("10.0.2.15").packed)
LOOPBACK = IPv4Address("127.0.0.1").packed


@dataclass
class FakeLan:
    """What the NAT sees of a LAN: a name and a way to queue frames to the guest."""

    name: str = "default"
    frames: list[bytes] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    def to_guest(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.arrived.set()

    async def next_ip(self, seconds: float = 5) -> dpkt.ip.IP:
        with trio.fail_after(seconds):
            while not self.frames:
                self.arrived = trio.Event()
                await self.arrived.wait()
        frame = self.frames.pop(0)
        eth = dpkt.ethernet.Ethernet(frame)
        assert eth.src == GATEWAY_MAC and eth.dst == VM.mac
        ip = eth.data
        assert isinstance(ip, dpkt.ip.IP)
        assert build.internet_checksum(bytes(ip)[: ip.hl * 4]) == 0
        return ip


def send(nat: Nat, lan: FakeLan, packet: bytes) -> None:
    frame = build.ethernet(GATEWAY_MAC, VM.mac, 0x0800, packet)
    nat.outbound(lan, VM, frame, read_header(frame), trio.current_time())


def udp_packet(dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return build.ipv4(VM.ip, dst, IPPROTO_UDP, build.udp(VM.ip, dst, sport, dport, payload))


async def start_nat(nursery: trio.Nursery, *allow: str, **settings: object) -> Nat:
    policy = EgressPolicy(allow=[parse_rule(rule) for rule in allow])
    nat = Nat(policy, NatSettings(**settings))  # type: ignore[arg-type]
    await nursery.start(nat.run)
    return nat


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """A UDP echo server on 127.0.0.1; its port."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def echo() -> None:
        while True:
            data, peer = await sock.recvfrom(65536)
            await sock.sendto(data.upper(), peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        yield sock.getsockname()[1]
        nursery.cancel_scope.cancel()
    sock.close()


async def test_udp_answer_comes_back_from_the_destination(
    nursery: trio.Nursery, echo_server: int
) -> None:
    nat = await start_nat(nursery, "127.0.0.1")
    lan = FakeLan()
    send(nat, lan, udp_packet(LOOPBACK, 10053, echo_server, b"hello"))
    ip = await lan.next_ip()
    assert (ip.src, ip.dst, ip.p) == (LOOPBACK, VM.ip, IPPROTO_UDP)
    assert (ip.data.sport, ip.data.dport, ip.data.data) == (echo_server, 10053, b"HELLO")
    udp_bytes = bytes(ip.data)
    pseudo = ip.src + ip.dst + bytes((0, IPPROTO_UDP)) + len(udp_bytes).to_bytes(2, "big")
    assert build.internet_checksum(pseudo + udp_bytes) == 0
    assert nat.flow_counts()["udp"] == 1
    # A second datagram on the same 5-tuple reuses the flow.
    send(nat, lan, udp_packet(LOOPBACK, 10053, echo_server, b"again"))
    assert (await lan.next_ip()).data.data == b"AGAIN"
    assert nat.context.events["udp_opened"] == 1


async def test_large_udp_answers_are_fragmented_to_the_guest_mtu(
    nursery: trio.Nursery, echo_server: int
) -> None:
    nat = await start_nat(nursery, "127.0.0.1", mtu=576)
    lan = FakeLan()
    payload = bytes(range(200)) * 6  # 1200 bytes: three fragments at MTU 576
    send(nat, lan, udp_packet(LOOPBACK, 4000, echo_server, payload))
    pieces = [await lan.next_ip() for _ in range(3)]
    assert all(len(bytes(p)) <= 576 for p in pieces)
    assert [bool(p.mf) for p in pieces] == [True, True, False]
    joined = b"".join(bytes(p)[20:] for p in sorted(pieces, key=lambda p: p.offset))
    assert joined[8:] == payload.upper()


async def test_udp_to_a_closed_port_gets_port_unreachable(nursery: trio.Nursery) -> None:
    nat = await start_nat(nursery, "127.0.0.1")
    lan = FakeLan()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    packet = udp_packet(LOOPBACK, 5000, port, b"anyone?")
    send(nat, lan, packet)
    ip = await lan.next_ip()
    assert ip.p == IPPROTO_ICMP and (ip.data.type, ip.data.code) == (3, 3)
    assert bytes(ip.data.data)[4:] == packet[:28]  # the quoted header and UDP ports
    assert ip.src == LOOPBACK


async def test_denied_destination_gets_admin_prohibited_and_a_count(
    nursery: trio.Nursery,
) -> None:
    nat = await start_nat(nursery)  # loopback is in the default-deny table
    lan = FakeLan()
    packet = udp_packet(LOOPBACK, 5000, 9, b"x")
    send(nat, lan, packet)
    ip = await lan.next_ip()
    assert (ip.data.type, ip.data.code) == (3, 13)
    assert ip.src == IPv4Address("10.0.2.2").packed
    assert nat.context.drops["egress_loopback"] == 1
    assert nat.flow_counts()["udp"] == 0


async def test_udp_flows_past_the_cap_evict_the_least_recently_used(
    nursery: trio.Nursery, echo_server: int
) -> None:
    nat = await start_nat(nursery, "127.0.0.1", limits=NatLimits(udp_per_vm=2, new_flows_burst=10))
    lan = FakeLan()
    for sport in (1001, 1002, 1003):
        send(nat, lan, udp_packet(LOOPBACK, sport, echo_server, b"x"))
        await lan.next_ip()
    assert nat.flow_counts()["udp"] == 2
    assert nat.context.events["udp_evicted"] == 1
    ports = sorted(key[2] for key in nat.udp.flows)
    assert ports == [1002, 1003]


async def test_icmp_echo_gets_a_real_reply_with_the_guests_id(nursery: trio.Nursery) -> None:
    mode = detect_mode(IcmpMode.AUTO)
    if mode is IcmpMode.OFF:
        pytest.fail("neither ping sockets nor raw sockets here: run as root (CI does)")
    nat = await start_nat(nursery, "127.0.0.1", icmp_mode=mode)
    lan = FakeLan()
    rest = (0x1234).to_bytes(2, "big") + (7).to_bytes(2, "big")  # BAVY's ident
    message = build.icmp(build.ICMP_ECHO_REQUEST, 0, rest, b"payload-" * 8)
    send(nat, lan, build.ipv4(VM.ip, LOOPBACK, IPPROTO_ICMP, message))
    ip = await lan.next_ip()
    assert ip.src == LOOPBACK and ip.p == IPPROTO_ICMP
    assert ip.data.type == 0 and (ip.data.data.id, ip.data.data.seq) == (0x1234, 7)
    assert ip.data.data.data == b"payload-" * 8
    assert build.internet_checksum(bytes(ip.data)) == 0


async def test_icmp_command_mode_relays_the_ping_commands_answer(nursery: trio.Nursery) -> None:
    """The ``ping`` fallback: a reply with the guest's id, sequence and payload."""
    if detect_mode(IcmpMode.COMMAND) is not IcmpMode.COMMAND:
        pytest.fail("no working ping command here: scripts/test installs iputils-ping")
    nat = await start_nat(nursery, "127.0.0.1", icmp_mode=IcmpMode.COMMAND)
    assert nat.icmp_mode is IcmpMode.COMMAND
    lan = FakeLan()
    rest = (0x1234).to_bytes(2, "big") + (2).to_bytes(2, "big")
    message = build.icmp(build.ICMP_ECHO_REQUEST, 0, rest, b"command-" * 8)
    send(nat, lan, build.ipv4(VM.ip, LOOPBACK, IPPROTO_ICMP, message))
    ip = await lan.next_ip()
    assert ip.src == LOOPBACK and ip.data.type == 0
    assert (ip.data.data.id, ip.data.data.seq) == (0x1234, 2)
    assert ip.data.data.data == b"command-" * 8
    assert build.internet_checksum(bytes(ip.data)) == 0
    assert (nat.context.events["icmp_echo_out"], nat.context.events["icmp_echo_in"]) == (1, 1)


async def test_icmp_off_refuses_instead_of_faking_a_reply(nursery: trio.Nursery) -> None:
    nat = await start_nat(nursery, "127.0.0.1", icmp_mode=IcmpMode.OFF)
    lan = FakeLan()
    message = build.icmp(build.ICMP_ECHO_REQUEST, 0, b"\x00\x01\x00\x01", b"hi")
    send(nat, lan, build.ipv4(VM.ip, LOOPBACK, IPPROTO_ICMP, message))
    ip = await lan.next_ip()
    assert (ip.data.type, ip.data.code) == (3, 13)
    assert nat.context.drops["icmp_unavailable"] == 1


async def test_guest_fragments_and_other_protocols_are_counted_drops(
    nursery: trio.Nursery,
) -> None:
    nat = await start_nat(nursery, "127.0.0.1")
    lan = FakeLan()
    fragment = build.ipv4(VM.ip, LOOPBACK, IPPROTO_UDP, b"\x00" * 16, fragment=0x2000)
    send(nat, lan, fragment)
    send(nat, lan, build.ipv4(VM.ip, LOOPBACK, 47, b"gre"))
    assert nat.context.drops["fragment"] == 1 and nat.context.drops["protocol"] == 1
    assert lan.frames == []


async def test_host_addresses_are_read_again_and_the_policy_follows(
    nursery: trio.Nursery,
) -> None:
    """An address the host gains after the start (a DHCP renewal, a floating IP) is denied to
    guests from the next re-read on, and one it loses is released. No traffic: verdicts only."""
    gained = IPv4Address("192.0.43.10")  # global, so only the host rule can deny it
    current: dict[str, frozenset[Address]] = {"now": frozenset()}

    def read() -> frozenset[Address]:
        return current["now"]

    nat = Nat(EgressPolicy(), NatSettings(), read_host_addresses=read)
    await nursery.start(nat.run)
    assert nat.policy.check(Proto.TCP, gained, 443).allowed
    current["now"] = frozenset({gained})
    await nat.reread_host_addresses(read)  # what the refresh task does every 30 s
    verdict = nat.policy.check(Proto.TCP, gained, 443)
    assert not verdict.allowed and verdict.reason == "host_address"
    current["now"] = frozenset()
    await nat.reread_host_addresses(read)
    assert nat.policy.check(Proto.TCP, gained, 443).allowed
