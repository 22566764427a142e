"""Sans-IO BAVY wire protocol: datagram framing, control messages, chunking, reassembly.

Nothing in this package performs I/O or imports trio; a test checks that.
"""

from relay.wire.codec import (
    CHUNK_HEADER_SIZE,
    CHUNK_THRESHOLD,
    MAX_CHUNK_PAYLOAD,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    Chunk,
    ChunkIdCounter,
    Control,
    DataFrame,
    MessageType,
    decode_datagram_untrusted,
    encode_control,
    encode_frame,
)
from relay.wire.messages import (
    Assigned,
    ControlMessage,
    Disconnect,
    Error,
    Heartbeat,
    HeartbeatAck,
    PeerList,
    Register,
    decode_control_untrusted,
    format_mac,
)
from relay.wire.reassembly import Reassembler, ReassemblyLimits

__all__ = [
    "CHUNK_HEADER_SIZE",
    "CHUNK_THRESHOLD",
    "MAX_CHUNK_PAYLOAD",
    "MAX_FRAME_SIZE",
    "MIN_FRAME_SIZE",
    "Assigned",
    "Chunk",
    "ChunkIdCounter",
    "Control",
    "ControlMessage",
    "DataFrame",
    "Disconnect",
    "Error",
    "Heartbeat",
    "HeartbeatAck",
    "MessageType",
    "PeerList",
    "Reassembler",
    "ReassemblyLimits",
    "Register",
    "decode_control_untrusted",
    "decode_datagram_untrusted",
    "encode_control",
    "encode_frame",
    "format_mac",
]
