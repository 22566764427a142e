"""The QUIC endpoint: owns the UDP sockets and routes packets to connections by CID.

Admission is where a relay on the open internet is attacked, so everything here is bounded:
connections are created only for Initial packets of at least 1200 bytes with a supported
version; half-open handshakes are capped, and above a threshold new clients must prove their
address with a Retry round trip; the connection table has a hard cap. Version Negotiation is
never sent in reply to a Version Negotiation packet. Every drop is counted.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from relay.logs import RateLimitedLog
from relay.quic.connection import QuicPeer, SessionFactory, send_udp

log = logging.getLogger("relay.quic")
_drop_log = RateLimitedLog(log)

SMALLEST_INITIAL = 1200
RECV_BUFFER = 1024 * 1024
"""Asked-for SO_RCVBUF/SO_SNDBUF (Linux grants twice this). Enough for a browser's bursts
(the 208 KiB default drops 0.2-0.5 % of a flood); not more, because under overload every
queued packet is latency for all sessions: in `relay bench` overload runs 8 MiB gave
p50 delay 570 ms and 57 % loss, 1 MiB 223 ms and 33-36 % loss."""
BATCH = 256
"""Packets read per wake-up before connections process events and flush."""


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Caps on connections; see security-and-operations §5.2."""

    max_connections: int = 4096
    max_half_open: int = 256
    retry_above: int = 32
    """Half-open handshakes beyond which new clients must answer a Retry first."""
    always_retry: bool = False


def open_udp_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket; ``::`` is dual-stack (IPv4-mapped) where possible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, RECV_BUFFER)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < RECV_BUFFER:  # Linux reports double what it grants, capped by rmem_max
        log.warning(
            "UDP receive buffer is %d KiB, not the %d KiB asked for: raise net.core.rmem_max "
            "or bursts will be dropped by the kernel (RcvbufErrors in /proc/net/snmp)",
            granted // 1024,
            RECV_BUFFER // 1024,
        )
    else:
        log.debug("UDP receive buffer: %d KiB", granted // 1024)
    return sock


class Endpoint:
    """UDP sockets in, QUIC connections out."""

    def __init__(
        self,
        configuration: Callable[[], QuicConfiguration],
        sessions: SessionFactory,
        limits: AdmissionLimits | None = None,
        on_forget: Callable[[QuicPeer], None] | None = None,
    ) -> None:
        self._configuration = configuration
        self._sessions = sessions
        self._on_forget = on_forget
        """Told once of each connection as it goes (cumulative counters are read there)."""
        self.limits = limits or AdmissionLimits()
        self._cids: dict[bytes, QuicPeer] = {}
        self.peers: set[QuicPeer] = set()
        self._half_open: set[QuicPeer] = set()
        self._retry = QuicRetryTokenHandler()
        self.drops: Counter[str] = Counter()
        self.handshakes_started = 0
        self.retries_sent = 0
        self.sockets: list[socket.socket] = []
        self._nursery: trio.Nursery | None = None

    def _drop(self, reason: str, addr: NetworkAddress | None = None) -> None:
        self.drops[reason] += 1
        _drop_log.event(reason, "dropped UDP packet from %s: %s", addr and addr[0], reason)

    # -- hooks for connections ------------------------------------------------------------

    def add_cid(self, cid: bytes, peer: QuicPeer) -> None:
        self._cids[cid] = peer

    def remove_cid(self, cid: bytes) -> None:
        self._cids.pop(cid, None)

    def forget(self, peer: QuicPeer) -> None:
        if self._on_forget is not None and peer in self.peers:
            self._on_forget(peer)
        for cid in peer.cids:
            if self._cids.get(cid) is peer:
                del self._cids[cid]
        peer.cids.clear()
        self.peers.discard(peer)
        self._half_open.discard(peer)

    def handshake_completed(self, peer: QuicPeer) -> None:
        self._half_open.discard(peer)

    @property
    def half_open(self) -> int:
        """Connections still in their handshake (capped; Retry above a threshold)."""
        return len(self._half_open)

    # -- serving --------------------------------------------------------------------------

    async def serve(
        self,
        binds: Sequence[tuple[str, int]],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on every bind address; report the bound addresses through ``task_status``."""
        for host, port in binds:
            try:
                self.sockets.append(open_udp_socket(host, port))
            except OSError as exc:
                if host == "::" and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("IPv6 unavailable (%s); listening on IPv4 only", exc.strerror)
                    self.sockets.append(open_udp_socket("0.0.0.0", port))
                else:
                    for sock in self.sockets:
                        sock.close()
                    raise
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sock in self.sockets:
                    nursery.start_soon(self._receive_loop, sock)
                task_status.started([s.getsockname()[:2] for s in self.sockets])
        finally:
            for sock in self.sockets:
                sock.close()

    def close_all(self, reason: str = "shutdown") -> None:
        """Close every connection now (shutdown)."""
        for peer in list(self.peers):
            try:
                peer.close(reason=reason)
            except Exception:  # a broken connection must not stop the shutdown
                log.exception("%s: error while closing", peer.label)

    async def _receive_loop(self, sock: socket.socket) -> None:
        dirty: dict[int, QuicPeer] = {}
        receive = self._receive_one
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            try:
                for _ in range(BATCH):
                    data, addr = sock.recvfrom(65535)
                    receive(sock, data, addr, now, dirty)
            except BlockingIOError:
                pass
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                self._drop("udp_receive_error")
                log.debug("recvfrom: %s", exc)
            for peer in dirty.values():
                try:
                    peer.process_events()
                    peer.flush_if_due()
                except Exception:
                    self._poisoned(peer)
            dirty.clear()
            await trio.lowlevel.checkpoint()

    def _poisoned(self, peer: QuicPeer) -> None:
        """A connection whose processing raised is closed, never the endpoint."""
        self.drops["connection_error"] += 1
        log.exception("%s: internal error; closing the connection", peer.label)
        try:
            peer.close(error_code=0x102, reason="internal error")
        except Exception:  # it is broken already; forgetting it is all that is left
            log.debug("%s: close failed too", peer.label)
        self.forget(peer)

    def _receive_one(
        self,
        sock: socket.socket,
        data: bytes,
        addr: NetworkAddress,
        now: float,
        dirty: dict[int, QuicPeer],
    ) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            self._drop("bad_header", addr)
            return
        peer = self._cids.get(header.destination_cid)
        if peer is None:
            peer = self._admit(sock, header, data, addr, now)
            if peer is None:
                return
        try:
            peer.receive(data, addr, now)
        except Exception:
            self._poisoned(peer)
            return
        dirty[id(peer)] = peer

    def _admit(
        self,
        sock: socket.socket,
        header: QuicHeader,
        data: bytes,
        addr: NetworkAddress,
        now: float,
    ) -> QuicPeer | None:
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            self._drop("version_negotiation", addr)
            return None
        configuration = self._configuration()
        if header.version is not None and header.version not in configuration.supported_versions:
            if header.version == 0 or len(data) < SMALLEST_INITIAL:
                self._drop("unsupported_version", addr)
                return None
            send_udp(
                sock,
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=configuration.supported_versions,
                ),
                addr,
                self.drops,
            )
            self._drop("unsupported_version", addr)
            return None
        if header.packet_type != QuicPacketType.INITIAL:
            self._drop("unknown_connection", addr)
            return None
        if len(data) < SMALLEST_INITIAL:
            self._drop("initial_too_small", addr)
            return None
        limits = self.limits
        if len(self.peers) >= limits.max_connections:
            self._drop("connections_full", addr)
            return None
        half_open = self.half_open
        if half_open >= limits.max_half_open:
            self._drop("half_open_full", addr)
            return None
        original_dcid: bytes = header.destination_cid
        retry_scid: bytes | None = None
        if header.version is None:  # not a long header: cannot be an Initial
            self._drop("unknown_connection", addr)
            return None
        if header.token:
            # A Retry token is checked whatever the load now: the load that made us send
            # the Retry may have passed by the time the client comes back with it.
            try:
                original_dcid = self._retry.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=now,
                )
            except ValueError:
                self._drop("bad_retry_token", addr)
                return None
            retry_scid = header.destination_cid
        elif limits.always_retry or half_open >= limits.retry_above:
            retry_cid = os.urandom(8)
            token = self._retry.create_token(
                address=addr,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=retry_cid,
                now=now,
            )
            send_udp(
                sock,
                encode_quic_retry(
                    version=header.version,
                    source_cid=retry_cid,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=token,
                ),
                addr,
                self.drops,
            )
            self.retries_sent += 1
            return None
        quic = QuicConnection(
            configuration=configuration,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )
        peer = QuicPeer(quic, sock, addr, self, self._sessions, now)
        for cid in (header.destination_cid, quic.host_cid):
            peer.cids.add(cid)
            self._cids[cid] = peer
        self.peers.add(peer)
        self._half_open.add(peer)
        self.handshakes_started += 1
        assert self._nursery is not None
        self._nursery.start_soon(peer.run, name=f"quic {peer.label}")
        return peer
