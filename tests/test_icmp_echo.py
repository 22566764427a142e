"""The NAT's ICMP echo messages (:mod:`relay.nat.icmp_echo`), sans-IO, and the IPv4 header's
fragment flag the NAT drops fragments by."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.nat.icmp_echo import (
    echo_id,
    echo_reply,
    is_echo_reply,
    parse_echo_request,
    raw_echo_reply,
    with_id,
)
from relay.packets import build
from relay.packets.headers import IPPROTO_ICMP, IPPROTO_UDP, read_header

VM, SERVER = bytes((10, 0, 2, 15)), bytes((93, 184, 216, 34))
GATEWAY_MAC, VM_MAC = bytes.fromhex("525400123456"), bytes.fromhex("525400aa0001")


def request(ident: int = 0x1234, seq: int = 7, payload: bytes = b"ping!") -> bytes:
    message = build.icmp(
        build.ICMP_ECHO_REQUEST, 0, ident.to_bytes(2, "big") + seq.to_bytes(2, "big"), payload
    )
    return build.ipv4(VM, SERVER, IPPROTO_ICMP, message)


def test_a_guests_echo_request_is_parsed_with_its_id_and_destination() -> None:
    parsed = parse_echo_request(request(0x1234))
    assert parsed is not None
    assert (parsed.echo_id, parsed.dst) == (0x1234, SERVER)
    assert parsed.message.endswith(b"ping!")


def test_a_bad_checksum_or_another_type_is_not_an_echo_request() -> None:
    packet = bytearray(request())
    packet[-1] ^= 0xFF  # payload changed, checksum not
    assert parse_echo_request(bytes(packet)) is None
    reply = build.ipv4(VM, SERVER, IPPROTO_ICMP, echo_reply(request()[20:]))
    assert parse_echo_request(reply) is None


def test_rewriting_the_id_keeps_a_valid_checksum_and_the_rest() -> None:
    message = request(0x1234)[20:]
    rewritten = with_id(message, 0xBEEF)
    assert echo_id(rewritten) == 0xBEEF
    assert build.internet_checksum(rewritten) == 0
    assert rewritten[6:] == message[6:] and rewritten[0] == message[0]


def test_the_reply_to_a_request_echoes_id_sequence_and_payload() -> None:
    message = request(0x1234, seq=9, payload=b"abc")[20:]
    reply = echo_reply(message)
    assert is_echo_reply(reply) and build.internet_checksum(reply) == 0
    assert reply[4:] == message[4:]


def test_a_raw_sockets_echo_reply_gives_source_and_message() -> None:
    reply = echo_reply(request()[20:])
    packet = build.ipv4(SERVER, VM, IPPROTO_ICMP, reply)
    assert raw_echo_reply(packet) == (SERVER, reply)
    assert raw_echo_reply(request()) is None  # a request is not a reply
    assert raw_echo_reply(packet[:19]) is None


@given(st.binary(min_size=20, max_size=200))
def test_arbitrary_packets_are_an_echo_message_or_none(packet: bytes) -> None:
    """Untrusted bytes from a guest or a raw socket: never an exception, only None."""
    parsed = parse_echo_request(packet)
    if parsed is not None:
        assert build.internet_checksum(parsed.message) == 0
    reply = raw_echo_reply(packet)
    if reply is not None:
        assert is_echo_reply(reply[1])


def test_the_header_marks_fragments_but_not_whole_packets() -> None:
    whole = build.ipv4(VM, SERVER, IPPROTO_UDP, build.udp(VM, SERVER, 1, 2, b"x" * 40))
    frame = build.ethernet(GATEWAY_MAC, VM_MAC, 0x0800, whole)
    header = read_header(frame).ipv4
    assert header is not None and not header.fragment
    for flags in (0x20, 0x00):  # MF set at offset 0; no MF at a non-zero offset
        offset = 0 if flags else 0x10
        fragment = bytearray(whole)
        fragment[6], fragment[7] = flags | (offset >> 8), offset & 0xFF
        header = read_header(build.ethernet(GATEWAY_MAC, VM_MAC, 0x0800, bytes(fragment))).ipv4
        assert header is not None and header.fragment
