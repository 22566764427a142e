"""Frames the gateway sends: Ethernet, ARP, IPv4 with ICMP or UDP, checksums included.

Guests (smoltcp in the BAVY VM, Linux) verify every checksum, so these builders always fill
them in.
"""

from __future__ import annotations

import struct

from relay.packets.headers import ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_ICMP, IPPROTO_UDP

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")

ARP_REQUEST = 1
ARP_REPLY = 2
ICMP_ECHO_REPLY = 0
ICMP_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
# Destination-unreachable codes (RFC 792, RFC 1812).
UNREACHABLE_HOST = 1
UNREACHABLE_PORT = 3
UNREACHABLE_ADMIN = 13


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, folded and inverted."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def arp(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes) -> bytes:
    """An Ethernet/IPv4 ARP packet (the Ethernet payload)."""
    return _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip)


def arp_frame(
    op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes
) -> bytes:
    """A whole ARP frame from ``sender_mac``; a request goes to broadcast."""
    dst = b"\xff" * 6 if op == ARP_REQUEST else target_mac
    return ethernet(
        dst, sender_mac, ETHERTYPE_ARP, arp(op, sender_mac, sender_ip, target_mac, target_ip)
    )


def ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    fragment: int = 0,
) -> bytes:
    """An IPv4 packet with a 20-byte header; ``fragment`` is the flags and offset field
    (0: DF clear, not a fragment)."""
    header = _IPV4.pack(0x45, 0, 20 + len(payload), ident, fragment, ttl, proto, 0, src, dst)
    checksum = internet_checksum(header)
    return header[:10] + checksum.to_bytes(2, "big") + header[12:] + payload


def icmp(type_: int, code: int, rest: bytes, payload: bytes) -> bytes:
    """An ICMP message; ``rest`` is the 4 bytes after the checksum (id/seq for echo)."""
    body = bytes((type_, code, 0, 0)) + rest + payload
    checksum = internet_checksum(body)
    return body[:2] + checksum.to_bytes(2, "big") + body[4:]


def udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with its checksum over the IPv4 pseudo-header."""
    length = 8 + len(payload)
    header = _UDP.pack(sport, dport, length, 0)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    checksum = internet_checksum(pseudo + header + payload) or 0xFFFF
    return header[:6] + checksum.to_bytes(2, "big") + payload


def udp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    sport: int,
    dport: int,
    payload: bytes,
) -> bytes:
    packet = ipv4(src_ip, dst_ip, IPPROTO_UDP, udp(src_ip, dst_ip, sport, dport, payload))
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, packet)


def icmp_frame(
    dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, message: bytes
) -> bytes:
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4(src_ip, dst_ip, IPPROTO_ICMP, message))


def icmp_error(type_: int, code: int, original: bytes) -> bytes:
    """An ICMP error quoting ``original`` (an IPv4 packet): its header and the first 8 bytes
    of its payload, which is what the guest's stack matches the error to its socket by."""
    header_len = (original[0] & 0x0F) * 4 if original else 0
    return icmp(type_, code, b"\x00\x00\x00\x00", original[: header_len + 8])


def ipv4_frame(
    dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, proto: int, payload: bytes
) -> bytes:
    """An Ethernet frame carrying one IPv4 packet (checksums of ``payload`` are the caller's)."""
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4(src_ip, dst_ip, proto, payload))


MORE_FRAGMENTS = 0x2000


def ipv4_fragments(
    src: bytes, dst: bytes, proto: int, payload: bytes, mtu: int, *, ident: int
) -> list[bytes]:
    """``payload`` as IPv4 packets of at most ``mtu`` bytes: one packet when it fits, else
    fragments (RFC 791), so a guest with a small MTU still gets a large UDP answer."""
    if 20 + len(payload) <= mtu:
        return [ipv4(src, dst, proto, payload, ident=ident)]
    step = (mtu - 20) // 8 * 8
    packets = []
    for start in range(0, len(payload), step):
        piece = payload[start : start + step]
        more = MORE_FRAGMENTS if start + step < len(payload) else 0
        packets.append(ipv4(src, dst, proto, piece, ident=ident, fragment=more | (start // 8)))
    return packets
