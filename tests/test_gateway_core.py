"""The gateway's services, sans-IO, with frames built and checked by dpkt."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from packets import (
    BROADCAST,
    GATEWAY_MAC,
    arp_frame,
    echo_request_frame,
    ip,
    ipv4_frame,
    mac,
    udp_frame,
)

from relay.gateway.core import DnsRequest, Gateway, Outbound, Reply
from relay.lan.port_security import Binding
from relay.packets.build import internet_checksum
from relay.packets.headers import read_header

VM = Binding(mac(1), ip(254))


def serve(frame: bytes, sender: Binding = VM) -> list[Reply | DnsRequest | Outbound]:
    return Gateway().handle(frame, read_header(frame), sender, 0.0)


def only_reply(outputs: list[Reply | DnsRequest | Outbound]) -> dpkt.ethernet.Ethernet:
    assert len(outputs) == 1 and isinstance(outputs[0], Reply)
    return dpkt.ethernet.Ethernet(outputs[0].frame)


@pytest.mark.parametrize("target", [2, 3])
def test_arp_for_the_gateway_and_dns_addresses_is_answered(target: int) -> None:
    reply = only_reply(serve(arp_frame(1, VM.mac, VM.ip, bytes(6), ip(target), BROADCAST)))
    assert (reply.dst, reply.src, reply.type) == (VM.mac, GATEWAY_MAC, 0x0806)
    arp = reply.data
    assert (arp.op, arp.sha, arp.spa, arp.tha, arp.tpa) == (
        2,
        GATEWAY_MAC,
        ip(target),
        VM.mac,
        VM.ip,
    )


def test_arp_for_anyone_else_is_not_answered() -> None:
    assert serve(arp_frame(1, VM.mac, VM.ip, bytes(6), ip(77), BROADCAST)) == []
    assert serve(arp_frame(2, VM.mac, VM.ip, GATEWAY_MAC, ip(2), GATEWAY_MAC)) == []


def test_ping_the_gateway_echoes_id_seq_payload_with_valid_checksums() -> None:
    payload = b"RISCV_PING"
    reply = only_reply(serve(echo_request_frame(VM.mac, VM.ip, ip(2), 0x1234, 7, payload)))
    assert (reply.dst, reply.src) == (VM.mac, GATEWAY_MAC)
    packet = reply.data
    assert (packet.src, packet.dst, packet.p) == (ip(2), VM.ip, 1)
    assert internet_checksum(bytes(packet)[:20]) == 0
    assert internet_checksum(bytes(packet.data)) == 0
    assert packet.data.type == 0
    assert (packet.data.data.id, packet.data.data.seq, packet.data.data.data) == (
        0x1234,
        7,
        payload,
    )


def test_dhcp_discover_gets_an_offer_of_the_ports_lease() -> None:
    discover = dpkt.dhcp.DHCP(
        chaddr=VM.mac,
        xid=99,
        flags=0x8000,
        opts=((dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER])),),
    )
    frame = udp_frame(VM.mac, BROADCAST, bytes(4), b"\xff" * 4, 68, 67, bytes(discover))
    reply = only_reply(serve(frame))
    assert (reply.dst, reply.src) == (BROADCAST, GATEWAY_MAC)
    udp = reply.data.data
    assert (udp.sport, udp.dport) == (67, 68)
    offer = dpkt.dhcp.DHCP(bytes(udp.data))
    assert offer.yiaddr == int.from_bytes(VM.ip, "big") and offer.xid == 99
    assert dict(offer.opts)[26] == (936).to_bytes(2, "big")


def test_dns_query_becomes_a_request_and_its_answer_a_frame() -> None:
    query = bytes(dpkt.dns.DNS(id=5, qd=[dpkt.dns.DNS.Q(name="example.test")]))
    outputs = serve(udp_frame(VM.mac, GATEWAY_MAC, VM.ip, ip(3), 10053, 53, query))
    assert len(outputs) == 1 and isinstance(outputs[0], DnsRequest)
    request = outputs[0]
    assert (request.query, request.client_port, request.server_ip) == (query, 10053, ip(3))
    assert request.max_udp_size == 512  # no EDNS: the classic limit
    answer = dpkt.ethernet.Ethernet(Gateway().dns_answer(request, b"answer"))
    assert (answer.dst, answer.data.src, answer.data.dst) == (VM.mac, ip(3), VM.ip)
    assert (answer.data.data.sport, answer.data.data.dport) == (53, 10053)
    assert answer.data.data.data == b"answer"


def test_dns_answer_size_follows_edns_and_the_mtu() -> None:
    opt = dpkt.dns.DNS.RR(name="", type=41, cls=1232)
    query = bytes(dpkt.dns.DNS(id=5, qd=[dpkt.dns.DNS.Q(name="a.test")], ar=[opt]))
    outputs = serve(udp_frame(VM.mac, GATEWAY_MAC, VM.ip, ip(3), 10053, 53, query))
    assert isinstance(outputs[0], DnsRequest)
    assert outputs[0].max_udp_size == 936 - 28  # the MTU is smaller than the EDNS buffer


def test_outside_destinations_go_to_the_nat_and_lan_ones_are_misrouted() -> None:
    out = udp_frame(VM.mac, GATEWAY_MAC, VM.ip, bytes((192, 0, 2, 1)), 1000, 80, b"x")
    outputs = serve(out)
    assert len(outputs) == 1 and isinstance(outputs[0], Outbound)
    gateway = Gateway()
    wrong = udp_frame(VM.mac, GATEWAY_MAC, VM.ip, ip(50), 1000, 80, b"x")
    assert gateway.handle(wrong, read_header(wrong), VM, 0.0) == []
    assert gateway.stats.drops["misrouted"] == 1


def test_bad_payloads_are_counted() -> None:
    gateway = Gateway()
    frames = [
        udp_frame(VM.mac, GATEWAY_MAC, VM.ip, ip(3), 1000, 53, b"\x00\x01junk"),
        udp_frame(VM.mac, BROADCAST, bytes(4), b"\xff" * 4, 68, 67, b"\x01\x01"),
        udp_frame(VM.mac, GATEWAY_MAC, VM.ip, ip(2), 1000, 7, b"echo?"),
        ipv4_frame(VM.mac, GATEWAY_MAC, VM.ip, ip(2), 1, dpkt.icmp.ICMP(type=13, data=b"")),
    ]
    for frame in frames:
        assert gateway.handle(frame, read_header(frame), VM, 0.0) == []
    assert sum(gateway.stats.drops.values()) == len(frames)


@given(
    st.sampled_from([(1, 0), (17, 53), (17, 67), (17, 7), (6, 80)]),
    st.sampled_from([ip(2), ip(3), b"\xff" * 4, bytes((192, 0, 2, 1))]),
    st.binary(max_size=600),
)
def test_arbitrary_payloads_never_escape_the_gateway(
    proto_port: tuple[int, int], dst: bytes, payload: bytes
) -> None:
    proto, port = proto_port
    l4 = (1000).to_bytes(2, "big") + port.to_bytes(2, "big") + payload if proto != 1 else payload
    packet = dpkt.ip.IP(src=VM.ip, dst=dst, p=proto, ttl=64, data=l4)
    packet.len = 20 + len(l4)
    frame = bytes(dpkt.ethernet.Ethernet(dst=GATEWAY_MAC, src=VM.mac, type=0x0800, data=packet))
    gateway = Gateway()
    outputs = gateway.handle(frame, read_header(frame), VM, 0.0)
    assert all(isinstance(o, Reply | DnsRequest | Outbound) for o in outputs)
