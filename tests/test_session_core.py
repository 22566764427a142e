"""The sans-IO session state machine, driven with explicit time."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from relay.session.core import (
    CloseReason,
    CloseRequested,
    Dropped,
    FrameReceived,
    Phase,
    RegisterRequested,
    SendDatagram,
    SessionProtocol,
    Timeouts,
)
from relay.wire import Assigned, encode_control, encode_frame
from relay.wire.codec import ChunkIdCounter
from relay.wire.messages import Disconnect, Heartbeat, Register

MAC = bytes([0x52, 0x54, 0xAB, 0xCD, 0xEF, 0x01])
ASSIGNED = Assigned(
    IPv4Address("10.0.2.254"),
    IPv4Address("10.0.2.2"),
    IPv4Address("255.255.255.0"),
    IPv4Address("8.8.8.8"),
)
FRAME = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(28)


def registered(now: float = 0.0, timeouts: Timeouts | None = None) -> SessionProtocol:
    s = SessionProtocol(now, timeouts)
    assert s.receive_datagram(encode_control(Register(MAC)), now) == [RegisterRequested(MAC)]
    assert s.accept_registration(ASSIGNED) == [SendDatagram(encode_control(ASSIGNED))]
    return s


def test_register_then_frames_flow() -> None:
    s = registered()
    assert s.phase is Phase.REGISTERED
    assert s.receive_datagram(b"\x01" + FRAME, 1.0) == [FrameReceived(FRAME)]
    assert (s.frames_in, s.bytes_in) == (1, len(FRAME))


def test_frames_before_registration_are_dropped_and_counted() -> None:
    s = SessionProtocol(0.0)
    assert s.receive_datagram(b"\x01" + FRAME, 1.0) == [
        Dropped("unregistered_frame", "frame before Register")
    ]
    assert s.drops["unregistered_frame"] == 1


def test_repeated_register_resends_the_same_assigned() -> None:
    s = registered()
    again = s.receive_datagram(encode_control(Register(MAC)), 2.0)
    assert again == [SendDatagram(encode_control(ASSIGNED))]
    other = s.receive_datagram(encode_control(Register(b"\x52\x54\0\0\0\x09")), 2.0)
    assert other == [Dropped("register_other_mac", "Register with another MAC")]
    assert s.drops["register_other_mac"] == 1


def test_a_second_register_while_pending_is_not_asked_twice() -> None:
    s = SessionProtocol(0.0)
    assert s.receive_datagram(encode_control(Register(MAC)), 0.0) == [RegisterRequested(MAC)]
    assert s.receive_datagram(encode_control(Register(MAC)), 0.1) == []


def test_group_mac_cannot_register() -> None:
    s = SessionProtocol(0.0)
    out = s.receive_datagram(encode_control(Register(b"\x01\0\x5e\0\0\1")), 0.0)
    assert [o.reason for o in out if isinstance(o, Dropped)] == ["register_group_mac"]
    assert s.drops["register_group_mac"] == 1


def test_heartbeat_is_acked() -> None:
    s = registered()
    assert s.receive_datagram(encode_control(Heartbeat()), 1.0) == [
        SendDatagram(b'\x00{"type":"HeartbeatAck"}')
    ]


def test_registration_timeout_closes() -> None:
    s = SessionProtocol(100.0, Timeouts(registration=30.0, peer=150.0))
    assert s.next_deadline() == 130.0
    assert s.handle_timer(129.9) == []
    assert s.handle_timer(130.0) == [CloseRequested(CloseReason.REGISTRATION_TIMEOUT)]
    assert s.phase is Phase.CLOSED and s.next_deadline() is None


def test_any_datagram_is_liveness_and_silence_closes() -> None:
    s = registered(0.0, Timeouts(registration=30.0, peer=150.0))
    out = s.receive_datagram(b"\x09junk", 100.0)  # undecodable, still a sign of life
    assert out == [Dropped("unknown_type", "unknown message type 0x09")]
    assert s.drops["unknown_type"] == 1
    assert s.next_deadline() == 250.0
    assert s.handle_timer(249.0) == []
    assert s.handle_timer(250.0) == [CloseRequested(CloseReason.PEER_TIMEOUT)]
    assert s.receive_datagram(b"\x01" + FRAME, 251.0) == []  # closed: nothing more happens


def test_disconnect_closes() -> None:
    s = registered()
    assert s.receive_datagram(encode_control(Disconnect()), 1.0) == [
        CloseRequested(CloseReason.CLIENT_DISCONNECT)
    ]


def test_refusal_sends_error_then_closes() -> None:
    s = SessionProtocol(0.0)
    s.receive_datagram(encode_control(Register(MAC)), 0.0)
    out = s.refuse_registration("IP pool exhausted", CloseReason.POOL_EXHAUSTED)
    assert out == [
        SendDatagram(b'\x00{"type":"Error","message":"IP pool exhausted"}'),
        CloseRequested(CloseReason.POOL_EXHAUSTED),
    ]


def test_chunked_frames_are_reassembled_and_deadline_covers_partials() -> None:
    s = registered(0.0)
    frame = FRAME + bytes(1400)
    first, second = encode_frame(frame, ChunkIdCounter(3))
    assert s.receive_datagram(first, 1.0) == []
    assert s.next_deadline() == 6.0
    assert s.receive_datagram(second, 1.5) == [FrameReceived(frame)]


def test_outbound_frames_are_chunked_with_advancing_ids() -> None:
    s = registered()
    big = s.encode_frame(bytes(1500))
    assert [len(d) for d in big] == [905, 605]
    again = s.encode_frame(bytes(1500))
    assert big[0][1:3] != again[0][1:3]
    assert s.encode_frame(bytes(100)) == [b"\x01" + bytes(100)]


@given(st.lists(st.tuples(st.binary(max_size=1600), st.floats(0, 50)), max_size=60))
def test_arbitrary_datagrams_never_crash_a_session(stream: list[tuple[bytes, float]]) -> None:
    s = registered()
    now = 0.0
    for data, step in stream:
        now += step
        for out in s.receive_datagram(data, now) + s.handle_timer(now):
            assert isinstance(
                out, SendDatagram | FrameReceived | RegisterRequested | CloseRequested | Dropped
            )
            if isinstance(out, Dropped):
                assert s.drops[out.reason] + s.reassembler.drops[out.reason] >= 1
    assert s.reassembler.partial_count <= s.reassembler.limits.max_partial


def test_reassembly_drops_are_reported_but_duplicates_are_quiet() -> None:
    s = registered(0.0)
    first, _second = encode_frame(FRAME + bytes(1400), ChunkIdCounter(3))
    s.receive_datagram(first, 1.0)
    assert s.receive_datagram(first, 1.1) == []  # a duplicate: counted, not worth a log line
    forged = first[:5] + b"\x01" * (len(first) - 5)
    assert s.receive_datagram(forged, 1.2) == [Dropped("chunk_inconsistent", "chunk id 3")]
