"""DNS query checks, answer matching, SERVFAIL/TC builders and resolver configuration."""

from __future__ import annotations

import string
import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import ConfigError
from relay.gateway.dns_messages import (
    MAX_QUERY_SIZE,
    BadDnsMessage,
    Upstream,
    check_query,
    is_truncated,
    matches,
    parse_upstream,
    read_resolv_conf,
    servfail,
    truncated,
    with_id,
)

QTYPES = st.sampled_from([1, 28, 16, 15, 33, 65, 255]) | st.integers(0, 0xFFFF)
DPKT_QTYPES = st.sampled_from([1, 28, 16, 15, 33, 65])
OPT_RECORD = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # EDNS(0), RFC 6891


def wire_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def make_query(
    ident: int,
    labels: list[bytes],
    qtype: int = 1,
    *,
    flags: int = 0x0100,
    qclass: int = 1,
    edns: bool = False,
) -> bytes:
    header = struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 1 if edns else 0)
    question = wire_name(labels) + struct.pack("!HH", qtype, qclass)
    return header + question + (OPT_RECORD if edns else b"")


def fits(labels: list[bytes]) -> bool:
    return len(wire_name(labels)) <= 255


LABELS = st.lists(st.binary(min_size=1, max_size=63), max_size=8).filter(fits)
HOSTNAME_LABELS = st.lists(
    st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20).map(str.encode),
    min_size=1,
    max_size=5,
)
IDS = st.integers(0, 0xFFFF)


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    return make_query(
        draw(IDS),
        draw(LABELS),
        draw(QTYPES),
        flags=draw(st.sampled_from([0, 0x0100, 0x0110, 0x0120])),
        edns=draw(st.booleans()),
    )


def dpkt_response(query: bytes, *, answers: int = 1) -> bytes:
    """An answer to ``query`` as a real resolver would build it (via dpkt, not our code)."""
    parsed = dpkt.dns.DNS(query)
    parsed.qr = 1
    parsed.ra = 1
    parsed.ar = []
    name = parsed.qd[0].name
    parsed.an = [
        dpkt.dns.DNS.RR(name=name, type=1, cls=1, ttl=60, rlen=4, rdata=bytes([192, 0, 2, i]))
        for i in range(answers)
    ]
    return bytes(parsed)


# --- check_query -------------------------------------------------------------------------------


@given(ident=IDS, labels=LABELS, qtype=QTYPES, edns=st.booleans())
def test_generated_queries_pass_and_give_their_id(
    ident: int, labels: list[bytes], qtype: int, edns: bool
) -> None:
    assert check_query(make_query(ident, labels, qtype, edns=edns)) == ident


@given(ident=IDS, labels=HOSTNAME_LABELS, qtype=DPKT_QTYPES)
def test_queries_built_by_dpkt_pass(ident: int, labels: list[bytes], qtype: int) -> None:
    name = b".".join(labels).decode()
    query = bytes(dpkt.dns.DNS(id=ident, qd=[dpkt.dns.DNS.Q(name=name, type=qtype)]))
    assert check_query(query) == ident


@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_bad_dns_message(data: bytes) -> None:
    for parse in (check_query, servfail, truncated):
        try:
            parse(data)
        except BadDnsMessage as exc:
            reason = exc.reason
        else:
            reason = "dns_accepted"
        assert reason.startswith("dns_")
    assert matches(data, data) in (True, False)


@given(query=queries(), data=st.data())
def test_mutated_queries_raise_only_bad_dns_message(query: bytes, data: st.DataObject) -> None:
    # Arbitrary bytes rarely get past the header; flipping bytes of a valid query reaches the
    # name parser's corners (pointers, overlong labels, early ends).
    mutated = bytearray(query)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    message = bytes(mutated[:cut])
    try:
        ident = check_query(message)
    except BadDnsMessage:
        return
    assert ident == int.from_bytes(message[:2], "big")
    assert matches(message, servfail(message))


def header(flags: int = 0x0100, qdcount: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, 0, 0, 0)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "dns_short"),
        (header()[:11], "dns_short"),
        (header(flags=0x8100) + wire_name([b"a"]) + b"\x00\x01\x00\x01", "dns_not_query"),
        (header(flags=0x2800) + wire_name([b"a"]) + b"\x00\x01\x00\x01", "dns_opcode"),  # UPDATE
        (header(flags=0x1000) + wire_name([b"a"]) + b"\x00\x01\x00\x01", "dns_opcode"),  # STATUS
        (header(qdcount=0), "dns_qdcount"),
        (header(qdcount=2) + 2 * (wire_name([b"a"]) + b"\x00\x01\x00\x01"), "dns_qdcount"),
        (header(), "dns_bad_question"),
        (header() + b"\x05ab", "dns_bad_question"),
        (header() + b"\x01a", "dns_bad_question"),
        (header() + wire_name([b"a"]) + b"\x00\x01\x00", "dns_bad_question"),
        (header() + b"\xc0\x0c\x00\x01\x00\x01", "dns_bad_name"),  # pointer to itself: a loop
        (header() + b"\x01a\xc0\x0c\x00\x01\x00\x01", "dns_bad_name"),  # pointer back: a loop
        (header() + b"\x01a\xc0\x00\x00\x01\x00\x01", "dns_bad_name"),  # pointer into header
        (header() + b"\x41" + 65 * b"a" + b"\x00\x00\x01\x00\x01", "dns_bad_name"),  # 0x40 type
        (header() + 5 * (b"\x3f" + 63 * b"a") + b"\x00\x00\x01\x00\x01", "dns_bad_name"),
        (make_query(1, [b"a"]) + bytes(MAX_QUERY_SIZE), "dns_too_long"),
    ],
)
def test_bad_queries_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadDnsMessage) as caught:
        check_query(payload)
    assert caught.value.reason == reason


def test_longest_legal_name_and_query_size_pass() -> None:
    labels = [63 * b"a", 63 * b"b", 63 * b"c", 61 * b"d"]  # 255 bytes on the wire
    assert len(wire_name(labels)) == 255
    assert check_query(make_query(7, labels)) == 7
    query = make_query(8, [b"a"], edns=True)
    padded = query + bytes(MAX_QUERY_SIZE - len(query))
    assert check_query(padded) == 8


# --- matches ----------------------------------------------------------------------------------


@given(ident=IDS, labels=HOSTNAME_LABELS, qtype=DPKT_QTYPES)
def test_a_real_answer_matches_and_altered_ones_do_not(
    ident: int, labels: list[bytes], qtype: int
) -> None:
    query = make_query(ident, labels, qtype, edns=True)
    response = dpkt_response(query)
    assert matches(query, response)
    # Resolvers may change the case of the name (0x20 randomisation, normalisation).
    upper = bytes(response[:12]) + response[12:].replace(labels[0], labels[0].swapcase(), 1)
    assert matches(query, upper)

    assert not matches(query, with_id(response, ident ^ 1))
    assert not matches(query, response[:2] + bytes([response[2] & 0x7F]) + response[3:])  # QR=0
    assert not matches(query, response[:12])  # no question
    assert not matches(query, response[:2] + bytes([response[2] | 0x28]) + response[3:])  # opcode
    other_type = make_query(ident, labels, qtype ^ 0x100)
    assert not matches(query, dpkt_response(other_type))
    other_class = make_query(ident, labels, qtype, qclass=3)
    assert not matches(query, dpkt_response(other_class))
    other_name = make_query(ident, [*labels, b"x"], qtype)
    assert not matches(query, dpkt_response(other_name))
    assert not matches(query, b"")


def test_a_response_with_two_questions_does_not_match() -> None:
    query = make_query(9, [b"a", b"test"])
    question = query[12:]
    response = struct.pack("!HHHHHH", 9, 0x8180, 2, 0, 0, 0) + question + question
    assert not matches(query, response)


# --- servfail and truncated -------------------------------------------------------------------


@given(ident=IDS, labels=HOSTNAME_LABELS, qtype=DPKT_QTYPES, rd=st.booleans(), edns=st.booleans())
def test_servfail_keeps_id_question_and_rd(
    ident: int, labels: list[bytes], qtype: int, rd: bool, edns: bool
) -> None:
    query = make_query(ident, labels, qtype, flags=0x0100 if rd else 0, edns=edns)
    reply = servfail(query)
    parsed = dpkt.dns.DNS(reply)
    assert parsed.id == ident
    assert (parsed.qr, parsed.opcode, parsed.rcode, parsed.ra, parsed.tc) == (1, 0, 2, 1, 0)
    assert parsed.rd == int(rd)
    assert [(q.name, q.type, q.cls) for q in parsed.qd] == [(b".".join(labels).decode(), qtype, 1)]
    assert (parsed.an, parsed.ns, parsed.ar) == ([], [], [])
    assert matches(query, reply)


@given(query=queries())
def test_servfail_echoes_any_question_byte_for_byte(query: bytes) -> None:
    reply = servfail(query)
    question_end = len(query) - (len(OPT_RECORD) if query[11] else 0)
    assert reply[12:] == query[12:question_end]
    assert matches(query, reply)


@given(ident=IDS, labels=HOSTNAME_LABELS, qtype=DPKT_QTYPES, answers=st.integers(0, 40))
def test_truncated_keeps_header_and_question_only(
    ident: int, labels: list[bytes], qtype: int, answers: int
) -> None:
    query = make_query(ident, labels, qtype)
    response = dpkt_response(query, answers=answers)
    cut = truncated(response)
    parsed = dpkt.dns.DNS(cut)
    assert parsed.id == ident
    assert (parsed.qr, parsed.tc, parsed.ra, parsed.rcode) == (1, 1, 1, 0)
    assert [(q.name, q.type) for q in parsed.qd] == [(b".".join(labels).decode(), qtype)]
    assert (parsed.an, parsed.ns, parsed.ar) == ([], [], [])
    assert len(cut) == len(query)
    assert is_truncated(cut)
    assert not is_truncated(response)
    assert matches(query, cut)


def test_truncated_keeps_the_rcode_and_handles_no_question() -> None:
    formerr = struct.pack("!HHHHHH", 3, 0x8181, 0, 0, 0, 0)
    assert truncated(formerr) == struct.pack("!HHHHHH", 3, 0x8381, 0, 0, 0, 0)


def test_with_id_replaces_only_the_id() -> None:
    query = make_query(0x1234, [b"example"])
    assert with_id(query, 0xBEEF) == b"\xbe\xef" + query[2:]
    with pytest.raises(BadDnsMessage):
        with_id(b"\x00", 1)


# --- upstream configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", Upstream("1.2.3.4", 53)),
        (" 1.2.3.4:5353\n", Upstream("1.2.3.4", 5353)),
        ("::1", Upstream("::1", 53)),
        ("[::1]", Upstream("::1", 53)),
        ("[::1]:5353", Upstream("::1", 5353)),
        ("2001:DB8:0:0::53", Upstream("2001:db8::53", 53)),
        ("[2001:db8::53]:65535", Upstream("2001:db8::53", 65535)),
        ("fe80::1%eth0", Upstream("fe80::1%eth0", 53)),
    ],
)
def test_parse_upstream_accepts(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dns.example",
        "1.2.3",
        "1.2.3.4:",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:x",
        "1.2.3.4:+53",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[1.2.3.4]:53",
        "::1]:53",
        "1.2.3.4\n:53",
        "256.1.1.1",
    ],
)
def test_parse_upstream_rejects_with_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_upstream(text)
    message = str(caught.value)
    assert "\n" not in message
    assert "DNS upstream" in message


def test_read_resolv_conf_keeps_nameservers_in_order() -> None:
    text = """\
# Generated by NetworkManager
; another comment style
search example.com lan
domain example.com
options edns0 trust-ad ndots:2
nameserver 192.0.2.53
nameserver\t2001:db8::53   # inline comment
nameserver fe80::1%eth0
  nameserver 198.51.100.1;trailing
nameserver banana
nameserver
nameserver 999.1.1.1
nameservers 203.0.113.9
#nameserver 203.0.113.10
nameserver 192.0.2.53
"""
    assert read_resolv_conf(text) == (
        Upstream("192.0.2.53"),
        Upstream("2001:db8::53"),
        Upstream("fe80::1%eth0"),
        Upstream("198.51.100.1"),
    )


def test_read_resolv_conf_without_nameservers_is_empty() -> None:
    assert read_resolv_conf("") == ()
    assert read_resolv_conf("search lan\n\x00\xff garbage\n") == ()
