"""A raw-framing session (paths ending in ``/raw``): each datagram is one bare Ethernet frame.

This is what v86-style clients speak: no type byte, no Register, no heartbeat. The port owns
the first source MAC it sends from, and gets that MAC's lease (which DHCP then hands out).
Liveness is the QUIC connection's: its keep-alive PINGs and idle timeout end a dead client,
since raw clients send nothing when their guest is quiet. Frames larger than one datagram
can carry are refused by the datagram pump and counted; advertise a small enough MTU (DHCP
does) instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from relay.lan.network import Network
from relay.logs import RateLimitedLog
from relay.packets.headers import MAX_FRAME, MIN_FRAME
from relay.quic.connection import QuicPeer, WebTransportSession

log = logging.getLogger("relay.session")


class RawSession:
    """One raw-framing client on a LAN."""

    def __init__(
        self,
        peer: QuicPeer,
        stream_id: int,
        network: Network,
        now: float,
        observer: Callable[[WebTransportSession], None] | None = None,
    ) -> None:
        self._observer = observer
        self.peer = peer
        self.stream_id = stream_id
        self.network = network
        self.label = f"{peer.label}#{stream_id}"
        self.last_seen = now
        self.drops: Counter[str] = Counter()
        self.port = network.attach(
            peer.remote_host,
            self._last_seen,
            self._refused,
            self.deliver,
            peer.flush,
            now,
            raw=True,
        )
        self._drop_log = RateLimitedLog(log)

    def _last_seen(self) -> float:
        return self.last_seen

    def on_datagram(self, data: bytes, now: float) -> None:
        self.last_seen = now
        if not MIN_FRAME <= len(data) <= MAX_FRAME:
            self.drops["frame_size"] += 1
            self._drop_log.event(
                "frame_size", "%s: dropped a %d-byte raw frame", self.label, len(data)
            )
            return
        self.port.send_frame(data)

    def on_timer(self, now: float) -> None:
        pass

    def deadline(self) -> float | None:
        return None

    def on_closed(self, reason: str) -> None:
        if self._observer is not None:
            self._observer(self)
        self.network.detach(self.port)
        log.info("%s: raw session closed (%s)", self.label, reason)

    def _refused(self) -> None:
        """The LAN refused this port's MAC, or another session took it over."""
        self.peer.close_session(self.stream_id, reason="MAC refused or taken over")
        self.peer.flush()

    def deliver(self, frame: bytes) -> None:
        """A frame from the LAN, as one datagram (the switch flushes)."""
        self.peer.queue_datagram(self.stream_id, frame)

    async def run(self) -> None:
        """Nothing to run: the connection and the switch drive the session."""
