"""The relay's own bounded outgoing datagram queue (sans-IO)."""

from __future__ import annotations

from relay.quic.datagram_queue import DatagramQueue


def test_oversized_is_refused_and_counted() -> None:
    q = DatagramQueue()
    assert q.push(0, bytes(1400), 0.0, max_payload=1300) is False
    assert q.drops["oversized"] == 1
    assert len(q) == 0


def test_full_queue_drops_the_oldest() -> None:
    q = DatagramQueue(max_queued=3)
    for i in range(5):
        q.push(0, bytes([i]), 0.0, max_payload=100)
    assert q.drops["queue_full"] == 2
    assert [q.pop(0.0) for _ in range(4)] == [(0, b"\x02"), (0, b"\x03"), (0, b"\x04"), None]
    assert q.peak == 3


def test_stale_datagrams_are_dropped_not_sent_late() -> None:
    q = DatagramQueue(max_age=0.25)
    q.push(0, b"old", 0.0, max_payload=100)
    q.push(4, b"new", 0.2, max_payload=100)
    assert q.pop(0.3) == (4, b"new")
    assert q.drops["stale"] == 1


def test_discard_session() -> None:
    q = DatagramQueue()
    q.push(0, b"a", 0.0, max_payload=100)
    q.push(4, b"b", 0.0, max_payload=100)
    q.discard_session(0)
    assert q.pop(0.0) == (4, b"b")
    assert q.pop(0.0) is None
