"""The trio side of a BAVY session: glue between a WebTransport session, its sans-IO core and
its LAN port.

Inbound datagrams arrive synchronously from the connection (no task hop); frames leave for
the switch over its bounded channel. Frames for the session come back from the switch task
through :meth:`BavySession.deliver`, straight into the connection's bounded datagram queue;
the switch flushes once per batch. A session needs no task of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from relay.lan.network import Network, Registration
from relay.logs import RateLimitedLog
from relay.quic.connection import QuicPeer, WebTransportSession
from relay.session.core import (
    CloseReason,
    Dropped,
    FrameReceived,
    Output,
    RegisterRequested,
    SendDatagram,
    SessionProtocol,
    Timeouts,
)
from relay.wire.messages import format_mac

log = logging.getLogger("relay.session")


class BavySession:
    """One registered (or registering) VM."""

    def __init__(
        self,
        peer: QuicPeer,
        stream_id: int,
        network: Network,
        timeouts: Timeouts,
        now: float,
        observer: Callable[[WebTransportSession], None] | None = None,
    ) -> None:
        self._observer = observer
        """Told of the session as it closes, before its port goes (for cumulative counters)."""
        self.peer = peer
        self.stream_id = stream_id
        self.network = network
        self.core = SessionProtocol(now, timeouts)
        self.port = network.attach(
            peer.remote_host, self._last_seen, self._superseded, self.deliver, peer.flush, now
        )
        self.label = f"{peer.label}#{stream_id}"
        self._drop_log = RateLimitedLog(log)

    def _last_seen(self) -> float:
        return self.core.last_seen

    # -- called by the connection ---------------------------------------------------------

    def on_datagram(self, data: bytes, now: float) -> None:
        outputs = self.core.receive_datagram(data, now)
        if outputs:
            self._apply(outputs, now)
        elif self.core.reassembler.partial_count:
            self._deadline_changed()

    def _deadline_changed(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is not None:
            self.peer.deadline_moved_earlier(deadline)

    def on_timer(self, now: float) -> None:
        self._apply(self.core.handle_timer(now), now)

    def deadline(self) -> float | None:
        return self.core.next_deadline()

    def on_closed(self, reason: str) -> None:
        """The WebTransport session is gone, whoever ended it."""
        shutdown = reason == CloseReason.SHUTDOWN
        self.core.close(CloseReason.SHUTDOWN if shutdown else CloseReason.TRANSPORT_CLOSED)
        if self._observer is not None:
            self._observer(self)  # the switch port's counters are still there
        self.network.detach(self.port)
        mac = self.core.mac
        log.info(
            "%s: session closed (%s)%s",
            self.label,
            self.core.close_reason,
            f" {format_mac(mac)}" if mac else "",
        )

    # -- outputs of the core --------------------------------------------------------------

    def _apply(self, outputs: list[Output], now: float) -> None:
        for output in outputs:
            if isinstance(output, FrameReceived):
                self.port.send_frame(output.frame)
            elif isinstance(output, SendDatagram):
                self.peer.queue_datagram(self.stream_id, output.payload)
            elif isinstance(output, RegisterRequested):
                self._register(output.mac, now)
            elif isinstance(output, Dropped):
                self._drop_log.event(
                    output.reason, "%s: dropped (%s): %s", self.label, output.reason, output.detail
                )
            else:
                log.info("%s: closing: %s", self.label, output.reason)
                self.peer.close_session(self.stream_id, reason=str(output.reason))

    def _register(self, mac: bytes, now: float) -> None:
        result = self.network.register(self.port, mac, now)
        if isinstance(result, Registration):
            log.info(
                "%s: registered %s as %s on %s",
                self.label,
                format_mac(mac),
                result.assigned.ip,
                self.network.name,
            )
            self._apply(self.core.accept_registration(result.assigned), now)
            self._deadline_changed()
        else:
            reason = CloseReason.POOL_EXHAUSTED if result.pool_exhausted else CloseReason.REFUSED
            self._apply(self.core.refuse_registration(result.message, reason), now)
        self.peer.flush()

    def _superseded(self) -> None:
        now = trio.current_time()
        self._apply(self.core.close(CloseReason.SUPERSEDED), now)
        self.peer.flush()

    # -- frames from the switch ------------------------------------------------------------

    def deliver(self, frame: bytes) -> None:
        """Encode a frame from the LAN into the connection's queue (the switch flushes)."""
        peer, stream_id = self.peer, self.stream_id
        for payload in self.core.encode_frame(frame):
            peer.queue_datagram(stream_id, payload)

    async def run(self) -> None:
        """Nothing to run: the connection and the switch drive the session."""
