"""A Python WebTransport client for the relay, on aioquic and trio.

It speaks the BAVY protocol like the VM does — Register, Assigned, Heartbeat, frames and
chunks — and is what the tests, the benchmarks and the TAP attach tool use. Usage::

    async with trio.open_nursery() as nursery:
        client = await connect(nursery, "https://127.0.0.1:4433/", cert_hash=hex_hash)
        assigned = await client.register(mac)
        client.send_frame(frame)
        frame = await client.receive_frame()
        await client.aclose()
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import ssl
from collections import Counter, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived, HandshakeCompleted
from cryptography.hazmat.primitives import serialization

from relay.errors import RelayError
from relay.lan.paths import Framing, parse_path
from relay.quic import congestion
from relay.quic.datagram_queue import DatagramQueue
from relay.quic.pump import max_datagram_payload, transmit
from relay.wire.codec import (
    Chunk,
    ChunkIdCounter,
    Control,
    DataFrame,
    decode_datagram_untrusted,
    encode_control,
    encode_frame,
)
from relay.wire.messages import (
    Assigned,
    ControlMessage,
    Disconnect,
    Error,
    Heartbeat,
    HeartbeatAck,
    Register,
)
from relay.wire.reassembly import Reassembler

log = logging.getLogger("relay.client")

FRAME_QUEUE = 1024
REGISTER_RESEND = 1.0
"""Seconds without an answer before Register is sent again (it may have been lost)."""


class ClientError(RelayError):
    """The relay could not be reached, refused us, or went away."""


def parse_cert_hash(text: str) -> bytes:
    """Hex SHA-256, with or without colons, as the BAVY clients accept it."""
    try:
        digest = bytes.fromhex(text.replace(":", "").strip())
    except ValueError:
        raise ClientError(f"certificate hash is not hex: {text!r}") from None
    if len(digest) != 32:
        raise ClientError("certificate hash must be 32 bytes (SHA-256)")
    return digest


def random_mac() -> bytes:
    """A locally administered unicast MAC in the 52:54 range the BAVY VM uses."""
    return b"\x52\x54" + os.urandom(4)


@dataclass
class ClientStats:
    datagrams_sent: int = 0
    datagrams_received: int = 0
    chunks_received: int = 0
    heartbeat_acks: int = 0


class RelayClient:
    """One WebTransport session to the relay. Create it with :func:`connect`."""

    def __init__(
        self,
        sock: socket.socket,
        quic: QuicConnection,
        addr: tuple[str, int],
        path: str,
        authority: str,
        cert_hash: bytes | None,
    ) -> None:
        self._sock = sock
        self._quic = quic
        self._addr = addr
        self._path = path
        lan_path = parse_path(path)
        self.raw = lan_path is not None and lan_path.framing is Framing.RAW
        """Raw framing (a path ending in /raw): each datagram is one bare Ethernet frame."""
        self._authority = authority
        self._cert_hash = cert_hash
        self._h3: H3Connection | None = None
        self.session_id: int | None = None
        self._queue = DatagramQueue(max_queued=1024, max_age=1.0)
        self._reassembler = Reassembler()
        self._chunk_ids = ChunkIdCounter()
        self._frames_tx, self.frames = trio.open_memory_channel[bytes](FRAME_QUEUE)
        self._control_tx, self.controls = trio.open_memory_channel[ControlMessage](64)
        self.drops: Counter[str] = Counter()
        self.stats = ClientStats()
        self.assigned: Assigned | None = None
        self.mac: bytes | None = None
        """The MAC registered with the relay."""
        self.raw_controls: deque[bytes] = deque(maxlen=16)
        """The last control datagrams exactly as received, for byte-level checks."""
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.close_reason = ""
        self._connect_error: str | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._cancel = trio.CancelScope()
        self._pending_stream: int | None = None
        self._flush_due = True

    # -- public API -----------------------------------------------------------------------

    @property
    def max_datagram_payload(self) -> int:
        return max_datagram_payload(self._quic, self.session_id or 0)

    def send_datagram(self, payload: bytes) -> None:
        """Send one raw datagram payload (type byte included); never blocks."""
        self._queue_datagram(payload)
        self._flush()

    def _queue_datagram(self, payload: bytes) -> None:
        if self.session_id is None or self.closed.is_set():
            raise ClientError("session is not open")
        if self._queue.push(
            self.session_id, payload, trio.current_time(), self.max_datagram_payload
        ):
            self.stats.datagrams_sent += 1

    def send_control(self, message: ControlMessage) -> None:
        self.send_datagram(encode_control(message))

    def send_frame(self, frame: bytes) -> None:
        """Send an Ethernet frame, chunked above 950 bytes as the BAVY clients do (as is in
        raw framing)."""
        if self.raw:
            self.send_datagram(frame)
            return
        for payload in encode_frame(frame, self._chunk_ids):
            self._queue_datagram(payload)
        self._flush()

    async def register(self, mac: bytes) -> Assigned:
        """Register ``mac`` and wait for the relay's Assigned (or Error).

        Register travels as a datagram and may be lost; the relay answers a repeated Register
        with the same Assigned, so it is sent again every ``REGISTER_RESEND`` seconds until
        one arrives. Bound the whole wait with ``trio.fail_after``.
        """
        while True:
            self.send_control(Register(mac))
            with trio.move_on_after(REGISTER_RESEND):
                while True:
                    message = await self.receive_control()
                    if isinstance(message, Assigned):
                        self.assigned, self.mac = message, mac
                        return message
                    if isinstance(message, Error):
                        raise ClientError(f"relay refused registration: {message.message}")

    async def receive_control(self) -> ControlMessage:
        try:
            return await self.controls.receive()
        except trio.EndOfChannel:
            raise ClientError(f"session closed: {self.close_reason}") from None

    async def receive_frame(self) -> bytes:
        try:
            return await self.frames.receive()
        except trio.EndOfChannel:
            raise ClientError(f"session closed: {self.close_reason}") from None

    def heartbeat(self) -> None:
        self.send_control(Heartbeat())

    async def aclose(self, disconnect: bool = True) -> None:
        """Leave politely (Disconnect) and close QUIC."""
        if not self.closed.is_set():
            if disconnect and self.session_id is not None and not self.raw:
                try:
                    self.send_control(Disconnect())
                except ClientError:
                    pass
            self._quic.close(error_code=0x100, reason_phrase="client closing")
            self._flush()
            self._finish("closed by client")
        self._cancel.cancel()

    # -- driving aioquic ------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_due = False
        transmit(self._quic, self._h3, self._queue, trio.current_time(), self._send_udp)
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        scope = self._timer_scope
        if scope is not None:
            timer = self._quic.get_timer()
            deadline = math.inf if timer is None else timer
            if scope.deadline != deadline:
                scope.deadline = deadline

    def _send_udp(self, data: bytes, _addr: object) -> None:
        try:
            self._sock.send(data)
        except (BlockingIOError, ConnectionRefusedError):
            self.drops["udp_send"] += 1

    def _finish(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self.connected.set()
        self._frames_tx.close()
        self._control_tx.close()

    def _process_events(self) -> None:
        quic = self._quic
        while (event := quic.next_event()) is not None:
            if type(event) is not DatagramFrameReceived:
                self._flush_due = True
            if isinstance(event, HandshakeCompleted):
                if not self._check_certificate():
                    return
                self._h3 = H3Connection(quic, enable_webtransport=True)
                self._open_session()
            elif isinstance(event, ConnectionTerminated):
                self._connect_error = self._connect_error or event.reason_phrase
                self._finish(f"connection closed: {event.reason_phrase or hex(event.error_code)}")
                return
            if self._h3 is not None:
                for h3_event in self._h3.handle_event(event):
                    self._h3_event(h3_event)

    def _check_certificate(self) -> bool:
        if self._cert_hash is None:
            return True
        cert = self._quic.tls._peer_certificate
        der = b"" if cert is None else cert.public_bytes(serialization.Encoding.DER)
        if hashlib.sha256(der).digest() != self._cert_hash:
            self._connect_error = "server certificate does not match the pinned hash"
            self._quic.close(error_code=0x12A, reason_phrase="certificate hash mismatch")
            self._finish(self._connect_error)
            return False
        return True

    def request_headers(self) -> list[tuple[bytes, bytes]]:
        """The extended CONNECT that opens the session (what Chrome sends)."""
        return [
            (b":method", b"CONNECT"),
            (b":protocol", b"webtransport"),
            (b":scheme", b"https"),
            (b":authority", self._authority.encode()),
            (b":path", self._path.encode()),
            (b"sec-webtransport-http3-draft02", b"1"),
            (b"origin", b"https://" + self._authority.encode()),
        ]

    def _open_session(self) -> None:
        assert self._h3 is not None
        stream_id = self._quic.get_next_available_stream_id()
        self._h3.send_headers(stream_id, self.request_headers())
        self._pending_stream = stream_id

    def _h3_event(self, event: object) -> None:
        if isinstance(event, DatagramReceived):
            if event.stream_id == self.session_id:
                self._datagram(event.data)
        elif isinstance(event, HeadersReceived):
            if self.session_id is None and event.stream_id == self._pending_stream:
                status = dict(event.headers).get(b":status", b"")
                if status == b"200":
                    self.session_id = event.stream_id
                    self.connected.set()
                else:
                    self._connect_error = f"relay answered HTTP {status.decode()}"
                    self._finish(self._connect_error)
        elif (
            isinstance(event, DataReceived)
            and event.stream_id == self.session_id
            and event.stream_ended
        ):
            self._finish("session closed by relay")

    def _datagram(self, data: bytes) -> None:
        self.stats.datagrams_received += 1
        if self.raw:
            self._deliver(data)
            return
        try:
            decoded = decode_datagram_untrusted(data)
        except RelayError:
            self.drops["undecodable"] += 1
            return
        frame: bytes | None
        if isinstance(decoded, DataFrame):
            frame = decoded.frame
        elif isinstance(decoded, Chunk):
            self.stats.chunks_received += 1
            frame = self._reassembler.add(decoded, trio.current_time())
        else:
            assert isinstance(decoded, Control)
            self.raw_controls.append(data)
            if isinstance(decoded.message, HeartbeatAck):
                self.stats.heartbeat_acks += 1
            try:
                self._control_tx.send_nowait(decoded.message)
            except trio.WouldBlock:
                self.drops["control_queue_full"] += 1
            return
        if frame is not None:
            self._deliver(frame)

    def _deliver(self, frame: bytes) -> None:
        try:
            self._frames_tx.send_nowait(frame)
        except trio.WouldBlock:
            self.drops["frame_queue_full"] += 1

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._timer_loop)
                    task_status.started()
                    await self._receive_loop()
        finally:
            self._finish(self.close_reason or "client stopped")
            self._sock.close()

    async def _receive_loop(self) -> None:
        sock = self._sock
        while not self.closed.is_set():
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            try:
                for _ in range(256):
                    data = sock.recv(65535)
                    self._quic.receive_datagram(data, self._addr, now)
            except BlockingIOError:
                pass
            except ConnectionRefusedError:
                self.drops["icmp_refused"] += 1
                if self.session_id is None:  # nothing listens there: fail now, not at timeout
                    self._connect_error = "connection refused"
                    self._finish(self._connect_error)
                    break
            self._process_events()
            if self._flush_due or self._queue or self._quic._datagrams_pending:
                self._flush()  # receiving datagrams alone needs no send: aioquic delays ACKs
            else:
                self._rearm_timer()
        self._cancel.cancel()

    async def _timer_loop(self) -> None:
        while not self.closed.is_set():
            timer = self._quic.get_timer()
            with trio.CancelScope(deadline=math.inf if timer is None else timer) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            timer = self._quic.get_timer()
            if timer is not None and now >= timer:
                self._quic.handle_timer(now=now)
            self._process_events()
            self._flush()
        self._cancel.cancel()


async def connect(
    nursery: trio.Nursery,
    url: str,
    *,
    cert_hash: str | None = None,
    cafile: str | None = None,
    handshake_timeout: float = 10.0,
    max_datagram_size: int = 1350,
    client_class: type[RelayClient] = RelayClient,
) -> RelayClient:
    """Open a WebTransport session to ``url``; its tasks run in ``nursery``.

    With ``cert_hash`` the server's certificate must have that SHA-256 (browser-style
    pinning); otherwise it is verified against ``cafile`` or the system's CAs.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ClientError(f"relay URL must be https://host:port/path, not {url!r}")
    host, port = parts.hostname, parts.port or 443
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    pinned = parse_cert_hash(cert_hash) if cert_hash else None
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        max_datagram_frame_size=65536,
        congestion_control_algorithm=congestion.NAME,
        max_datagram_size=max_datagram_size,
        server_name=host,
    )
    if pinned is not None:
        config.verify_mode = ssl.CERT_NONE  # the hash check replaces the CA check
    elif cafile:
        config.load_verify_locations(cafile=cafile)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise ClientError(f"cannot resolve {host}")
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.connect(sockaddr)
    addr = (str(sockaddr[0]), int(sockaddr[1]))
    quic = QuicConnection(configuration=config)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    client = client_class(sock, quic, addr, path, authority, pinned)
    quic.connect(addr, now=trio.current_time())
    await nursery.start(client._run)
    client._flush()
    with trio.move_on_after(handshake_timeout):
        await client.connected.wait()
    if client.session_id is None:
        reason = client._connect_error or "timed out"
        await client.aclose(disconnect=False)
        raise ClientError(f"cannot open a WebTransport session to {url}: {reason}")
    return client
