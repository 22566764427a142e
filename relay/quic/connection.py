"""One QUIC connection: aioquic's sans-IO ``QuicConnection`` + H3, its timer and its sessions.

Driving pattern (see docs/architecture.md): the endpoint's receive loop feeds packets in
inline — a memory-channel hop with a task switch per packet costs ~8 µs, a large share of
aioquic's own ~20 µs — and calls
:meth:`QuicPeer.process_events` and :meth:`QuicPeer.flush` once per batch. Every method here
is synchronous, so no two tasks ever interleave inside the connection; the one task this
object owns is its timer (QUIC loss/idle/pacing, keep-alive PINGs, session deadlines), plus
one outbound task per WebTransport session, started in the connection's own nursery.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections import Counter
from typing import Protocol

import trio
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    H3Event,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    ProtocolNegotiated,
    StopSendingReceived,
    StreamReset,
)

from relay.quic.datagram_queue import DatagramQueue
from relay.quic.h3 import MAX_SESSIONS_PER_CONNECTION, RelayH3Connection
from relay.quic.pump import max_datagram_payload, transmit

log = logging.getLogger("relay.quic")

KEEPALIVE_INTERVAL = 15.0
"""Seconds between PINGs, so NATs and browsers keep a quiet session (background tab) alive."""
HANDSHAKE_TIMEOUT = 10.0
"""A connection that has not completed its handshake by then is dropped (half-open cap)."""
CLOSE_GRACE = 1.0
"""After the last session ends, seconds to let its close capsule arrive before closing QUIC."""
CLOSE_WEBTRANSPORT_SESSION = 0x2843


class WebTransportSession(Protocol):
    """What a connection needs from an accepted WebTransport session."""

    def on_datagram(self, data: bytes, now: float) -> None: ...
    def on_timer(self, now: float) -> None: ...
    def deadline(self) -> float | None: ...
    def on_closed(self, reason: str) -> None: ...
    async def run(self) -> None: ...


class SessionFactory(Protocol):
    """Accepts or rejects a WebTransport CONNECT."""

    def __call__(
        self, peer: QuicPeer, stream_id: int, path: str, now: float
    ) -> WebTransportSession | int:
        """A session, or an HTTP status code to reject with."""
        ...


class EndpointHooks(Protocol):
    def add_cid(self, cid: bytes, peer: QuicPeer) -> None: ...
    def remove_cid(self, cid: bytes) -> None: ...
    def forget(self, peer: QuicPeer) -> None: ...
    def handshake_completed(self, peer: QuicPeer) -> None: ...


def send_udp(sock: socket.socket, data: bytes, addr: NetworkAddress, drops: Counter[str]) -> None:
    """Non-blocking sendto; a full socket buffer drops the packet (QUIC recovers)."""
    try:
        sock.sendto(data, addr)
    except BlockingIOError:
        drops["udp_send_would_block"] += 1
    except OSError as exc:
        drops["udp_send_error"] += 1
        log.debug("sendto %s failed: %s", addr, exc)


class QuicPeer:
    """A QUIC connection and the WebTransport sessions it carries."""

    def __init__(
        self,
        quic: QuicConnection,
        sock: socket.socket,
        addr: NetworkAddress,
        endpoint: EndpointHooks,
        sessions: SessionFactory,
        now: float,
    ) -> None:
        self.quic = quic
        self.sock = sock
        self.remote_host = str(addr[0]).removeprefix("::ffff:")
        self.endpoint = endpoint
        self.session_factory = sessions
        self.h3: RelayH3Connection | None = None
        self.sessions: dict[int, WebTransportSession] = {}
        self.cids: set[bytes] = set()
        self.created = now
        self.handshake_complete = False
        self.terminated = False
        self.queue = DatagramQueue()
        self.drops: Counter[str] = Counter()
        self.label = f"{self.remote_host}:{addr[1]}"
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._keepalive_at = now + KEEPALIVE_INTERVAL
        self._close_at = math.inf
        self._app_deadline = math.inf
        self._ping_uid = 0
        self._flush_due = False

    def _send(self, data: bytes, addr: NetworkAddress) -> None:
        send_udp(self.sock, data, addr, self.drops)

    # -- inbound path (called by the endpoint's receive loop) -----------------------------

    def receive(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        self.quic.receive_datagram(data, addr, now)

    def process_events(self) -> None:
        """Drain aioquic's events into H3 and the sessions."""
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if type(event) is not DatagramFrameReceived:
                self._flush_due = True  # handshake, H3 control, CIDs...: answer at once
            if isinstance(event, ConnectionIdIssued):
                self.cids.add(event.connection_id)
                self.endpoint.add_cid(event.connection_id, self)
            elif isinstance(event, ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                self.endpoint.remove_cid(event.connection_id)
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
                return
            elif isinstance(event, ProtocolNegotiated):
                if event.alpn_protocol == "h3" and self.h3 is None:
                    self.h3 = RelayH3Connection(quic, enable_webtransport=True)
            elif isinstance(event, HandshakeCompleted):
                self.handshake_complete = True
                self.endpoint.handshake_completed(self)
            elif isinstance(event, StreamReset | StopSendingReceived) and (
                event.stream_id in self.sessions
            ):
                self.close_session(event.stream_id, notify_peer=False, reason="stream reset")
            h3 = self.h3
            if h3 is not None:
                for h3_event in h3.handle_event(event):
                    self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, DatagramReceived):
            session = self.sessions.get(event.stream_id)
            if session is None:
                self.drops["datagram_unknown_session"] += 1
            else:
                session.on_datagram(event.data, trio.current_time())
        elif isinstance(event, HeadersReceived):
            if event.stream_id not in self.sessions:
                self._request(event)
        elif isinstance(event, DataReceived):
            # Capsules on the CONNECT stream; the only one that matters to us is the close,
            # which browsers follow with FIN.
            if event.stream_ended and event.stream_id in self.sessions:
                self.close_session(event.stream_id, reason="closed by client")
        elif isinstance(event, WebTransportStreamDataReceived):
            self.drops["webtransport_stream"] += 1

    def _request(self, event: HeadersReceived) -> None:
        assert self.h3 is not None
        headers = dict(event.headers)
        method = headers.get(b":method", b"")
        protocol = headers.get(b":protocol")
        path = headers.get(b":path", b"/").decode("utf-8", "replace").split("?", 1)[0]
        if method != b"CONNECT":
            self._respond(event.stream_id, 405, ((b"allow", b"CONNECT"),))
            return
        if protocol != b"webtransport":
            self._respond(event.stream_id, 400)
            return
        if len(self.sessions) >= MAX_SESSIONS_PER_CONNECTION:
            self._respond(event.stream_id, 429)
            return
        result = self.session_factory(self, event.stream_id, path, trio.current_time())
        if isinstance(result, int):
            self._respond(event.stream_id, result)
            return
        self.h3.send_headers(
            event.stream_id,
            [(b":status", b"200"), (b"sec-webtransport-http3-draft", b"draft02")],
        )
        self.sessions[event.stream_id] = result
        self._rearm_app_deadline()
        if self._nursery is not None:
            self._nursery.start_soon(result.run)

    def _respond(
        self, stream_id: int, status: int, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        assert self.h3 is not None
        self.drops[f"http_{status}"] += 1
        try:
            self.h3.send_headers(
                stream_id, [(b":status", str(status).encode()), *extra], end_stream=True
            )
        except Exception:  # a second HEADERS on an answered stream: nothing left to say
            self.drops["http_unanswerable"] += 1

    # -- outbound path --------------------------------------------------------------------

    def queue_datagram(self, session_id: int, payload: bytes) -> None:
        """Queue a datagram for a session; :meth:`flush` sends it."""
        self.queue.push(
            session_id, payload, trio.current_time(), max_datagram_payload(self.quic, session_id)
        )

    def flush_if_due(self) -> None:
        """After receiving: flush only if something must go out now, else re-arm the timer.

        Receiving datagrams alone needs no immediate send (aioquic delays its ACK by 1 ms and
        the timer sends it), and an empty ``datagrams_to_send`` costs as much as sending a
        packet (~35 µs here), so skipping it nearly halves the relay's cost per frame.
        """
        if (
            self._flush_due
            or not self.handshake_complete
            or self.queue
            or self.quic._datagrams_pending
        ):
            self.flush()
        else:
            self._rearm_timer()

    def flush(self) -> None:
        """Move queued datagrams into aioquic, send what it allows, re-arm the timer."""
        if self.terminated:
            return
        self._flush_due = False
        transmit(self.quic, self.h3, self.queue, trio.current_time(), self._send)
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        scope = self._timer_scope
        if scope is not None:
            deadline = self._deadline()
            if scope.deadline != deadline:
                scope.deadline = deadline

    def _deadline(self) -> float:
        timer = self.quic.get_timer()
        deadline = min(self._keepalive_at, self._close_at, self._app_deadline)
        if not self.handshake_complete:
            deadline = min(deadline, self.created + HANDSHAKE_TIMEOUT)
        return deadline if timer is None else min(deadline, timer)

    def _rearm_app_deadline(self) -> None:
        deadlines = [d for s in self.sessions.values() if (d := s.deadline()) is not None]
        self._app_deadline = min(deadlines, default=math.inf)

    def deadline_moved_earlier(self, deadline: float) -> None:
        """A session's deadline moved earlier than planned (e.g. registered: registration
        timeout → peer timeout). Later moves need no call: the timer re-checks when it fires."""
        if deadline < self._app_deadline:
            self._app_deadline = deadline
            scope = self._timer_scope
            if scope is not None and deadline < scope.deadline:
                scope.deadline = deadline

    # -- sessions -------------------------------------------------------------------------

    def close_session(
        self, stream_id: int, *, notify_peer: bool = True, code: int = 0, reason: str = ""
    ) -> None:
        """End a WebTransport session; close QUIC shortly after the last one."""
        session = self.sessions.pop(stream_id, None)
        if session is None:
            return
        self._flush_due = True
        if notify_peer and self.h3 is not None and not self.terminated:
            # What the session said last (an Error explaining a refusal) goes out first.
            now = trio.current_time()
            while (item := self.queue.pop_session(stream_id, now)) is not None:
                self.h3.send_datagram(stream_id, item)
            body = code.to_bytes(4, "big") + reason.encode("utf-8")[:1024]
            capsule = (
                encode_uint_var(CLOSE_WEBTRANSPORT_SESSION) + encode_uint_var(len(body)) + body
            )
            try:
                self.h3.send_data(stream_id, capsule, end_stream=True)
            except Exception as exc:  # the stream may already be finished by the peer
                log.debug("%s: closing stream %d: %s", self.label, stream_id, exc)
        self.queue.discard_session(stream_id)
        session.on_closed(reason)
        if not self.sessions:
            self._close_at = trio.current_time() + CLOSE_GRACE

    # -- lifetime -------------------------------------------------------------------------

    def close(self, error_code: int = H3ErrorCode.H3_NO_ERROR, reason: str = "") -> None:
        """Close the QUIC connection (the browser sees the session end and reconnects)."""
        for stream_id in list(self.sessions):
            self.close_session(stream_id, reason=reason)
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self.flush()

    def _terminated(self, event: ConnectionTerminated) -> None:
        if self.terminated:
            return
        self.terminated = True
        log.debug(
            "%s: connection closed: 0x%x %s", self.label, event.error_code, event.reason_phrase
        )
        for stream_id in list(self.sessions):
            self.close_session(stream_id, notify_peer=False, reason="connection closed")
        self.endpoint.forget(self)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connection's timer; host its session tasks."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for session in self.sessions.values():
                    nursery.start_soon(session.run)
                task_status.started()
                await self._timer_loop()
        except Exception:  # a bug in one connection must never take the relay down
            self.drops["connection_error"] += 1
            log.exception("%s: internal error; closing the connection", self.label)
            with contextlib.suppress(Exception):
                self.quic.close(error_code=H3ErrorCode.H3_INTERNAL_ERROR, reason_phrase="error")
                transmit(self.quic, None, self.queue, trio.current_time(), self._send)
        finally:
            self._nursery = None
            if not self.terminated:
                self.terminated = True
                for stream_id in list(self.sessions):
                    self.close_session(stream_id, notify_peer=False, reason="connection closed")
                self.endpoint.forget(self)

    async def _timer_loop(self) -> None:
        quic = self.quic
        while not self.terminated:
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            timer = quic.get_timer()  # re-read: the receive path may have moved it later
            if timer is not None and now >= timer:
                quic.handle_timer(now=now)
            if not self.handshake_complete and now >= self.created + HANDSHAKE_TIMEOUT:
                self.drops["handshake_timeout"] += 1
                self.endpoint.forget(self)
                return
            if now >= self._keepalive_at:
                self._ping_uid += 1
                quic.send_ping(self._ping_uid)
                self._keepalive_at = now + KEEPALIVE_INTERVAL
            if now >= self._close_at:
                self._close_at = math.inf
                if not self.sessions:
                    quic.close(error_code=H3ErrorCode.H3_NO_ERROR, reason_phrase="session closed")
            if now >= self._app_deadline:
                for session in list(self.sessions.values()):
                    deadline = session.deadline()
                    if deadline is not None and now >= deadline:
                        session.on_timer(now)
                self._rearm_app_deadline()
            self.process_events()
            self.flush()
