"""Per-session reassembly of chunked frames, with hard caps.

Reassembly is where slirp had three CVEs, so every resource is bounded: partial frames in
flight, bytes held, age, and the size of the rebuilt frame. A chunk that contradicts what
was already received (other total, other bytes at the same index, an odd chunk size) throws
the whole partial frame away, as RFC 5722 does for overlapping IP fragments. Every drop is
counted by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from relay.wire.codec import MAX_FRAME_SIZE, MIN_FRAME_SIZE, Chunk


@dataclass(frozen=True, slots=True)
class ReassemblyLimits:
    """Caps on what one session's reassembler may hold."""

    max_partial: int = 8
    """Partial frames in flight; the oldest is evicted for a new one."""
    max_bytes: int = 8 * 1024
    """Payload bytes held across all partial frames."""
    timeout: float = 5.0
    """Seconds after its first chunk that a partial frame is given up."""
    max_frame: int = MAX_FRAME_SIZE
    """Largest frame that may be rebuilt."""


class _Partial:
    __slots__ = ("held", "received", "slots", "started", "stride")

    def __init__(self, total: int, started: float) -> None:
        self.slots: list[bytes | None] = [None] * total
        self.received = 0
        self.held = 0
        self.started = started
        self.stride = 0  # size every chunk but the last must have; 0 = not known yet


class Reassembler:
    """Rebuilds frames from 0x02 chunks; sans-IO, time passed in as ``now``.

    Feed every chunk to :meth:`add`; call :meth:`expire` when :meth:`next_deadline` passes.
    """

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits or ReassemblyLimits()
        self._partials: dict[int, _Partial] = {}  # insertion order = age order
        self._held = 0
        self.drops: Counter[str] = Counter()
        """Chunks or partial frames thrown away, by reason."""
        self.dropped = 0
        """Total of ``drops``, and the last reason, so a caller can notice a new drop cheaply."""
        self.last_drop = ""
        self.completed = 0

    @property
    def bytes_held(self) -> int:
        return self._held

    @property
    def partial_count(self) -> int:
        return len(self._partials)

    def next_deadline(self) -> float | None:
        """When the oldest partial frame expires, or None when nothing is held."""
        for partial in self._partials.values():
            return partial.started + self.limits.timeout
        return None

    def expire(self, now: float) -> None:
        """Drop partial frames older than the timeout."""
        timeout = self.limits.timeout
        while self._partials:
            chunk_id, partial = next(iter(self._partials.items()))
            if partial.started + timeout > now:  # the same sum as next_deadline()
                break
            self._discard(chunk_id, "chunk_timeout")

    def _discard(self, chunk_id: int, reason: str) -> None:
        partial = self._partials.pop(chunk_id)
        self._held -= partial.held
        self._count(reason)

    def add(self, chunk: Chunk, now: float) -> bytes | None:
        """Take one chunk; return the frame when this chunk completes it."""
        self.expire(now)
        limits = self.limits
        if len(chunk.payload) > limits.max_frame:
            self._count("chunk_too_large")
            return None
        partial = self._partials.get(chunk.chunk_id)
        if partial is not None and len(partial.slots) != chunk.total:
            # Same id, other shape: a reused id or a forged chunk. Trust neither.
            self._discard(chunk.chunk_id, "chunk_inconsistent")
            partial = None
        if partial is None:
            if chunk.total == 1:
                return self._finish_single(chunk)
            while len(self._partials) >= limits.max_partial:
                self._discard(next(iter(self._partials)), "chunk_evicted")
            partial = _Partial(chunk.total, now)
            self._partials[chunk.chunk_id] = partial
        slot = partial.slots[chunk.index]
        if slot is not None:
            if slot != chunk.payload:
                self._discard(chunk.chunk_id, "chunk_inconsistent")
            else:
                self._count("chunk_duplicate")
            return None
        is_last = chunk.index == chunk.total - 1
        size = len(chunk.payload)
        if not is_last:
            if partial.stride == 0:
                partial.stride = size
            elif size != partial.stride:
                self._discard(chunk.chunk_id, "chunk_inconsistent")
                return None
        if partial.held + size > limits.max_frame:
            self._discard(chunk.chunk_id, "chunk_too_large")
            return None
        while self._held + size > limits.max_bytes and self._partials:
            oldest = next(iter(self._partials))
            self._discard(oldest, "chunk_evicted")
            if oldest == chunk.chunk_id:
                return None
        partial.slots[chunk.index] = chunk.payload
        partial.held += size
        partial.received += 1
        self._held += size
        if partial.received < len(partial.slots):
            return None
        del self._partials[chunk.chunk_id]
        self._held -= partial.held
        frame = b"".join(s for s in partial.slots if s is not None)
        last = partial.slots[-1]
        if last is not None and partial.stride and len(last) > partial.stride:
            self._count("chunk_inconsistent")
            return None
        return self._accept(frame)

    def _count(self, reason: str) -> None:
        self.drops[reason] += 1
        self.dropped += 1
        self.last_drop = reason

    def _finish_single(self, chunk: Chunk) -> bytes | None:
        return self._accept(chunk.payload)

    def _accept(self, frame: bytes) -> bytes | None:
        if len(frame) < MIN_FRAME_SIZE:
            self._count("runt_frame")
            return None
        self.completed += 1
        return frame
