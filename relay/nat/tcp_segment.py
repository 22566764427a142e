"""TCP segments on the guest side of the NAT: parse and build, checksums included (sans-IO).

One failure mode: :class:`BadSegment`, whose ``reason`` is a bounded counter label. Options
other than MSS, window scale, SACK-permitted and SACK blocks are skipped; urgent data is
ordinary data (the urgent pointer is ignored, as RFC 6093 advises and as the newest slirp bug
warns).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relay.errors import RemoteProtocolError
from relay.packets.build import internet_checksum
from relay.packets.headers import IPPROTO_TCP

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER = struct.Struct("!HHIIBBHHH")
_PSEUDO = struct.Struct("!4s4sBBH")
OPT_END, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERMITTED, OPT_SACK = 0, 1, 2, 3, 4, 5
MAX_SACK_BLOCKS = 3
"""RFC 2018: three blocks fit beside other options; we send only these and read at most 4."""
SackBlocks = tuple[tuple[int, int], ...]


class BadSegment(RemoteProtocolError):
    """A TCP segment too short, inconsistent or corrupt to use."""


@dataclass(frozen=True, slots=True)
class Segment:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    """As on the wire: the receiver scales it."""
    payload: bytes = b""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack: SackBlocks = ()
    """SACK blocks as on the wire: (left edge, right edge) sequence numbers."""

    @property
    def seg_len(self) -> int:
        """Sequence space used: payload, plus one each for SYN and FIN."""
        return len(self.payload) + (self.flags & SYN and 1) + (self.flags & FIN)


def _checksum(src_ip: bytes, dst_ip: bytes, data: bytes) -> int:
    return internet_checksum(_PSEUDO.pack(src_ip, dst_ip, 0, IPPROTO_TCP, len(data)) + data)


def parse_segment(
    src_ip: bytes, dst_ip: bytes, data: bytes, *, verify_checksum: bool = True
) -> Segment:
    """``data`` is the IPv4 payload; raises :class:`BadSegment`."""
    if len(data) < 20:
        raise BadSegment("TCP header truncated", reason="tcp_truncated")
    sport, dport, seq, ack, offset, flags, window, _sum, _urgent = _HEADER.unpack_from(data)
    header_len = (offset >> 4) * 4
    if header_len < 20 or header_len > len(data):
        raise BadSegment("TCP data offset out of range", reason="tcp_offset")
    if verify_checksum and _checksum(src_ip, dst_ip, data) != 0:
        raise BadSegment("TCP checksum mismatch", reason="tcp_checksum")
    mss, wscale, sack, blocks = _options(data[20:header_len])
    payload = bytes(data[header_len:])
    return Segment(sport, dport, seq, ack, flags & 0x3F, window, payload, mss, wscale, sack, blocks)


def _options(options: bytes) -> tuple[int | None, int | None, bool, SackBlocks]:
    mss: int | None = None
    wscale: int | None = None
    sack = False
    blocks: SackBlocks = ()
    i, end = 0, len(options)
    while i < end:
        kind = options[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end or options[i + 1] < 2 or i + options[i + 1] > end:
            raise BadSegment("malformed TCP option", reason="tcp_option")
        length = options[i + 1]
        body = options[i + 2 : i + length]
        if kind == OPT_MSS and length == 4:
            mss = (body[0] << 8) | body[1]
        elif kind == OPT_WSCALE and length == 3:
            wscale = min(body[0], 14)
        elif kind == OPT_SACK_PERMITTED and length == 2:
            sack = True
        elif kind == OPT_SACK and length in (10, 18, 26, 34):
            edges = struct.unpack(f"!{(length - 2) // 4}I", body)
            blocks = tuple(zip(edges[::2], edges[1::2], strict=True))
        i += length
    return mss, wscale, sack, blocks


def build_segment(src_ip: bytes, dst_ip: bytes, segment: Segment) -> bytes:
    """The TCP header with its options, the payload, and the checksum filled in."""
    options = b""
    if segment.mss is not None:
        options += struct.pack("!BBH", OPT_MSS, 4, segment.mss)
    if segment.wscale is not None:
        options += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, segment.wscale)
    if segment.sack_permitted:
        options += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2)
    if segment.sack:
        blocks = segment.sack[:MAX_SACK_BLOCKS]
        options += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks))
        for left, right in blocks:
            options += struct.pack("!II", left & 0xFFFFFFFF, right & 0xFFFFFFFF)
    header_len = 20 + len(options)
    header = _HEADER.pack(
        segment.sport,
        segment.dport,
        segment.seq & 0xFFFFFFFF,
        segment.ack & 0xFFFFFFFF,
        (header_len // 4) << 4,
        segment.flags,
        min(segment.window, 0xFFFF),
        0,
        0,
    )
    data = header + options + segment.payload
    checksum = _checksum(src_ip, dst_ip, data)
    return data[:16] + checksum.to_bytes(2, "big") + data[18:]
