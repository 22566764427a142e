"""What the guest has SACKed of the relay's data, and what recovery has resent, sans-IO.

Offsets are the sender's unbounded offsets (see :mod:`relay.nat.tcp`). During recovery the
sender keeps ``pipe`` (RFC 6675: bytes still in the network) under its window: the unSACKed
tail beyond the highest block is in flight, holes below it are lost until resent, and a
resent hole is in flight again. So one round trip repairs as many holes as the window
holds, instead of one per duplicate ACK.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_BLOCKS = 64
"""Blocks kept (merged); a guest's four per ACK rarely leave more than a handful."""


@dataclass(slots=True)
class Scoreboard:
    blocks: list[tuple[int, int]] = field(default_factory=list)
    """Merged, sorted ``(start, end)`` ranges above ``snd_una`` the guest has SACKed."""
    resent_up_to: int = 0
    """In recovery: holes below this offset have been resent."""
    resent_at: dict[int, float] = field(default_factory=dict)
    """When each hole (by its start) was last resent in this recovery."""

    def add(self, ranges: list[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for start, end in sorted([*self.blocks, *ranges]):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        self.blocks = merged[:MAX_BLOCKS]

    def acked(self, una: int) -> None:
        """The cumulative ACK reached ``una``: forget what lies below it."""
        self.blocks = [(start, end) for start, end in self.blocks if end > una]
        if self.resent_at:
            self.resent_at = {at: when for at, when in self.resent_at.items() if at >= una}

    def clear(self) -> None:
        """After a timeout (RFC 2018: the guest may have dropped what it SACKed)."""
        self.blocks = []
        self.end_recovery()

    def end_recovery(self) -> None:
        self.resent_up_to = 0
        self.resent_at = {}

    def sacked_bytes(self) -> int:
        return sum(end - start for start, end in self.blocks)

    def holes(self, una: int) -> list[tuple[int, int]]:
        """The unSACKed ranges between ``una`` and the highest SACKed byte."""
        found, at = [], una
        for start, end in self.blocks:
            if at < start:
                found.append((at, start))
            at = max(at, end)
        return found

    def pipe(self, una: int, nxt: int) -> int:
        """RFC 6675's estimate of the bytes in the network."""
        top = max(una, self.blocks[-1][1]) if self.blocks else una
        resent = sum(
            min(end, self.resent_up_to) - start
            for start, end in self.holes(una)
            if start < self.resent_up_to
        )
        return max(0, nxt - top) + resent

    def next_hole(self, una: int, mss: int) -> tuple[int, int] | None:
        """The next stretch of a hole not yet resent: ``(offset, size)``, at most ``mss``."""
        for start, end in self.holes(una):
            offset = max(start, self.resent_up_to)
            if offset < end:
                return offset, min(mss, end - offset)
        return None

    def resent(self, offset: int, size: int, now: float) -> None:
        self.resent_up_to = max(self.resent_up_to, offset + size)
        self.resent_at[offset] = now
