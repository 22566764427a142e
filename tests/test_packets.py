"""The switch's header view and the gateway's frame builders, against dpkt."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from packets import BROADCAST, arp_frame, ipv4_frame, mac, udp_frame

from relay.packets import build
from relay.packets.headers import BadFrame, read_header

macs = st.binary(min_size=6, max_size=6)
ips = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 65535)


@given(st.binary(max_size=1600))
def test_arbitrary_bytes_raise_only_bad_frame(data: bytes) -> None:
    reason = ""
    try:
        header = read_header(data)
    except BadFrame as exc:
        reason = exc.reason
    else:
        assert header.src == data[6:12]
        return
    assert reason


@given(macs, macs, ips, ips, ports, ports, st.binary(max_size=900))
def test_udp_frames_are_read_like_dpkt_reads_them(
    src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, data: bytes
) -> None:
    frame = udp_frame(src_mac, dst_mac, src, dst, sport, dport, data)
    header = read_header(frame)
    assert (header.dst, header.src, header.ethertype) == (dst_mac, src_mac, 0x0800)
    assert header.ipv4 is not None
    assert (header.ipv4.src, header.ipv4.dst, header.ipv4.proto) == (src, dst, 17)
    assert header.ipv4.ports == (sport, dport)


@given(macs, macs, ips, ips, ports, ports, st.integers(0, 255))
def test_tcp_frames_and_fragments(
    src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, flags: int
) -> None:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags)
    frame = ipv4_frame(src_mac, dst_mac, src, dst, 6, tcp)
    header = read_header(frame)
    assert header.ipv4 is not None and header.ipv4.ports == (sport, dport)
    # A later fragment has no L4 header: no ports.
    later = bytearray(frame)
    later[14 + 6 : 14 + 8] = (185).to_bytes(2, "big")
    fragment = read_header(bytes(later))
    assert fragment.ipv4 is not None and fragment.ipv4.ports is None


@given(st.sampled_from([1, 2]), macs, ips, macs, ips)
def test_arp_is_read(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> None:
    header = read_header(arp_frame(op, sha, spa, tha, tpa, BROADCAST))
    assert header.arp is not None
    assert (header.arp.op, header.arp.sender_mac, header.arp.sender_ip) == (op, sha, spa)
    assert (header.arp.target_mac, header.arp.target_ip) == (tha, tpa)
    assert header.is_group


@pytest.mark.parametrize(
    ("cut", "reason"),
    [(10, "short"), (14 + 10, "ipv4_truncated"), (14 + 22, "ipv4_length")],
)
def test_truncated_frames_name_their_reason(cut: int, reason: str) -> None:
    frame = udp_frame(mac(1), mac(2), b"\x0a\0\2\x0f", b"\x0a\0\2\x02", 1000, 53, b"x" * 20)
    with pytest.raises(BadFrame) as caught:
        read_header(frame[:cut])
    assert caught.value.reason == reason


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(BadFrame, match="exceeds"):
        read_header(bytes(1519))


@given(ips, ips, ports, ports, st.binary(max_size=1400))
def test_built_udp_checksums_verify(
    src: bytes, dst: bytes, sport: int, dport: int, data: bytes
) -> None:
    frame = build.udp_frame(mac(2), mac(1), src, dst, sport, dport, data)
    parsed = dpkt.ethernet.Ethernet(frame)
    packet = parsed.data
    assert isinstance(packet, dpkt.ip.IP)
    assert build.internet_checksum(frame[14:34]) == 0
    pseudo = src + dst + bytes((0, 17)) + (8 + len(data)).to_bytes(2, "big")
    assert build.internet_checksum(pseudo + frame[34:]) in (0, 0xFFFF)
    assert bytes(packet.data.data) == data


@given(st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=1400))
def test_built_icmp_checksum_verifies(ident: int, seq: int, data: bytes) -> None:
    message = build.icmp(0, 0, ident.to_bytes(2, "big") + seq.to_bytes(2, "big"), data)
    assert build.internet_checksum(message) == 0
    parsed = dpkt.icmp.ICMP(message)
    assert (parsed.data.id, parsed.data.seq, bytes(parsed.data.data)) == (ident, seq, data)
