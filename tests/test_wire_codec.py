"""The BAVY datagram codec: exact bytes, round trips, and one failure mode for junk."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import BadDatagram
from relay.wire import (
    Assigned,
    Chunk,
    ChunkIdCounter,
    Control,
    DataFrame,
    Disconnect,
    Error,
    Heartbeat,
    HeartbeatAck,
    PeerList,
    Register,
    decode_datagram_untrusted,
    encode_control,
    encode_frame,
)
from relay.wire.reassembly import Reassembler

ASSIGNED = Assigned(
    ip=IPv4Address("10.0.2.254"),
    gateway=IPv4Address("10.0.2.2"),
    netmask=IPv4Address("255.255.255.0"),
    dns=IPv4Address("8.8.8.8"),
)


def test_control_bytes_match_the_bavy_relay_exactly() -> None:
    # Byte strings from bavy-wire-protocol.md §12, sizes included.
    register = b'\x00{"type":"Register","mac":[82,84,171,205,239,1]}'
    assigned = (
        b'\x00{"type":"Assigned","ip":[10,0,2,254],"gateway":[10,0,2,2],'
        b'"netmask":[255,255,255,0],"dns":[8,8,8,8]}'
    )
    assert encode_control(Register(bytes([82, 84, 171, 205, 239, 1]))) == register
    assert encode_control(ASSIGNED) == assigned
    assert encode_control(Heartbeat()) == b'\x00{"type":"Heartbeat"}'
    assert encode_control(HeartbeatAck()) == b'\x00{"type":"HeartbeatAck"}'
    assert encode_control(Error("IP pool exhausted")) == (
        b'\x00{"type":"Error","message":"IP pool exhausted"}'
    )
    sizes = [len(register), len(assigned), 21, 24, 47]
    assert sizes == [48, 101, 21, 24, 47]
    assert len(encode_control(Error("IP pool exhausted"))) == 47


def test_assigned_is_found_the_way_the_clients_search_for_it() -> None:
    # The clients search substrings instead of parsing JSON (bavy-wire-protocol.md §4.2).
    text = encode_control(ASSIGNED)[1:].decode()
    assert '"type":"Assigned"' in text
    start = text.index('"ip":[') + len('"ip":[')
    octets = [int(p.strip()) for p in text[start : text.index("]", start)].split(",")]
    assert octets == [10, 0, 2, 254]


def test_client_messages_decode_leniently_like_serde() -> None:
    decoded = decode_datagram_untrusted(
        b'\x00{ "mac" : [82,84,0,0,0,1], "type": "Register", "x": 1}'
    )
    assert decoded == Control(Register(bytes([82, 84, 0, 0, 0, 1])))
    assert decode_datagram_untrusted(b'\x00{"type":"Heartbeat"}') == Control(Heartbeat())
    assert decode_datagram_untrusted(b'\x00{"type":"Disconnect"}') == Control(Disconnect())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"\x07abc", "unknown_type"),
        (b"\x01" + bytes(13), "runt_frame"),
        (b"\x01" + bytes(1519), "giant_frame"),
        (b"\x02\x00\x01\x00", "bad_chunk"),
        (b"\x02\x00\x01\x00\x00x", "bad_chunk"),
        (b"\x02\x00\x01\x02\x02x", "bad_chunk"),
        (b"\x00not json", "bad_control"),
        (b"\x00[1,2]", "bad_control"),
        (b'\x00{"type":"Register","mac":[1,2,3]}', "bad_control"),
        (b'\x00{"type":"Register","mac":[1,2,3,4,5,256]}', "bad_control"),
        (b'\x00{"type":"Register","mac":[true,2,3,4,5,6]}', "bad_control"),
        (b'\x00{"type":"Nope"}', "unknown_control"),
        (b"\x00\xff\xfe", "bad_control"),
        (b"\x00" + b"[" * 5000, "bad_control"),
    ],
)
def test_junk_is_a_bad_datagram_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadDatagram) as info:
        decode_datagram_untrusted(payload)
    assert info.value.reason == reason


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_bad_datagram(data: bytes) -> None:
    try:
        decode_datagram_untrusted(data)
    except BadDatagram:
        pass


@given(st.sampled_from([0, 1, 2]), st.binary(max_size=1600))
def test_arbitrary_bodies_after_a_valid_type_raise_only_bad_datagram(
    kind: int, body: bytes
) -> None:
    try:
        decode_datagram_untrusted(bytes([kind]) + body)
    except BadDatagram:
        pass


def test_chunking_boundaries() -> None:
    ids = ChunkIdCounter(7)
    assert encode_frame(bytes(950), ids) == [b"\x01" + bytes(950)]
    chunks = encode_frame(bytes(range(256)) * 5 + bytes(220), ids)  # 1500 bytes
    assert [len(c) for c in chunks] == [905, 605]
    assert chunks[0][:5] == bytes([2, 0, 7, 0, 2])
    assert chunks[1][:5] == bytes([2, 0, 7, 1, 2])
    assert [len(c) for c in encode_frame(bytes(951), ids)] == [905, 56]
    assert [len(c) for c in encode_frame(bytes(2090), ids)] == [905, 905, 295]
    # Only chunked frames advance the id.
    assert encode_frame(bytes(951), ids)[0][1:3] == (10).to_bytes(2, "big")


def test_chunk_id_wraps_at_16_bits() -> None:
    ids = ChunkIdCounter(0xFFFF)
    assert ids.take() == 0xFFFF
    assert ids.take() == 0


frames = st.binary(min_size=14, max_size=1518)
control_messages = st.one_of(
    st.builds(Register, st.binary(min_size=6, max_size=6)),
    st.builds(
        Assigned,
        *(st.builds(IPv4Address, st.integers(0, 2**32 - 1)) for _ in range(4)),
    ),
    st.just(Heartbeat()),
    st.just(HeartbeatAck()),
    st.just(Disconnect()),
    st.builds(Error, st.text(max_size=200)),
    st.builds(
        PeerList,
        st.lists(
            st.tuples(
                st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
                st.binary(min_size=6, max_size=6),
            ),
            max_size=5,
        ).map(tuple),
    ),
)


@given(control_messages)
def test_control_round_trip(message: object) -> None:
    encoded = encode_control(message)  # type: ignore[arg-type]
    assert decode_datagram_untrusted(encoded) == Control(message)  # type: ignore[arg-type]


@given(frames, st.integers(0, 0xFFFF))
def test_frame_round_trip_through_chunks(frame: bytes, start: int) -> None:
    reassembler = Reassembler()
    out = None
    for datagram in encode_frame(frame, ChunkIdCounter(start)):
        decoded = decode_datagram_untrusted(datagram)
        if isinstance(decoded, DataFrame):
            out = decoded.frame
        else:
            assert isinstance(decoded, Chunk)
            out = reassembler.add(decoded, now=0.0)
    assert out == frame
