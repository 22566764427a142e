"""The trio side of a BAVY session: glue between a WebTransport session, its sans-IO core and
its LAN port.

Inbound datagrams arrive synchronously from the connection (no task hop); frames leave for
the switch over its bounded channel. Frames for the session come back over the port's own
bounded channel and are drained in batches by :func:`carry_frames`, the one task a session
owns (the raw-framing session in :mod:`relay.session.raw` shares it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from relay.lan.network import Network, Port, Registration
from relay.logs import RateLimitedLog
from relay.quic.connection import QuicPeer
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
        self, peer: QuicPeer, stream_id: int, network: Network, timeouts: Timeouts, now: float
    ) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self.network = network
        self.core = SessionProtocol(now, timeouts)
        self.port = network.attach(peer.remote_host, self._last_seen, self._superseded, now)
        self.label = f"{peer.label}#{stream_id}"
        self._cancel = trio.CancelScope()
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
        self.network.detach(self.port)
        self._cancel.cancel()
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

    # -- the session's task ---------------------------------------------------------------

    async def run(self) -> None:
        with self._cancel:
            await carry_frames(self.port, self.peer, self.stream_id, self.core.encode_frame)


async def carry_frames(
    port: Port, peer: QuicPeer, stream_id: int, encode: Callable[[bytes], list[bytes]]
) -> None:
    """Carry frames from the switch to the client, a batch per wake-up, one flush each."""
    inbox = port.from_switch
    while True:
        try:
            frame = await inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return
        while True:
            for payload in encode(frame):
                peer.queue_datagram(stream_id, payload)
            try:
                frame = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        peer.flush()
