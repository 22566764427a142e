"""ICMP echo messages as the NAT handles them, sans-IO: parse a guest's request, rewrite ids,
answer from the ``ping`` command's verdict, read a raw socket's reply.

The one failure mode is ``None``: anything that is not a whole, well-formed echo message is
not one, and the caller counts and drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.packets import build


@dataclass(frozen=True, slots=True)
class EchoRequest:
    message: bytes
    """The ICMP message (header and payload)."""
    echo_id: int
    dst: bytes
    """The IPv4 destination it was sent to."""


def parse_echo_request(packet: bytes) -> EchoRequest | None:
    """The echo request an IPv4 ``packet`` carries, if it is whole with a good checksum."""
    header_len = (packet[0] & 0x0F) * 4
    message = packet[header_len:]
    if len(message) < 8 or message[0] != build.ICMP_ECHO_REQUEST or message[1] != 0:
        return None
    if build.internet_checksum(message) != 0:
        return None
    return EchoRequest(message, echo_id(message), packet[16:20])


def is_echo_reply(message: bytes) -> bool:
    return len(message) >= 8 and message[0] == build.ICMP_ECHO_REPLY


def echo_id(message: bytes) -> int:
    return (message[4] << 8) | message[5]


def with_id(message: bytes, new_id: int) -> bytes:
    """``message`` with another echo id and the checksum recomputed."""
    body = message[:2] + b"\x00\x00" + new_id.to_bytes(2, "big") + message[6:]
    return body[:2] + build.internet_checksum(body).to_bytes(2, "big") + body[4:]


def echo_reply(request: bytes) -> bytes:
    """The echo reply to the ICMP message ``request``: same id, sequence and payload."""
    return build.icmp(build.ICMP_ECHO_REPLY, 0, request[4:8], request[8:])


def raw_echo_reply(packet: bytes) -> tuple[bytes, bytes] | None:
    """``(source, message)`` of an echo reply read from a raw socket (IP header included)."""
    if len(packet) < 20:
        return None
    message = packet[(packet[0] & 0x0F) * 4 :]
    return (packet[12:16], message) if is_echo_reply(message) else None
