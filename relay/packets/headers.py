"""The fields the switch and port security need from a frame, read with ``struct``.

Every frame a port sends passes through here, so it reads fixed offsets instead of building a
full dpkt object (the gateway services parse their few frames with dpkt). One failure mode:
:class:`BadFrame`, whose ``reason`` is a bounded counter label.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relay.errors import RemoteProtocolError

ETH_HEADER = 14
MIN_FRAME = ETH_HEADER
MAX_FRAME = 1518
BROADCAST = b"\xff" * 6

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
VLAN_ETHERTYPES = frozenset({0x8100, 0x88A8, 0x9100})

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4_FIXED = struct.Struct("!BBHHHBBH4s4s")
_PORTS = struct.Struct("!HH")


class BadFrame(RemoteProtocolError):
    """A frame too short or inconsistent to switch or serve."""


@dataclass(frozen=True, slots=True)
class Arp:
    """An Ethernet/IPv4 ARP packet."""

    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


@dataclass(frozen=True, slots=True)
class Ipv4:
    """An IPv4 header; ``ports`` for the first fragment of UDP/TCP, else None."""

    src: bytes
    dst: bytes
    proto: int
    header_len: int
    total_len: int
    ports: tuple[int, int] | None
    fragment: bool = False
    """More fragments follow, or this is not the first (the NAT forwards whole packets)."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    dst: bytes
    src: bytes
    ethertype: int
    arp: Arp | None = None
    ipv4: Ipv4 | None = None

    @property
    def is_group(self) -> bool:
        """Broadcast or multicast destination."""
        return bool(self.dst[0] & 1)


def read_header(frame: bytes) -> FrameHeader:
    """The switchable view of ``frame``; raises :class:`BadFrame`."""
    size = len(frame)
    if size < MIN_FRAME:
        raise BadFrame(f"frame of {size} bytes is shorter than an Ethernet header", reason="short")
    if size > MAX_FRAME:
        raise BadFrame(f"frame of {size} bytes exceeds {MAX_FRAME}", reason="oversized")
    dst, src, ethertype = frame[0:6], frame[6:12], (frame[12] << 8) | frame[13]
    if ethertype == ETHERTYPE_IPV4:
        return FrameHeader(dst, src, ethertype, ipv4=_read_ipv4(frame))
    if ethertype == ETHERTYPE_ARP:
        return FrameHeader(dst, src, ethertype, arp=_read_arp(frame))
    return FrameHeader(dst, src, ethertype)


def _read_arp(frame: bytes) -> Arp:
    if len(frame) < ETH_HEADER + _ARP.size:
        raise BadFrame("truncated ARP packet", reason="arp_truncated")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_HEADER)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
        raise BadFrame("ARP for something other than Ethernet/IPv4", reason="arp_unsupported")
    return Arp(op, sha, spa, tha, tpa)


def _read_ipv4(frame: bytes) -> Ipv4:
    if len(frame) < ETH_HEADER + _IPV4_FIXED.size:
        raise BadFrame("truncated IPv4 header", reason="ipv4_truncated")
    vihl, _tos, total_len, _ident, frag, _ttl, proto, _sum, src, dst = _IPV4_FIXED.unpack_from(
        frame, ETH_HEADER
    )
    header_len = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or header_len < 20:
        raise BadFrame("not an IPv4 header", reason="ipv4_header")
    if total_len < header_len or ETH_HEADER + total_len > len(frame):
        raise BadFrame("IPv4 total length disagrees with the frame", reason="ipv4_length")
    ports = None
    if proto in (IPPROTO_UDP, IPPROTO_TCP) and frag & 0x1FFF == 0:
        if total_len < header_len + 4:
            raise BadFrame("truncated UDP/TCP header", reason="l4_truncated")
        ports = _PORTS.unpack_from(frame, ETH_HEADER + header_len)
    return Ipv4(src, dst, proto, header_len, total_len, ports, bool(frag & 0x3FFF))
