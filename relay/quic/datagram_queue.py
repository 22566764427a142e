"""A bounded, drop-oldest queue of outgoing WebTransport datagrams (sans-IO).

aioquic's own datagram queue is an unbounded FIFO that never checks sizes: one datagram too
large for a packet blocks every later one for ever, and under congestion it grows without
limit. So the relay keeps datagrams here and hands aioquic only a few at a time, each checked
against what the connection can send right now. Like Chrome's QUIC datagram queue, entries
that waited too long are dropped rather than sent late.
"""

from __future__ import annotations

from collections import Counter, deque

MAX_QUEUED = 256
"""Datagrams waiting per connection."""
MAX_AGE = 0.25
"""Seconds a datagram may wait before it is useless (a frame that late is better lost)."""


class DatagramQueue:
    """Outgoing datagrams of one QUIC connection, by WebTransport session id."""

    __slots__ = ("_items", "drops", "max_age", "max_queued", "peak")

    def __init__(self, max_queued: int = MAX_QUEUED, max_age: float = MAX_AGE) -> None:
        self._items: deque[tuple[int, bytes, float]] = deque()
        self.max_queued = max_queued
        self.max_age = max_age
        self.drops: Counter[str] = Counter()
        self.peak = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, session_id: int, payload: bytes, now: float, max_payload: int) -> bool:
        """Queue ``payload`` unless it can never be sent; drop the oldest when full."""
        if len(payload) > max_payload:
            self.drops["oversized"] += 1
            return False
        items = self._items
        if len(items) >= self.max_queued:
            items.popleft()
            self.drops["queue_full"] += 1
        items.append((session_id, payload, now))
        if len(items) > self.peak:
            self.peak = len(items)
        return True

    def pop(self, now: float) -> tuple[int, bytes] | None:
        """The oldest datagram still worth sending, or None."""
        items = self._items
        limit = now - self.max_age
        while items:
            session_id, payload, queued_at = items.popleft()
            if queued_at >= limit:
                return session_id, payload
            self.drops["stale"] += 1
        return None

    def pop_session(self, session_id: int, now: float) -> bytes | None:
        """The oldest datagram still worth sending for one session (used when it closes)."""
        limit = now - self.max_age
        for index, (sid, payload, queued_at) in enumerate(self._items):
            if sid == session_id and queued_at >= limit:
                del self._items[index]
                return payload
        return None

    def discard_session(self, session_id: int) -> None:
        """Forget everything queued for a closed session."""
        self._items = deque(item for item in self._items if item[0] != session_id)
