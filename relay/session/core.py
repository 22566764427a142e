"""Sans-IO session protocol: Register → Assigned, Heartbeat → HeartbeatAck, frames, timeouts.

Theory of operation. A session starts in ``AWAITING_REGISTER``. The first valid ``Register``
produces :class:`RegisterRequested`; the driver asks the LAN for an address and answers with
:meth:`SessionProtocol.accept_registration` (→ ``Assigned``) or
:meth:`SessionProtocol.refuse_registration` (→ ``Error`` and close). A repeated Register for the
same MAC re-sends the same Assigned without asking again. Only a registered session's frames
reach the LAN. Any datagram, even an undecodable one, counts as a sign of life. Silence past
the peer timeout, or no Register within the registration timeout, produces
:class:`CloseRequested` — the session is closed so the client reconnects, never left
registered-but-dead (the Rust relay's black hole).

Every method that can change a deadline takes ``now``; :meth:`next_deadline` says when
:meth:`handle_timer` must be called next.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum, StrEnum

from relay.errors import BadDatagram
from relay.wire.codec import (
    Chunk,
    ChunkIdCounter,
    Control,
    DataFrame,
    decode_datagram_untrusted,
    encode_control,
    encode_frame,
)
from relay.wire.messages import (
    Assigned,
    Disconnect,
    Error,
    Heartbeat,
    HeartbeatAck,
    Register,
)
from relay.wire.reassembly import Reassembler, ReassemblyLimits

HEARTBEAT_ACK = encode_control(HeartbeatAck())


class Phase(Enum):
    AWAITING_REGISTER = "awaiting_register"
    REGISTERED = "registered"
    CLOSED = "closed"


class CloseReason(StrEnum):
    """Why a session ends; also a bounded counter label."""

    REGISTRATION_TIMEOUT = "registration_timeout"
    PEER_TIMEOUT = "peer_timeout"
    CLIENT_DISCONNECT = "client_disconnect"
    POOL_EXHAUSTED = "pool_exhausted"
    REFUSED = "refused"
    SUPERSEDED = "superseded"
    SHUTDOWN = "shutdown"
    TRANSPORT_CLOSED = "transport_closed"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Session deadlines in seconds."""

    registration: float = 30.0
    peer: float = 150.0


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send this payload to the client."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A whole Ethernet frame from the registered client, for the LAN."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class RegisterRequested:
    """The client asked to register ``mac``; answer with accept/refuse_registration."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """Bad or unexpected input was dropped (already counted in ``drops``); log it."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """Close the session (the client will reconnect)."""

    reason: CloseReason


Output = SendDatagram | FrameReceived | RegisterRequested | CloseRequested | Dropped


class SessionProtocol:
    """The BAVY session state machine for one WebTransport session."""

    def __init__(
        self,
        now: float,
        timeouts: Timeouts | None = None,
        reassembly: ReassemblyLimits | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.phase = Phase.AWAITING_REGISTER
        self.mac: bytes | None = None
        self.assigned: Assigned | None = None
        self.started = now
        self.last_seen = now
        self.reassembler = Reassembler(reassembly)
        self._chunk_ids = ChunkIdCounter()
        self._pending_mac: bytes | None = None
        self.drops: Counter[str] = Counter()
        """Inbound datagrams dropped, by reason."""
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.close_reason: CloseReason | None = None

    # -- inbound ---------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> list[Output]:
        """Handle one datagram payload from the client."""
        if self.phase is Phase.CLOSED:
            return []
        self.last_seen = now
        try:
            decoded = decode_datagram_untrusted(data)
        except BadDatagram as exc:
            return self._drop(exc.reason, str(exc))
        if type(decoded) is DataFrame:
            return self._frame_in(decoded.frame)
        if type(decoded) is Chunk:
            reassembler = self.reassembler
            dropped = reassembler.dropped
            frame = reassembler.add(decoded, now)
            if frame is not None:
                return self._frame_in(frame)
            if reassembler.dropped != dropped and reassembler.last_drop != "chunk_duplicate":
                return [Dropped(reassembler.last_drop, f"chunk id {decoded.chunk_id}")]
            return []
        assert type(decoded) is Control
        message = decoded.message
        if type(message) is Heartbeat:
            return [SendDatagram(HEARTBEAT_ACK)]
        if type(message) is Register:
            return self._register(message.mac)
        if type(message) is Disconnect:
            return self._close(CloseReason.CLIENT_DISCONNECT)
        return self._drop("unexpected_control", type(message).__name__)

    def _drop(self, reason: str, detail: str) -> list[Output]:
        self.drops[reason] += 1
        return [Dropped(reason, detail)]

    def _frame_in(self, frame: bytes) -> list[Output]:
        if self.phase is not Phase.REGISTERED:
            return self._drop("unregistered_frame", "frame before Register")
        self.frames_in += 1
        self.bytes_in += len(frame)
        return [FrameReceived(frame)]

    def _register(self, mac: bytes) -> list[Output]:
        if self.phase is Phase.REGISTERED:
            if mac == self.mac and self.assigned is not None:
                return [SendDatagram(encode_control(self.assigned))]
            return self._drop("register_other_mac", "Register with another MAC")
        if mac[0] & 1:
            return self._drop("register_group_mac", "Register with a group MAC")
        if self._pending_mac is not None:
            return []  # the driver has not answered the first Register yet
        self._pending_mac = mac
        return [RegisterRequested(mac)]

    # -- answers from the driver -----------------------------------------------------------

    def accept_registration(self, assigned: Assigned) -> list[Output]:
        """The LAN leased ``assigned.ip`` to the pending MAC."""
        if self.phase is not Phase.AWAITING_REGISTER or self._pending_mac is None:
            raise RuntimeError("no registration is pending")
        self.mac, self._pending_mac = self._pending_mac, None
        self.assigned = assigned
        self.phase = Phase.REGISTERED
        return [SendDatagram(encode_control(assigned))]

    def refuse_registration(self, message: str, reason: CloseReason) -> list[Output]:
        """The LAN refused the pending MAC; tell the client and close."""
        self._pending_mac = None
        return [SendDatagram(encode_control(Error(message))), *self._close(reason)]

    def close(self, reason: CloseReason) -> list[Output]:
        """Close from the relay's side (shutdown, superseded by a newer session)."""
        return self._close(reason)

    def _close(self, reason: CloseReason) -> list[Output]:
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.CLOSED
        self.close_reason = reason
        return [CloseRequested(reason)]

    # -- outbound --------------------------------------------------------------------------

    def encode_frame(self, frame: bytes) -> list[bytes]:
        """Datagrams carrying ``frame`` to the client (chunked above 950 bytes)."""
        self.frames_out += 1
        self.bytes_out += len(frame)
        return encode_frame(frame, self._chunk_ids)

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must run next."""
        if self.phase is Phase.CLOSED:
            return None
        if self.phase is Phase.AWAITING_REGISTER:
            deadline = self.started + self.timeouts.registration
        else:
            deadline = self.last_seen + self.timeouts.peer
        partial = self.reassembler.next_deadline()
        return deadline if partial is None else min(deadline, partial)

    def handle_timer(self, now: float) -> list[Output]:
        """Expire partial frames; close on registration or peer timeout."""
        if self.phase is Phase.CLOSED:
            return []
        self.reassembler.expire(now)
        if self.phase is Phase.AWAITING_REGISTER:
            if now >= self.started + self.timeouts.registration:
                return self._close(CloseReason.REGISTRATION_TIMEOUT)
        elif now >= self.last_seen + self.timeouts.peer:
            return self._close(CloseReason.PEER_TIMEOUT)
        return []
