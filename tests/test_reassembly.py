"""Chunk reassembly: never a wrong frame, and bounded under any chunk stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.wire import Chunk, ChunkIdCounter, decode_datagram_untrusted, encode_frame
from relay.wire.reassembly import Reassembler, ReassemblyLimits


def chunks_of(frame: bytes, chunk_id: int) -> list[Chunk]:
    out = []
    for datagram in encode_frame(frame, ChunkIdCounter(chunk_id)):
        decoded = decode_datagram_untrusted(datagram)
        assert isinstance(decoded, Chunk)
        out.append(decoded)
    return out


def test_out_of_order_and_duplicates() -> None:
    frame = bytes(i % 251 for i in range(2090))
    parts = chunks_of(frame, 5)
    r = Reassembler(ReassemblyLimits(max_frame=4000))
    assert r.add(parts[2], 0.0) is None
    assert r.add(parts[2], 0.0) is None
    assert r.add(parts[0], 0.0) is None
    assert r.add(parts[1], 0.0) == frame
    assert r.drops["chunk_duplicate"] == 1
    assert r.bytes_held == 0 and r.partial_count == 0


def test_partial_frames_expire() -> None:
    r = Reassembler(ReassemblyLimits(timeout=5.0))
    first, second = chunks_of(bytes(1400), 1)
    r.add(first, 0.0)
    assert r.next_deadline() == 5.0
    r.expire(4.9)
    assert r.partial_count == 1
    r.expire(5.0)
    assert r.partial_count == 0 and r.bytes_held == 0
    assert r.drops["chunk_timeout"] == 1
    assert r.add(second, 5.1) is None  # its first half is gone: no frame


def test_conflicting_bytes_at_the_same_index_drop_the_frame() -> None:
    a, b = chunks_of(bytes(1400), 9)
    r = Reassembler()
    r.add(a, 0.0)
    forged = Chunk(a.chunk_id, a.index, a.total, b"\x01" * len(a.payload))
    assert r.add(forged, 0.0) is None
    assert r.drops["chunk_inconsistent"] == 1
    assert r.add(b, 0.0) is None  # the partial frame was thrown away


def test_other_total_for_the_same_id_is_inconsistent() -> None:
    r = Reassembler()
    r.add(Chunk(3, 0, 2, bytes(900)), 0.0)
    r.add(Chunk(3, 0, 3, bytes(900)), 0.0)
    assert r.drops["chunk_inconsistent"] == 1
    assert r.partial_count == 1


def test_oversized_reassembly_is_refused() -> None:
    r = Reassembler(ReassemblyLimits(max_frame=1518))
    r.add(Chunk(1, 0, 3, bytes(900)), 0.0)
    r.add(Chunk(1, 1, 3, bytes(900)), 0.0)
    assert r.drops["chunk_too_large"] == 1
    assert r.partial_count == 0 and r.bytes_held == 0


def test_partial_cap_evicts_the_oldest() -> None:
    r = Reassembler(ReassemblyLimits(max_partial=2))
    for chunk_id in range(3):
        r.add(Chunk(chunk_id, 0, 2, bytes(900)), float(chunk_id))
    assert r.partial_count == 2
    assert r.drops["chunk_evicted"] == 1
    assert r.add(Chunk(0, 1, 2, bytes(100)), 3.0) is None  # id 0 was evicted


@settings(max_examples=200)
@given(
    st.lists(st.binary(min_size=14, max_size=1518), min_size=1, max_size=6),
    st.randoms(use_true_random=False),
    st.floats(0.0, 0.6),
    st.floats(0.0, 0.4),
)
def test_reordered_duplicated_lost_chunks_never_make_a_wrong_frame(
    frames: list[bytes], rnd: object, loss: float, dup: float
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    stream: list[Chunk] = []
    complete: dict[int, bytes] = {}
    for chunk_id, frame in enumerate(frames):
        datagrams = encode_frame(frame, ChunkIdCounter(chunk_id))
        if len(datagrams) == 1:
            continue
        parts = chunks_of(frame, chunk_id)
        kept = [p for p in parts if rnd.random() >= loss]
        if len(kept) == len(parts):
            complete[chunk_id] = frame
        stream += kept + [p for p in kept if rnd.random() < dup]
    rnd.shuffle(stream)
    r = Reassembler()
    out: list[bytes] = []
    for chunk in stream:
        frame = r.add(chunk, 0.0)
        if frame is not None:
            out.append(frame)
    # Every frame that comes out is one that went in, exactly once, and all complete ones do.
    assert sorted(out) == sorted(complete.values())


chunks = st.builds(
    Chunk,
    chunk_id=st.integers(0, 20),
    index=st.integers(0, 7),
    total=st.integers(1, 8),
    payload=st.binary(min_size=1, max_size=1600),
).filter(lambda c: c.index < c.total)


@settings(max_examples=300)
@given(st.lists(st.tuples(chunks, st.floats(0, 3)), max_size=80))
def test_caps_hold_under_adversarial_chunk_streams(stream: list[tuple[Chunk, float]]) -> None:
    limits = ReassemblyLimits(max_partial=4, max_bytes=4000, timeout=5.0, max_frame=1518)
    r = Reassembler(limits)
    now = 0.0
    for chunk, step in stream:
        now += step
        frame = r.add(chunk, now)
        assert r.partial_count <= limits.max_partial
        assert 0 <= r.bytes_held <= limits.max_bytes
        if frame is not None:
            assert 14 <= len(frame) <= limits.max_frame
        deadline = r.next_deadline()
        assert deadline is None or deadline > now
