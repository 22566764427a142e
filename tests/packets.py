"""Frame builders for tests, made with dpkt (an independent implementation from the relay's
own :mod:`relay.packets.build`)."""

from __future__ import annotations

import dpkt

GATEWAY_MAC = bytes.fromhex("525400123456")
BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes((0x02, 0, 0, 0, 0, n))


def ip(last: int) -> bytes:
    return bytes((10, 0, 2, last))


def arp_frame(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes, dst: bytes) -> bytes:
    arp = dpkt.arp.ARP(op=op, sha=sha, spa=spa, tha=tha, tpa=tpa)
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=sha, type=0x0806, data=arp))


def ipv4_frame(
    src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, proto: int, l4: dpkt.Packet
) -> bytes:
    packet = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, data=l4)
    packet.len = 20 + len(bytes(l4))
    return bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=src_mac, type=0x0800, data=packet))


def udp_frame(
    src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, data: bytes
) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    udp.ulen = 8 + len(data)
    return ipv4_frame(src_mac, dst_mac, src, dst, 17, udp)


def echo_request_frame(
    src_mac: bytes, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes
) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload)
    return ipv4_frame(src_mac, GATEWAY_MAC, src, dst, 1, dpkt.icmp.ICMP(type=8, code=0, data=echo))
