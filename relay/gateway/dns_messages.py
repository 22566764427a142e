"""Sans-IO DNS pieces for the forwarder: query checks, answer matching, SERVFAIL/TC builders.

The forwarder passes answers through byte for byte, so only the 12-byte header and the one
question are ever parsed (RFC 1035 §4.1). That parser is small and bounds-checked on purpose:
dpkt's DNS decoder leaks ``UnicodeDecodeError`` and friends on junk, and the relay must never
decode more of a guest's packet than it needs.

Every function that reads network bytes raises only :class:`BadDnsMessage` (``matches`` never
raises). Nothing here imports trio or socket.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from relay.errors import ConfigError, RemoteProtocolError

HEADER_SIZE = 12
MAX_QUERY_SIZE = 4096
CLASSIC_UDP_SIZE = 512
"""Largest query accepted from a guest: a question plus an OPT record never comes close."""
MAX_NAME_SIZE = 255
"""RFC 1035 §2.3.4: a name on the wire, length octets and the root label included."""
MAX_LABEL_SIZE = 63

_HEADER = struct.Struct("!HHHHHH")

_QR = 0x8000
_OPCODE_MASK = 0x7800
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_RCODE_SERVFAIL = 2
_POINTER = 0xC0


class BadDnsMessage(RemoteProtocolError):
    """A DNS message from a guest or an upstream that cannot be used; counted and dropped."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """A resolver the forwarder asks, as ``(host, port)`` for a connected socket."""

    host: str
    """An IPv4 or IPv6 literal (IPv6 may carry a ``%scope`` for link-local resolvers)."""
    port: int = 53


@dataclass(frozen=True, slots=True)
class _Question:
    end: int
    """Offset just past QTYPE and QCLASS: the question section is ``message[12:end]``."""
    key: tuple[bytes, int, int]
    """(lower-cased wire name, qtype, qclass), for comparing a query with an answer."""


def parse_upstream(text: str) -> Upstream:
    """``1.2.3.4``, ``1.2.3.4:5353``, ``::1``, ``[::1]:5353``; raises ConfigError otherwise."""
    spec = text.strip()
    host, port_text = spec, ""
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"DNS upstream {text!r}: expected [IPv6] or [IPv6]:port")
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            raise ConfigError(f"DNS upstream {text!r}: missing port after ':'")
        if ":" not in host:
            raise ConfigError(f"DNS upstream {text!r}: brackets are for IPv6 addresses only")
    elif spec.count(":") == 1:  # IPv4:port; a bare IPv6 literal has at least two colons
        host, _, port_text = spec.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"DNS upstream {text!r}: not an IP address") from None
    port = 53
    if port_text or spec.endswith(":"):
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"DNS upstream {text!r}: port must be 1-65535")
        port = int(port_text)
    return Upstream(str(address), port)


def read_resolv_conf(text: str) -> tuple[Upstream, ...]:
    """The ``nameserver`` entries of a resolv.conf, in order, duplicates dropped.

    Comments (``#`` or ``;`` to the end of a line), other keywords and unparsable addresses are
    skipped, as the C library does. An empty result is the caller's to handle.
    """
    found: dict[Upstream, None] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            found[parse_upstream(words[1])] = None
        except ConfigError:
            continue
    return tuple(found)


def _header(message: bytes) -> tuple[int, int, int, int, int, int]:
    if len(message) < HEADER_SIZE:
        raise BadDnsMessage(f"DNS message of {len(message)} bytes", reason="dns_short")
    return _HEADER.unpack_from(message)


def _question(message: bytes) -> _Question:
    """The first question, which starts right after the header.

    A compression pointer can only point backwards (RFC 1035 §4.1.4) and nothing before the first
    question is a name, so any pointer here is junk; rejecting pointers outright also rules out
    pointer loops.
    """
    offset = HEADER_SIZE
    name = bytearray()
    while True:
        if offset >= len(message):
            raise BadDnsMessage("question name runs past the end", reason="dns_bad_question")
        length = message[offset]
        if length & _POINTER:
            raise BadDnsMessage("compressed or extended label in question", reason="dns_bad_name")
        label = message[offset : offset + 1 + length]
        if len(label) != 1 + length:
            raise BadDnsMessage("question label runs past the end", reason="dns_bad_question")
        name += label
        offset += 1 + length
        if len(name) > MAX_NAME_SIZE:
            raise BadDnsMessage("question name longer than 255 bytes", reason="dns_bad_name")
        if length == 0:
            break
    if offset + 4 > len(message):
        raise BadDnsMessage("question without type and class", reason="dns_bad_question")
    qtype, qclass = struct.unpack_from("!HH", message, offset)
    return _Question(offset + 4, (bytes(name).lower(), qtype, qclass))


def check_query(payload: bytes) -> int:
    """The 16-bit id of a standard query with one question; raises BadDnsMessage otherwise.

    Only the header and the question are checked: the forwarder hands the bytes on unchanged and
    the upstream judges the rest (EDNS options and so on).
    """
    if len(payload) > MAX_QUERY_SIZE:
        raise BadDnsMessage(f"DNS query of {len(payload)} bytes", reason="dns_too_long")
    ident, flags, qdcount, _, _, _ = _header(payload)
    if flags & _QR:
        raise BadDnsMessage("DNS response sent as a query", reason="dns_not_query")
    if flags & _OPCODE_MASK:
        raise BadDnsMessage(f"DNS opcode {(flags & _OPCODE_MASK) >> 11}", reason="dns_opcode")
    if qdcount != 1:
        raise BadDnsMessage(f"DNS query with {qdcount} questions", reason="dns_qdcount")
    _question(payload)
    return ident


def matches(query: bytes, response: bytes) -> bool:
    """Whether ``response`` answers ``query``: same id and opcode, QR set, the same question.

    Names compare case-insensitively (some resolvers normalise case). Junk gives False.
    """
    try:
        q_id, q_flags, _, _, _, _ = _header(query)
        r_id, r_flags, r_qdcount, _, _, _ = _header(response)
        if r_id != q_id or not r_flags & _QR or r_qdcount != 1:
            return False
        if (r_flags ^ q_flags) & _OPCODE_MASK:
            return False
        return _question(response).key == _question(query).key
    except BadDnsMessage:
        return False


def message_id(message: bytes) -> int:
    """The id of a message already checked to have a whole header."""
    return int.from_bytes(message[:2], "big")


def with_id(message: bytes, ident: int) -> bytes:
    """``message`` with its id replaced, so the forwarder can pick its own for upstream."""
    if len(message) < HEADER_SIZE:
        raise BadDnsMessage(f"DNS message of {len(message)} bytes", reason="dns_short")
    return struct.pack("!H", ident & 0xFFFF) + message[2:]


def servfail(query: bytes) -> bytes:
    """SERVFAIL (RCODE 2) for ``query``: its id, RD copied, RA set, its question, no records."""
    ident, flags, qdcount, _, _, _ = _header(query)
    if qdcount != 1:
        raise BadDnsMessage(f"DNS query with {qdcount} questions", reason="dns_qdcount")
    end = _question(query).end
    out_flags = _QR | (flags & (_OPCODE_MASK | _RD)) | _RA | _RCODE_SERVFAIL
    return _HEADER.pack(ident, out_flags, 1, 0, 0, 0) + query[HEADER_SIZE:end]


def truncated(response: bytes) -> bytes:
    """``response`` cut to its header (TC set, no records) and question, RFC 2181 §9 style.

    Sent when an answer does not fit the guest's UDP limit; the guest then retries over TCP or
    with a larger EDNS buffer.
    """
    ident, flags, qdcount, _, _, _ = _header(response)
    if qdcount > 1:
        raise BadDnsMessage(f"DNS response with {qdcount} questions", reason="dns_qdcount")
    end = _question(response).end if qdcount else HEADER_SIZE
    return _HEADER.pack(ident, flags | _TC, qdcount, 0, 0, 0) + response[HEADER_SIZE:end]


def is_truncated(response: bytes) -> bool:
    """Whether the TC bit is set (the caller has already checked the header is there)."""
    return len(response) >= HEADER_SIZE and bool(response[2] << 8 & _TC)


def udp_size_limit(query: bytes) -> int:
    """The largest UDP answer ``query``'s sender accepts: its EDNS buffer size (RFC 6891), or
    512 without EDNS (RFC 1035). Looks for the OPT record where queries carry it: first in the
    additional section, with no answer or authority records."""
    _, _, _, ancount, nscount, arcount = _header(query)
    if ancount or nscount or not arcount:
        return CLASSIC_UDP_SIZE
    offset = _question(query).end
    if query[offset : offset + 3] != b"\x00\x00\x29" or len(query) < offset + 5:
        return CLASSIC_UDP_SIZE
    (size,) = struct.unpack_from("!H", query, offset + 3)
    return max(CLASSIC_UDP_SIZE, int(size))
