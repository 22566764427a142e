"""Datagram framing: one type byte, then a control message, a frame or a chunk.

::

    CONTROL 0x00 | compact JSON
    FRAME   0x01 | Ethernet frame (sent unchunked when <= 950 bytes)
    CHUNK   0x02 | chunk_id u16 BE | index u8 | total u8 | payload (<= 900 bytes)

Frames above the threshold are chunked for unicast *and* broadcast alike, so no datagram the
relay sends is larger than 951 bytes (the Rust relay left broadcasts unchunked; a browser
then tore the session down).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from relay.errors import BadDatagram
from relay.wire.messages import ControlMessage, control_to_json, decode_control_untrusted

CHUNK_THRESHOLD = 950
"""Frames up to this many bytes travel as one 0x01 datagram."""
MAX_CHUNK_PAYLOAD = 900
"""Frame bytes carried by each chunk but the last."""
CHUNK_HEADER_SIZE = 5
MIN_FRAME_SIZE = 14
"""An Ethernet II header: destination MAC, source MAC, EtherType."""
MAX_FRAME_SIZE = 1518
"""1514-byte Ethernet frame plus room for one 802.1Q tag; no FCS travels."""
MAX_CHUNKS = 255

_CHUNK_HEADER = struct.Struct("!BHBB")


class MessageType(IntEnum):
    """The first byte of every datagram."""

    CONTROL = 0x00
    FRAME = 0x01
    CHUNK = 0x02


@dataclass(frozen=True, slots=True)
class Control:
    """A decoded 0x00 datagram."""

    message: ControlMessage


@dataclass(frozen=True, slots=True)
class DataFrame:
    """A decoded 0x01 datagram: one whole Ethernet frame."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded 0x02 datagram: one slice of a larger frame."""

    chunk_id: int
    index: int
    total: int
    payload: bytes


Decoded = Control | DataFrame | Chunk


def decode_datagram_untrusted(data: bytes) -> Decoded:
    """Decode one datagram payload. Raises only :class:`BadDatagram`."""
    if not data:
        raise BadDatagram("empty datagram", reason="empty")
    kind = data[0]
    if kind == MessageType.FRAME:
        frame = data[1:]
        if len(frame) < MIN_FRAME_SIZE:
            raise BadDatagram(f"frame of {len(frame)} bytes is too short", reason="runt_frame")
        if len(frame) > MAX_FRAME_SIZE:
            raise BadDatagram(f"frame of {len(frame)} bytes is too long", reason="giant_frame")
        return DataFrame(frame)
    if kind == MessageType.CHUNK:
        if len(data) <= CHUNK_HEADER_SIZE:
            raise BadDatagram("chunk without payload", reason="bad_chunk")
        _, chunk_id, index, total = _CHUNK_HEADER.unpack_from(data)
        if total == 0 or index >= total:
            raise BadDatagram(f"chunk index {index} of {total}", reason="bad_chunk")
        payload = data[CHUNK_HEADER_SIZE:]
        if len(payload) > MAX_FRAME_SIZE:
            raise BadDatagram("chunk larger than a frame", reason="bad_chunk")
        return Chunk(chunk_id, index, total, payload)
    if kind == MessageType.CONTROL:
        return Control(decode_control_untrusted(data[1:]))
    raise BadDatagram(f"unknown message type 0x{kind:02x}", reason="unknown_type")


def encode_control(message: ControlMessage) -> bytes:
    """``0x00`` + compact JSON, byte-identical to the Rust relay's output."""
    return b"\x00" + control_to_json(message).encode("utf-8")


class ChunkIdCounter:
    """A sender's wrapping u16 chunk id; advanced only for chunked frames."""

    __slots__ = ("_next",)

    def __init__(self, start: int = 0) -> None:
        self._next = start & 0xFFFF

    def take(self) -> int:
        value = self._next
        self._next = (value + 1) & 0xFFFF
        return value


def encode_frame(frame: bytes, ids: ChunkIdCounter) -> list[bytes]:
    """Datagrams that carry ``frame``: one 0x01 datagram or a run of 0x02 chunks."""
    size = len(frame)
    if size <= CHUNK_THRESHOLD:
        return [b"\x01" + frame]
    total = -(-size // MAX_CHUNK_PAYLOAD)
    if total > MAX_CHUNKS:
        raise ValueError(f"frame of {size} bytes needs more than {MAX_CHUNKS} chunks")
    chunk_id = ids.take()
    return [
        _CHUNK_HEADER.pack(MessageType.CHUNK, chunk_id, index, total)
        + frame[offset : offset + MAX_CHUNK_PAYLOAD]
        for index, offset in enumerate(range(0, size, MAX_CHUNK_PAYLOAD))
    ]
