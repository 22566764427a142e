"""TCP NAT: the trio side of each terminated connection.

The guest's TCP ends in :class:`relay.nat.tcp.TcpFlow` (sans-IO); one task per flow owns it
and the host socket. The switch task only parses the segment and queues it on the flow's
bounded channel (full: dropped; the guest retransmits), so a slow connect or a full host
socket never holds up a frame. The SYN-ACK waits for the host ``connect``: refused → RST,
timed out or unreachable → ICMP host unreachable, as a guest would see from a real router.

Within the flow task four small loops share the one flow (trio runs one at a time): guest
segments, host reads (only while the flow has room: backpressure towards the server), host
writes (only bytes the flow hands over; the guest's data is ACKed once written), and the
flow's timer. After each input, :meth:`TcpConnection.pump` sends what the flow wants to send
and wakes the loops whose conditions may have changed.
"""

from __future__ import annotations

import errno
import math
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import trio

from relay.nat.context import NatContext, log
from relay.nat.guest import Guest
from relay.nat.policy import Proto
from relay.nat.tcp import TcpFlow, TcpSettings
from relay.nat.tcp_segment import ACK, RST, Segment, build_segment
from relay.packets import build
from relay.packets.headers import IPPROTO_TCP

TcpKey = tuple[str, bytes, int, bytes, int]
"""(LAN, VM address, VM port, destination address, destination port)."""
GUEST_QUEUE = 256
"""Segments from the guest waiting for the flow's task; more are dropped."""
READ_SIZE = 65536
WRITE_SIZE = 65536
RECOVERY_STATS = (
    "retransmits",
    "sack_retransmits",
    "fast_retransmits",
    "lost_retransmits",
    "tail_probes",
    "timeouts",
)
"""A flow's loss-recovery counts, added to the NAT's events when it ends."""
NOT_REFUSED = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


@dataclass(eq=False)
class TcpConnection:
    key: TcpKey
    guest: Guest
    flow: TcpFlow
    context: NatContext
    syn_quote: bytes
    """The start of the guest's SYN, quoted in an ICMP unreachable."""
    inbox: trio.MemorySendChannel[Segment] = field(init=False)
    _rx: trio.MemoryReceiveChannel[Segment] = field(init=False)
    _changed: trio.Event = field(default_factory=trio.Event)
    established_counted: bool = False
    sock: trio.socket.SocketType | None = None

    def __post_init__(self) -> None:
        self.inbox, self._rx = trio.open_memory_channel[Segment](GUEST_QUEUE)

    @property
    def dst(self) -> tuple[bytes, int]:
        return self.key[3], self.key[4]

    def deliver(self, segment: Segment) -> None:
        """From the switch task: hand a segment to the flow's task (never blocks)."""
        try:
            self.inbox.send_nowait(segment)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.context.drops["tcp_queue_full"] += 1

    def pump(self) -> None:
        """Send what the flow wants to send now, and wake the loops."""
        now = trio.current_time()
        flow, guest = self.flow, self.guest
        src_ip, mtu = self.key[3], self.context.settings.mtu
        for segment in flow.to_guest(now):
            data = build_segment(src_ip, guest.ip, segment)
            guest.send_packet(src_ip, IPPROTO_TCP, data, mtu)
        self._changed.set()
        self._changed = trio.Event()

    async def _until_changed(self) -> None:
        await self._changed.wait()

    async def run(self) -> None:
        context, flow = self.context, self.flow
        try:
            async with trio.open_nursery() as tasks:
                tasks.start_soon(self._guest_loop)
                tasks.start_soon(self._timer_loop)
                if await self._connect():
                    tasks.start_soon(self._read_loop)
                    tasks.start_soon(self._write_loop)
                await self._until_closed()
                tasks.cancel_scope.cancel()
        except Exception:
            log.exception("TCP flow failed")
            flow.abort(trio.current_time())
            self.pump()
        finally:
            context.events[f"tcp_closed_{flow.close_reason or 'error'}"] += 1
            for stat in RECOVERY_STATS:
                context.events[f"tcp_{stat}"] += flow.stats[stat]
            if not self.established_counted:
                context.budget.half_open(self.guest.vm, -1)
            context.budget.release(self.guest.vm, Proto.TCP)
            self.inbox.close()
            if self.sock is not None:
                if flow.reset_upstream:
                    _linger_zero(self.sock)
                self.sock.close()

    async def _until_closed(self) -> None:
        while not self.flow.closed:
            self._note_established()
            await self._until_changed()

    def _note_established(self) -> None:
        if not self.established_counted and self.flow.state.name == "ESTABLISHED":
            self.established_counted = True
            self.context.budget.half_open(self.guest.vm, -1)

    async def _connect(self) -> bool:
        flow, context = self.flow, self.context
        host, port = str(IPv4Address(self.dst[0])), self.dst[1]
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock = sock
        failure: OSError | None = None
        with trio.move_on_after(context.settings.tcp_connect_timeout) as timer:
            try:
                await sock.connect((host, port))
            except OSError as exc:
                failure = exc
        now = trio.current_time()
        if timer.cancelled_caught or failure is not None:
            refused = failure is not None and failure.errno not in NOT_REFUSED
            context.events["tcp_refused" if refused else "tcp_unreachable"] += 1
            flow.upstream_failed(now, refused=refused)
            if flow.unreachable:
                self.guest.send_unreachable(build.UNREACHABLE_HOST, self.syn_quote)
            self.pump()
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context.events["tcp_connected"] += 1
        flow.upstream_connected(now)
        self.pump()
        return True

    async def _guest_loop(self) -> None:
        flow = self.flow
        async for segment in self._rx:
            flow.guest_segment(segment, trio.current_time())
            while True:  # a burst: one pump for all that is queued
                try:
                    segment = self._rx.receive_nowait()
                except trio.WouldBlock:
                    break
                flow.guest_segment(segment, trio.current_time())
            self.pump()

    async def _timer_loop(self) -> None:
        flow = self.flow
        while True:
            deadline = flow.next_deadline()
            changed = self._changed
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await changed.wait()
                continue
            flow.timer(trio.current_time())
            self.pump()

    async def _read_loop(self) -> None:
        flow, sock, context = self.flow, self.sock, self.context
        assert sock is not None
        vm = self.guest.vm
        while True:
            room = flow.upstream_room()
            if room <= 0:
                await self._until_changed()
                continue
            try:
                data = await sock.recv(min(room, READ_SIZE))
            except OSError:
                flow.upstream_reset(trio.current_time())
                self.pump()
                return
            now = trio.current_time()
            if not data:
                flow.upstream_eof(now)
                self.pump()
                return
            while not context.budget.take_bytes(vm, "in", len(data), now):
                context.events["tcp_rate_limited"] += 1
                await trio.sleep(0.01)
                now = trio.current_time()
            flow.upstream_data(data, now)
            self.pump()

    async def _write_loop(self) -> None:
        flow, sock, context = self.flow, self.sock, self.context
        assert sock is not None
        vm = self.guest.vm
        while True:
            pending = flow.pending_upstream()[:WRITE_SIZE]  # within one bucket burst
            if pending:
                while not context.budget.take_bytes(vm, "out", len(pending), trio.current_time()):
                    context.events["tcp_rate_limited"] += 1
                    await trio.sleep(0.01)
                try:
                    sent = await sock.send(pending)
                except OSError:
                    flow.upstream_reset(trio.current_time())
                    self.pump()
                    return
                flow.upstream_written(sent, trio.current_time())
                self.pump()
                continue
            if flow.upstream_shutdown_wanted:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                flow.upstream_shutdown_done()
                self.pump()
                continue
            await self._until_changed()


def _linger_zero(sock: trio.socket.SocketType) -> None:
    """Close with RST, as the guest did."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def reset_for(segment: Segment) -> Segment:
    """RFC 793's answer to a segment for no connection."""
    if segment.flags & ACK:
        return Segment(segment.dport, segment.sport, segment.ack, 0, RST, 0)
    length = len(segment.payload) + (1 if segment.flags & 0x02 else 0) + (segment.flags & 0x01)
    return Segment(
        segment.dport, segment.sport, 0, (segment.seq + length) & 0xFFFFFFFF, RST | ACK, 0
    )


def tcp_settings(context: NatContext) -> TcpSettings:
    return TcpSettings(mss=context.settings.mtu - 40)
