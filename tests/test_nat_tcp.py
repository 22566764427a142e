"""The sans-IO TCP terminator (:mod:`relay.nat.tcp`) and its segment codec, driven by hand.

No trio and no sockets: a :class:`Guest` plays the VM's TCP stack (it tracks its own sequence
numbers and what it has received from the relay), the test plays the driver of
:mod:`relay.nat.tcp_flows` (connect result, host reads and writes, timers), and the clock is a
float. Every segment the flow emits goes through :func:`emit`, which checks it survives the wire
(build → parse with real checksums) and fits in one datagram of the guest's MTU.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.nat.tcp import TcpFlow, TcpSettings, TcpState
from relay.nat.tcp_segment import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    BadSegment,
    SackBlocks,
    Segment,
    build_segment,
    parse_segment,
)
from relay.packets.build import internet_checksum

MOD = 1 << 32
GUEST_IP = bytes((10, 0, 2, 15))
SERVER_IP = bytes((93, 184, 216, 34))
GUEST_PORT = 49152
SERVER_PORT = 443
T0 = 1000.0
MSS = 1360
SETTINGS = TcpSettings(mss=MSS)
"""As :func:`relay.nat.tcp_flows.tcp_settings` makes them for an MTU of 1400."""
BAD_SEGMENT_REASONS = {"tcp_truncated", "tcp_offset", "tcp_checksum", "tcp_option"}


def pattern(length: int, seed: int = 1) -> bytes:
    """Bytes with no short period, so a misplaced or repeated chunk cannot compare equal."""
    return random.Random(seed).randbytes(length)


def relay_offset(guest: Guest, segment: Segment) -> int:
    """Where a relay segment starts in the relay's sequence space (its SYN is offset 0)."""
    return (segment.seq - guest.relay_isn) % MOD


def acked(guest: Guest, segment: Segment) -> int:
    """How much of the guest's stream a relay segment acknowledges (a FIN counts one)."""
    return (segment.ack - guest.isn - 1) % MOD


class Guest:
    """The VM's TCP stack, as far as these tests need it: sequence bookkeeping, no timers.

    A guest *position* is an offset into its byte stream (position 0 is sequence ``isn + 1``);
    relay offsets count from the relay's ISN. Segments are built by hand so a test can send
    anything: retransmissions, overlaps, old ACKs, RSTs at any sequence number. Like a real
    stack it keeps the relay's out-of-order segments and, having offered SACK, reports them.
    """

    def __init__(
        self,
        *,
        isn: int = 1_000_000,
        relay_isn: int = 7_000_000,
        mss: int | None = 1460,
        wscale: int | None = 7,
        sack: bool = True,
        window: int = 0xFFFF,
    ) -> None:
        self.isn = isn % MOD
        self.relay_isn = relay_isn % MOD
        self.mss = mss
        self.wscale = wscale
        self.sack = sack
        self.window = window
        self.sent = 0
        self.fin_sent = False
        self.received = bytearray()
        self.fin_received = False
        self.kept: dict[int, bytes] = {}  # the relay's out-of-order data, by relay offset

    @property
    def rcv_nxt(self) -> int:
        """The relay offset the guest expects next, i.e. what it acknowledges."""
        return 1 + len(self.received) + (1 if self.fin_received else 0)

    def seq(self, position: int) -> int:
        return (self.isn + 1 + position) % MOD

    def syn(self) -> Segment:
        return Segment(
            GUEST_PORT,
            SERVER_PORT,
            self.isn,
            0,
            SYN,
            self.window,
            mss=self.mss,
            wscale=self.wscale,
            sack_permitted=self.sack,
        )

    def segment(
        self,
        flags: int = ACK,
        payload: bytes = b"",
        *,
        position: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        sack: SackBlocks | None = None,
    ) -> Segment:
        """A segment at ``position`` (default: next), acknowledging relay offset ``ack``, with
        SACK blocks given as relay offsets (default: what the guest keeps, if it offered)."""
        if position is None:
            position = self.sent + (1 if self.fin_sent else 0)
        ack_offset = self.rcv_nxt if ack is None else ack
        if sack is None:
            sack = self.sack_blocks() if self.sack else ()
        return Segment(
            GUEST_PORT,
            SERVER_PORT,
            self.seq(position),
            (self.relay_isn + ack_offset) % MOD,
            flags,
            self.window if window is None else window,
            payload,
            sack=tuple(
                ((self.relay_isn + left) % MOD, (self.relay_isn + right) % MOD)
                for left, right in sack
            ),
        )

    def sack_blocks(self) -> SackBlocks:
        """The kept out-of-order ranges, highest first, three at most (RFC 2018)."""
        ranges: list[tuple[int, int]] = []
        for start in sorted(self.kept):
            end = start + len(self.kept[start])
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
            else:
                ranges.append((start, end))
        return tuple(reversed(ranges))[:3]

    def send(self, payload: bytes, *, fin: bool = False) -> Segment:
        """The next segment of the guest's stream; the stream advances."""
        flags = ACK | (PSH if payload else 0) | (FIN if fin else 0)
        segment = self.segment(flags, payload)
        self.sent += len(payload)
        self.fin_sent = self.fin_sent or fin
        return segment

    def receive(self, segments: Iterable[Segment]) -> None:
        """Take what continues the relay's stream and keep data beyond a hole, as a receiver
        with room would (an out-of-order FIN is dropped: the relay will resend it)."""
        for segment in segments:
            if segment.flags & (SYN | RST) or self.fin_received:
                continue
            offset = relay_offset(self, segment)
            skip = self.rcv_nxt - offset
            if skip < 0 and segment.payload:
                if len(segment.payload) > len(self.kept.get(offset, b"")):
                    self.kept[offset] = segment.payload
            elif skip <= len(segment.payload):
                self.received += segment.payload[skip:]
                self.fin_received = bool(segment.flags & FIN)
                self._drain()

    def _drain(self) -> None:
        while ready := [offset for offset in self.kept if offset <= self.rcv_nxt]:
            for offset in sorted(ready):
                payload = self.kept.pop(offset)
                self.received += payload[self.rcv_nxt - offset :]


def emit(flow: TcpFlow, now: float) -> list[Segment]:
    """``flow.to_guest``, checking each segment on the wire: one datagram, checksum intact."""
    out = flow.to_guest(now)
    for segment in out:
        data = build_segment(SERVER_IP, GUEST_IP, segment)
        assert 20 + len(data) <= flow.settings.mss + 40, "does not fit the guest's MTU"
        assert parse_segment(SERVER_IP, GUEST_IP, data) == segment
        assert (segment.sport, segment.dport) == (SERVER_PORT, GUEST_PORT)
    return out


def establish(
    guest: Guest | None = None, tcp: TcpSettings = SETTINGS, now: float = T0
) -> tuple[TcpFlow, Guest]:
    """SYN, host connect, SYN-ACK, ACK: a flow in ESTABLISHED."""
    guest = guest or Guest()
    flow = TcpFlow(guest.syn(), tcp, now, guest.relay_isn)
    flow.upstream_connected(now)
    (synack,) = emit(flow, now)
    assert synack.flags == SYN | ACK
    flow.guest_segment(guest.segment(), now)
    assert state(flow) is TcpState.ESTABLISHED
    assert emit(flow, now) == []
    return flow, guest


def state(flow: TcpFlow) -> TcpState:
    """``flow.state``, read through a call so that mypy does not narrow it across inputs."""
    return flow.state


def write_all(flow: TcpFlow, now: float) -> bytes:
    """The driver's write loop with a host socket that takes everything."""
    written = bytearray()
    while pending := flow.pending_upstream():
        written += pending
        flow.upstream_written(len(pending), now)
    return bytes(written)


# -- handshake --------------------------------------------------------------------------------


def test_handshake_clamps_mss_and_echoes_window_scale() -> None:
    """The SYN-ACK waits for the host connect, carries our MSS (so every segment to the guest
    fits one datagram), scales our window because the guest offered scaling, and agrees to
    the SACK the guest offered."""
    guest = Guest(mss=1460, wscale=7, sack=True)
    flow = TcpFlow(guest.syn(), SETTINGS, T0, guest.relay_isn)
    assert state(flow) is TcpState.SYN_RECEIVED_WAIT_CONNECT
    assert emit(flow, T0) == []  # nothing before the host answers
    assert flow.upstream_room() == 0

    flow.upstream_connected(T0 + 0.05)
    assert state(flow) is TcpState.SYN_RECEIVED
    (synack,) = emit(flow, T0 + 0.05)
    assert synack.flags == SYN | ACK
    assert synack.seq == guest.relay_isn
    assert synack.ack == (guest.isn + 1) % MOD
    assert synack.mss == MSS  # the guest's 1460 clamped to the relay's
    assert synack.wscale == 3  # 256 KiB >> 3 fits 16 bits
    assert synack.window == 0xFFFF  # a SYN's window is never scaled
    assert synack.sack_permitted
    assert flow.mss == MSS

    flow.guest_segment(guest.segment(), T0 + 0.1)
    assert state(flow) is TcpState.ESTABLISHED
    flow.upstream_data(pattern(10 * MSS), T0 + 0.1)
    out = emit(flow, T0 + 0.1)
    assert out and all(len(segment.payload) <= MSS for segment in out)
    # After the handshake our window is scaled: 32768 << 3 is the whole receive buffer.
    assert out[0].window << 3 == SETTINGS.receive_buffer


@pytest.mark.parametrize(("offered", "used"), [(None, 536), (500, 500), (9000, MSS)])
def test_no_window_scale_unless_offered_and_mss_is_the_smaller(
    offered: int | None, used: int
) -> None:
    """Without the guest's wscale option the SYN-ACK has none and our window stays 16-bit
    unscaled; the MSS is the smaller of ours and the guest's (RFC 9293's 536 if absent); no
    SACK unless offered."""
    guest = Guest(mss=offered, wscale=None, sack=False)
    flow = TcpFlow(guest.syn(), SETTINGS, T0, guest.relay_isn)
    flow.upstream_connected(T0)
    (synack,) = emit(flow, T0)
    assert synack.wscale is None and not synack.sack_permitted
    assert synack.mss == used
    assert synack.window == 0xFFFF
    flow.guest_segment(guest.segment(), T0)
    flow.upstream_data(pattern(5 * used), T0)
    out = emit(flow, T0)
    assert [len(segment.payload) for segment in out] == [used] * 5
    assert all(segment.window == 0xFFFF for segment in out)


def test_syn_ack_retransmitted_for_a_repeated_syn_and_on_timeout() -> None:
    """A lost SYN-ACK is recovered two ways: the guest repeats its SYN, or our RTO fires; a
    SYN before the host connect is not answered (there is nothing to say yet)."""
    guest = Guest()
    flow = TcpFlow(guest.syn(), SETTINGS, T0, guest.relay_isn)
    flow.guest_segment(guest.syn(), T0 + 0.5)
    assert emit(flow, T0 + 0.5) == []
    flow.upstream_connected(T0 + 1)
    (first,) = emit(flow, T0 + 1)
    flow.guest_segment(guest.syn(), T0 + 1.2)
    (again,) = emit(flow, T0 + 1.2)
    assert again == first
    assert flow.stats["syn_retransmitted"] == 1
    deadline = flow.next_deadline()
    assert deadline is not None and deadline > T0 + 1.2
    flow.timer(deadline)
    (third,) = emit(flow, deadline)
    assert third == first
    assert state(flow) is TcpState.SYN_RECEIVED


def test_refused_upstream_resets_the_guest() -> None:
    """Connection refused by the host → RST|ACK acknowledging the SYN, as the server would."""
    guest = Guest()
    flow = TcpFlow(guest.syn(), SETTINGS, T0, guest.relay_isn)
    flow.upstream_failed(T0 + 0.01, refused=True)
    (rst,) = emit(flow, T0 + 0.01)
    assert rst.flags == RST | ACK
    assert rst.ack == (guest.isn + 1) % MOD
    assert flow.closed and state(flow) is TcpState.CLOSED
    assert flow.close_reason == "refused"
    assert not flow.unreachable
    assert flow.next_deadline() is None


def test_unreachable_or_timed_out_upstream_sends_nothing_and_flags_icmp() -> None:
    """Timeout or unreachable: no TCP segment at all; the flow sets ``unreachable`` so the
    driver answers with ICMP host unreachable, as a real router would."""
    guest = Guest()
    flow = TcpFlow(guest.syn(), SETTINGS, T0, guest.relay_isn)
    flow.upstream_failed(T0 + 5, refused=False)
    assert emit(flow, T0 + 5) == []
    assert flow.unreachable
    assert flow.closed and flow.close_reason == "unreachable"
    flow.upstream_connected(T0 + 6)  # too late: ignored
    assert emit(flow, T0 + 6) == []
    assert state(flow) is TcpState.CLOSED


def test_half_open_flow_times_out() -> None:
    """A guest that never completes the handshake does not hold a flow for ever."""
    guest = Guest()
    flow = TcpFlow(guest.syn(), SETTINGS, T0, guest.relay_isn)
    flow.upstream_connected(T0)
    emit(flow, T0)
    now = T0
    while not flow.closed:
        deadline = flow.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        flow.timer(now)
        emit(flow, now)
    assert flow.close_reason == "half_open_timeout"
    assert flow.reset_upstream
    assert now <= T0 + SETTINGS.half_open_timeout


# -- guest → upstream -------------------------------------------------------------------------


def test_guest_data_is_acked_only_once_written_upstream() -> None:
    """The ACK means "on the host socket": a relay crash or host reset never loses acked bytes."""
    flow, guest = establish()
    flow.guest_segment(guest.send(b"hello "), T0 + 1)
    flow.guest_segment(guest.send(b"world"), T0 + 1)
    (ack,) = emit(flow, T0 + 1)
    assert acked(guest, ack) == 0  # received, not yet written
    assert flow.pending_upstream() == b"hello world"
    flow.upstream_written(3, T0 + 2)
    (ack,) = emit(flow, T0 + 2)
    assert acked(guest, ack) == 3
    assert flow.pending_upstream() == b"lo world"
    flow.upstream_written(8, T0 + 3)
    (ack,) = emit(flow, T0 + 3)
    assert acked(guest, ack) == 11
    assert flow.pending_upstream() == b""
    flow.upstream_written(5, T0 + 4)  # more than pending: ignored, nothing acked beyond
    (ack,) = emit(flow, T0 + 4)
    assert acked(guest, ack) == 11


def test_out_of_order_segments_are_delivered_in_order_once() -> None:
    """Segments 3, 2, 4 before 1: nothing upstream until the hole fills, then all, in order."""
    data = pattern(4000)
    flow, guest = establish()
    chunks = [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000)]
    for index in (2, 1, 3):
        start, end = chunks[index]
        flow.guest_segment(guest.segment(ACK, data[start:end], position=start), T0 + 1)
        assert flow.pending_upstream() == b""
        (ack,) = emit(flow, T0 + 1)
        assert acked(guest, ack) == 0  # a duplicate ACK asks for the hole
    assert flow.stats["out_of_order"] == 3
    flow.guest_segment(guest.segment(ACK, data[:1000], position=0), T0 + 2)
    assert write_all(flow, T0 + 2) == data
    (ack,) = emit(flow, T0 + 2)
    assert acked(guest, ack) == 4000


def test_duplicates_and_overlapping_retransmissions_never_duplicate_bytes() -> None:
    """Retransmissions with different boundaries (as after a guest's MSS change or a partial
    ACK) overlap what is buffered, written, and kept out of order; each byte goes up once."""
    data = pattern(3000, seed=2)
    flow, guest = establish()

    def send(start: int, end: int) -> None:
        flow.guest_segment(guest.segment(ACK, data[start:end], position=start), T0 + 1)

    upstream = bytearray()
    send(0, 500)
    send(0, 500)  # exact duplicate
    send(200, 700)  # overlaps the buffered tail
    upstream += write_all(flow, T0 + 1)
    send(100, 800)  # overlaps bytes already written upstream
    send(1500, 2000)  # out of order
    send(1200, 1800)  # out of order, overlapping the kept segment
    send(1500, 1600)  # a shorter duplicate of a kept segment
    send(1000, 2500)  # covers the kept ones entirely
    send(700, 1100)  # fills the hole, overlapping both sides
    send(2400, 3000)
    send(0, 3000)  # everything again
    upstream += write_all(flow, T0 + 2)
    assert bytes(upstream) == data
    (ack,) = emit(flow, T0 + 2)
    assert acked(guest, ack) == 3000


def test_receive_window_right_edge_moves_only_as_data_is_written() -> None:
    """Backpressure: the window is the room in a bounded buffer. While the host socket is
    slow the right edge (ack + window) stays put and bytes beyond it are not taken."""
    tcp = TcpSettings(mss=MSS, receive_buffer=4000)
    data = pattern(6000, seed=3)
    flow, guest = establish(Guest(wscale=None), tcp)
    for start in range(0, 5000, 1000):
        flow.guest_segment(guest.segment(ACK, data[start : start + 1000], position=start), T0)
    (ack,) = emit(flow, T0)
    assert (acked(guest, ack), ack.window) == (0, 4000)  # right edge at 4000
    assert flow.pending_upstream() == data[:4000]
    assert flow.stats["beyond_window"] == 1

    flow.upstream_written(1500, T0 + 1)
    (ack,) = emit(flow, T0 + 1)
    assert acked(guest, ack) + ack.window == 5500  # the edge moved by what was written
    flow.guest_segment(guest.segment(ACK, data[4000:6000], position=4000), T0 + 2)
    emit(flow, T0 + 2)
    assert flow.pending_upstream() == data[1500:5500]  # only up to the new edge


def test_upstream_room_shrinks_with_unacked_data_and_closes_at_eof() -> None:
    """The driver reads from the host only while the flow has room: what the guest has not
    acked counts against the send buffer (backpressure towards the server)."""
    tcp = TcpSettings(mss=MSS, send_buffer=10_000)
    guest = Guest()
    flow = TcpFlow(guest.syn(), tcp, T0, guest.relay_isn)
    flow.upstream_connected(T0)
    emit(flow, T0)
    assert flow.upstream_room() == 0  # no reading before the guest is there
    flow.guest_segment(guest.segment(), T0)
    assert flow.upstream_room() == 10_000
    flow.upstream_data(pattern(4000), T0)
    assert flow.upstream_room() == 6000
    guest.receive(emit(flow, T0))
    assert flow.upstream_room() == 6000  # sent is not acked
    flow.guest_segment(guest.segment(ack=1 + 2000), T0 + 0.1)
    assert flow.upstream_room() == 8000
    flow.guest_segment(guest.segment(), T0 + 0.2)
    assert flow.upstream_room() == 10_000
    flow.upstream_eof(T0 + 0.3)
    assert flow.upstream_room() == 0


# -- upstream → guest -------------------------------------------------------------------------


@pytest.mark.parametrize(("wscale", "field", "window"), [(None, 1000, 1000), (2, 1000, 4000)])
def test_sending_respects_the_guests_window(wscale: int | None, field: int, window: int) -> None:
    """Never more unacked data than the guest's window, scaled only when it offered scaling."""
    data = pattern(20_000, seed=4)
    guest = Guest(wscale=wscale, window=field)
    flow, guest = establish(guest)
    flow.upstream_data(data, T0)
    now = T0
    while len(guest.received) < len(data):
        before = len(guest.received)
        out = emit(flow, now)
        assert sum(len(segment.payload) for segment in out) == min(window, len(data) - before)
        assert emit(flow, now) == []  # the window is full
        guest.receive(out)
        now += 0.05
        flow.guest_segment(guest.segment(), now)
    assert guest.received == data


def test_zero_window_probes_back_off_and_sending_resumes_when_the_window_opens() -> None:
    """A guest that stops reading: the relay probes (not busy-looping: each deadline is in the
    future), backs off, and when the window opens the guest gets the stream without a hole."""
    data = pattern(8000, seed=5)
    flow, guest = establish(Guest(wscale=None))
    flow.upstream_data(data[:3000], T0)
    guest.receive(emit(flow, T0))
    now = T0 + 0.1
    flow.guest_segment(guest.segment(window=0), now)  # all acked, no room
    flow.upstream_data(data[3000:], now)
    assert emit(flow, now) == []
    probes: list[float] = []
    for _ in range(12):
        deadline = flow.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        flow.timer(now)
        deadline = flow.next_deadline()
        assert deadline is not None and deadline > now
        out = emit(flow, now)
        deadline = flow.next_deadline()
        assert deadline is not None and deadline > now
        for segment in out:
            assert len(segment.payload) == 1
            assert relay_offset(guest, segment) == guest.rcv_nxt  # the next byte, no further
            probes.append(now)
            # The guest has no room: it drops the byte and repeats its zero window.
            flow.guest_segment(guest.segment(window=0), now + 0.01)
            assert emit(flow, now + 0.01) == []
    assert flow.stats["zero_window_probes"] == len(probes) >= 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] > 2 * gaps[0]  # exponential backoff
    assert not flow.closed  # probes unanswered by room never count as retransmits

    # Right after a probe (so it is outstanding and was dropped), the guest reads: the window
    # opens, and the relay must send from the first unacked byte.
    deadline = flow.next_deadline()
    assert deadline is not None
    while flow.stats["zero_window_probes"] == len(probes):
        now = deadline
        flow.timer(now)
        out = emit(flow, now)
        deadline = flow.next_deadline()
        assert deadline is not None
    now += 0.01
    flow.guest_segment(guest.segment(window=0xFFFF), now)
    out = emit(flow, now)
    assert relay_offset(guest, out[0]) == guest.rcv_nxt  # the dropped probe byte first
    recoveries = flow.stats["fast_retransmits"] + flow.stats["timeouts"]
    while out:
        guest.receive(out)
        now += 0.05
        flow.guest_segment(guest.segment(), now)
        out = emit(flow, now)
    assert guest.received == data  # no hole to repair: no timer, no fast retransmit
    assert flow.stats["fast_retransmits"] + flow.stats["timeouts"] == recoveries


def test_zero_window_probe_accepted_then_window_reopens() -> None:
    """A guest that takes the probe byte: the relay carries on from the byte after it."""
    data = pattern(5000, seed=6)
    flow, guest = establish(Guest(wscale=None))
    flow.upstream_data(data[:1000], T0)
    guest.receive(emit(flow, T0))
    flow.guest_segment(guest.segment(window=0), T0 + 0.1)
    flow.upstream_data(data[1000:], T0 + 0.1)
    assert emit(flow, T0 + 0.1) == []
    deadline = flow.next_deadline()
    assert deadline is not None
    flow.timer(deadline)
    (probe,) = emit(flow, deadline)
    guest.receive([probe])
    assert guest.received == data[:1001]
    flow.guest_segment(guest.segment(window=0xFFFF), deadline + 0.01)
    out = emit(flow, deadline + 0.01)
    assert relay_offset(guest, out[0]) == 1002
    guest.receive(out)
    assert guest.received == data


def test_lost_segment_is_retransmitted_on_rto_with_backoff() -> None:
    """RFC 6298: a whole flight lost → resend from the first unacked byte after the RTO, and
    each further timeout doubles it (up to max_rto)."""
    data = pattern(3 * MSS, seed=7)
    flow, guest = establish()
    flow.upstream_data(data, T0)
    assert len(emit(flow, T0)) == 3  # all lost
    deadline = flow.next_deadline()
    assert deadline is not None and deadline == pytest.approx(T0 + SETTINGS.initial_rto)
    assert emit(flow, deadline - 0.01) == []
    flow.timer(deadline - 0.01)
    assert emit(flow, deadline - 0.01) == []  # not yet
    rtos: list[float] = []
    now = deadline
    for _ in range(4):
        flow.timer(now)
        (again,) = emit(flow, now)  # cwnd is one segment after a timeout
        assert relay_offset(guest, again) == 1
        assert again.payload == data[:MSS]
        deadline = flow.next_deadline()
        assert deadline is not None
        rtos.append(deadline - now)
        now = deadline
    assert rtos == pytest.approx([2.0, 4.0, 8.0, 16.0])
    assert flow.stats["timeouts"] == 4
    guest.receive([again])
    flow.guest_segment(guest.segment(), now)
    for _ in range(10):
        guest.receive(emit(flow, now))
        flow.guest_segment(guest.segment(), now)
    assert guest.received == data


def test_retransmit_limit_resets_both_sides() -> None:
    """A guest gone silent: after max_retransmits timeouts the flow gives up with an RST."""
    flow, _ = establish()
    flow.upstream_data(pattern(MSS), T0)
    emit(flow, T0)
    now, timeouts = T0, 0
    while not flow.closed:
        deadline = flow.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        flow.timer(now)
        out = emit(flow, now)
        timeouts += 1
    assert [segment.flags for segment in out] == [RST | ACK]
    assert timeouts == SETTINGS.max_retransmits + 1
    assert flow.close_reason == "retransmit_limit" and flow.reset_upstream
    assert now - T0 < 9 * SETTINGS.max_rto


def test_three_duplicate_acks_trigger_fast_retransmit_before_the_rto() -> None:
    """NewReno: the second segment lost, the guest's three duplicate ACKs (for segments 3-5)
    bring it back at once; two are not enough (they may be reordering)."""
    data = pattern(5 * MSS, seed=8)
    flow, guest = establish()
    flow.upstream_data(data, T0)
    out = emit(flow, T0)
    assert len(out) == 5
    guest.receive(out[:1])
    flow.guest_segment(guest.segment(), T0 + 0.05)
    assert emit(flow, T0 + 0.05) == []
    for _ in range(2):
        flow.guest_segment(guest.segment(), T0 + 0.06)
        assert emit(flow, T0 + 0.06) == []
    flow.guest_segment(guest.segment(), T0 + 0.07)
    (retransmit,) = emit(flow, T0 + 0.07)
    assert relay_offset(guest, retransmit) == 1 + MSS
    assert retransmit.payload == data[MSS : 2 * MSS]
    deadline = flow.next_deadline()
    assert deadline is not None and deadline > T0 + 0.07  # the RTO has not fired
    assert flow.stats["fast_retransmits"] == 1 and flow.stats["timeouts"] == 0
    guest.receive([retransmit, *out[2:]])
    flow.guest_segment(guest.segment(), T0 + 0.1)
    assert guest.received == data
    assert emit(flow, T0 + 0.1) == []
    assert flow.next_deadline() == pytest.approx(T0 + 0.1 + SETTINGS.idle_timeout)


@pytest.mark.parametrize("sack", [True, False])
def test_out_of_order_guest_data_is_reported_in_sack_blocks(sack: bool) -> None:
    """A guest that offered SACK learns which of its segments we keep (the latest one's block
    first, RFC 2018 §4), so it resends only the holes; a guest that did not, gets none."""
    data = pattern(5000, seed=14)
    flow, guest = establish(Guest(sack=sack))
    for start, end in [(1000, 2000), (3000, 3500), (3500, 4000)]:
        flow.guest_segment(guest.segment(ACK, data[start:end], position=start), T0)
    (ack,) = emit(flow, T0)
    assert acked(guest, ack) == 0
    if sack:
        assert ack.sack == (
            (guest.seq(3000), guest.seq(4000)),
            (guest.seq(1000), guest.seq(2000)),
        )
    else:
        assert ack.sack == ()
    flow.guest_segment(guest.segment(ACK, data[:1000], position=0), T0 + 0.1)
    flow.guest_segment(guest.segment(ACK, data[2000:3000], position=2000), T0 + 0.1)
    assert write_all(flow, T0 + 0.1) == data[:4000]
    (ack,) = emit(flow, T0 + 0.1)
    assert ack.sack == () and acked(guest, ack) == 4000


def test_guest_sack_blocks_guide_the_retransmission_of_a_second_hole() -> None:
    """Two segments lost in one window: after the fast retransmit of the first hole, the next
    duplicate ACK's SACK blocks send the second hole at once, not after another round trip."""
    data = pattern(8 * MSS, seed=15)
    flow, guest = establish()
    flow.upstream_data(data, T0)
    out = emit(flow, T0)
    assert len(out) == 8
    retransmitted: list[int] = []
    for index, segment in enumerate(out):
        if index in (1, 3):
            continue  # lost
        guest.receive([segment])
        flow.guest_segment(guest.segment(), T0 + 0.05)
        retransmitted += [relay_offset(guest, again) for again in emit(flow, T0 + 0.05)]
    assert retransmitted == [1 + MSS, 1 + 3 * MSS]  # both holes, before any timer
    assert flow.stats["fast_retransmits"] == 1 and flow.stats["sack_retransmits"] == 1
    assert flow.stats["timeouts"] == 0
    guest.receive(out[1:4:2])
    assert guest.received == bytes(data[: 8 * MSS]) and guest.kept == {}


def test_a_lost_fast_retransmission_is_resent_after_two_round_trips_not_the_rto() -> None:
    """The second segment lost and its fast retransmission too, every later one SACKed: no
    duplicate ACK is left to tell, so a timer two round trips after the retransmission resends
    it, long before the RTO, and recovery ends without a timeout."""
    data = pattern(6 * MSS, seed=21)
    flow, guest = establish()
    flow.upstream_data(data[:MSS], T0)
    guest.receive(emit(flow, T0))
    flow.guest_segment(guest.segment(), T0 + 0.01)  # a round trip of 10 ms measured
    flow.upstream_data(data[MSS:], T0 + 0.02)
    out = emit(flow, T0 + 0.02)
    assert len(out) == 5
    now = T0 + 0.03
    resent: list[Segment] = []
    for segment in out[1:]:
        guest.receive([segment])
        flow.guest_segment(guest.segment(), now)
        resent += emit(flow, now)
    assert [relay_offset(guest, again) for again in resent] == [1 + MSS]  # and it is lost
    deadline = flow.next_deadline()
    assert deadline is not None and deadline < now + SETTINGS.min_rto
    flow.timer(deadline)
    (again,) = emit(flow, deadline)
    assert again == resent[0]
    assert flow.stats["lost_retransmits"] == 1 and flow.stats["timeouts"] == 0
    guest.receive([again])
    flow.guest_segment(guest.segment(), deadline + 0.01)
    assert guest.received == data
    assert emit(flow, deadline + 0.01) == []


def test_sack_recovery_resends_every_hole_the_window_holds_in_one_round_trip() -> None:
    """Three holes in a window of ten: once the guest's SACKs show them, recovery resends all
    three within the same round trip (RFC 6675's pipe), not one per later duplicate ACK."""
    data = pattern(10 * MSS, seed=22)
    flow, guest = establish()
    flow.upstream_data(data, T0)
    out = emit(flow, T0)
    assert len(out) == 10
    lost = {1, 4, 7}
    resent: list[int] = []
    for index, segment in enumerate(out):
        if index in lost:
            continue
        guest.receive([segment])
        flow.guest_segment(guest.segment(), T0 + 0.05)
        resent += [relay_offset(guest, again) for again in emit(flow, T0 + 0.05)]
    assert sorted(resent) == [1 + index * MSS for index in sorted(lost)]
    assert flow.stats["fast_retransmits"] == 1 and flow.stats["timeouts"] == 0
    guest.receive([out[index] for index in sorted(lost)])
    assert guest.received == data


def test_tail_loss_probe_resends_a_lost_last_segment_before_the_rto() -> None:
    """The last segment of a response lost, nothing after it to cause duplicate ACKs: a probe
    about two round trips later resends it, well before the RTO, keeping the window."""
    data = pattern(3 * MSS, seed=16)
    flow, guest = establish()
    flow.upstream_data(data[: 2 * MSS], T0)
    guest.receive(emit(flow, T0))
    flow.guest_segment(guest.segment(), T0 + 0.1)  # a round trip of 0.1 s measured
    flow.upstream_data(data[2 * MSS :], T0 + 0.2)
    (lost,) = emit(flow, T0 + 0.2)
    deadline = flow.next_deadline()
    assert deadline is not None and T0 + 0.2 < deadline < T0 + 0.2 + SETTINGS.min_rto + 0.1
    flow.timer(deadline)
    (probe,) = emit(flow, deadline)
    assert probe == lost
    assert flow.stats["tail_probes"] == 1 and flow.stats["timeouts"] == 0
    guest.receive([probe])
    flow.guest_segment(guest.segment(), deadline + 0.1)
    assert guest.received == data
    assert emit(flow, deadline + 0.1) == []


# -- closing ----------------------------------------------------------------------------------


def test_guest_closes_first_then_upstream_then_flow_ends() -> None:
    """Guest FIN → the host socket is half-closed once all data is written (and only then is
    the FIN acked); the host can still answer; its EOF → our FIN; the last ACK ends the flow."""
    flow, guest = establish()
    flow.guest_segment(guest.send(b"request", fin=True), T0)
    assert state(flow) is TcpState.CLOSE_WAIT
    assert not flow.upstream_shutdown_wanted  # bytes still to write first
    (ack,) = emit(flow, T0)
    assert acked(guest, ack) == 0
    assert write_all(flow, T0) == b"request"
    assert flow.upstream_shutdown_wanted
    (ack,) = emit(flow, T0)
    assert acked(guest, ack) == 7  # the FIN waits for the host socket's shutdown
    flow.upstream_shutdown_done()
    assert not flow.upstream_shutdown_wanted
    (ack,) = emit(flow, T0)
    assert acked(guest, ack) == 8

    assert flow.upstream_room() > 0  # half-closed: the host still talks
    flow.upstream_data(b"response", T0 + 1)
    flow.upstream_eof(T0 + 1)
    assert flow.upstream_room() == 0
    (last,) = emit(flow, T0 + 1)
    assert last.payload == b"response" and last.flags & FIN
    assert state(flow) is TcpState.LAST_ACK
    guest.receive([last])
    assert guest.fin_received
    flow.guest_segment(guest.segment(), T0 + 1.1)
    assert emit(flow, T0 + 1.1) == []
    assert state(flow) is TcpState.CLOSED and flow.closed
    assert flow.close_reason == "fin" and not flow.reset_upstream
    assert flow.next_deadline() is None


def test_upstream_closes_first_then_time_wait_expires() -> None:
    """Host EOF → FIN after the data; the guest may keep sending (half-close); its FIN is
    acked after the host shutdown, then TIME_WAIT re-acks a repeated FIN and expires."""
    flow, guest = establish()
    flow.upstream_data(b"bye", T0)
    flow.upstream_eof(T0)
    (fin,) = emit(flow, T0)
    assert fin.payload == b"bye" and fin.flags & FIN
    assert state(flow) is TcpState.FIN_WAIT_1
    guest.receive([fin])
    flow.guest_segment(guest.segment(), T0 + 0.1)
    assert state(flow) is TcpState.FIN_WAIT_2

    flow.guest_segment(guest.send(b"still talking"), T0 + 0.2)
    assert write_all(flow, T0 + 0.2) == b"still talking"
    flow.guest_segment(guest.send(b"", fin=True), T0 + 0.3)
    assert flow.upstream_shutdown_wanted
    (ack,) = emit(flow, T0 + 0.3)
    assert acked(guest, ack) == 13
    flow.upstream_shutdown_done()
    (ack,) = emit(flow, T0 + 0.3)
    assert acked(guest, ack) == 14
    assert state(flow) is TcpState.TIME_WAIT
    assert flow.next_deadline() == pytest.approx(T0 + 0.3 + SETTINGS.time_wait)

    flow.timer(T0 + 5)
    assert state(flow) is TcpState.TIME_WAIT
    flow.guest_segment(guest.segment(FIN | ACK, position=13), T0 + 5)  # our ACK was lost
    (ack,) = emit(flow, T0 + 5)
    assert acked(guest, ack) == 14 and ack.flags == ACK
    assert write_all(flow, T0 + 5) == b""
    deadline = flow.next_deadline()
    assert deadline is not None and deadline > T0 + 5
    flow.timer(deadline)
    assert state(flow) is TcpState.CLOSED
    assert flow.close_reason == "fin" and not flow.reset_upstream
    assert flow.next_deadline() is None


def test_data_after_the_guests_fin_is_ignored() -> None:
    """Nothing follows a FIN (RFC 9293 3.10.7.4: ignore the text). Text claiming to sit after
    it must neither reach the host socket nor skew what the relay acknowledges."""
    flow, guest = establish()
    flow.guest_segment(guest.send(b"abc", fin=True), T0)
    assert write_all(flow, T0) == b"abc"
    flow.guest_segment(guest.segment(ACK, b"xyz", position=4), T0)  # right after the FIN
    assert flow.pending_upstream() == b""
    assert flow.upstream_shutdown_wanted
    flow.upstream_shutdown_done()
    (ack,) = emit(flow, T0)
    assert acked(guest, ack) == 4


def test_old_fin_below_received_data_is_not_taken() -> None:
    """A FIN at position 3 arriving after bytes up to 6 (an inconsistent guest) must not be
    taken as a FIN at 6: the relay would half-close the host at the wrong place."""
    flow, guest = establish()
    flow.guest_segment(guest.segment(ACK, b"abcdef", position=0), T0)
    flow.guest_segment(guest.segment(FIN | ACK, b"abc", position=0), T0)
    assert write_all(flow, T0) == b"abcdef"
    assert not flow.upstream_shutdown_wanted
    assert state(flow) is TcpState.ESTABLISHED


# -- resets -----------------------------------------------------------------------------------


def test_guest_rst_in_window_resets_upstream() -> None:
    """The guest's RST at the expected sequence closes the flow and asks the driver to reset
    the host socket; an RST is never answered."""
    flow, guest = establish()
    flow.guest_segment(guest.send(b"partial"), T0)
    flow.guest_segment(guest.segment(RST | ACK), T0 + 1)
    assert flow.closed and state(flow) is TcpState.CLOSED
    assert flow.reset_upstream
    assert flow.close_reason == "guest_rst"
    assert emit(flow, T0 + 1) == []
    assert flow.pending_upstream() == b""
    assert flow.upstream_room() == 0


@pytest.mark.parametrize("position", [-100, 300_000, 2**31])
def test_guest_rst_out_of_window_is_dropped(position: int) -> None:
    """RFC 5961: a blind RST outside the window is dropped without an answer."""
    flow, guest = establish()
    flow.guest_segment(guest.segment(RST, position=position), T0)
    assert not flow.closed and not flow.reset_upstream
    assert flow.stats["rst_out_of_window"] == 1
    assert emit(flow, T0) == []
    flow.guest_segment(guest.send(b"still here"), T0 + 1)
    assert flow.pending_upstream() == b"still here"


def test_guest_rst_in_window_but_not_exact_gets_a_challenge_ack_then_the_exact_one_resets() -> None:
    """RFC 5961: inside the window but not at the expected sequence, an RST gets a challenge
    ACK; the guest's answer, an RST at that ACK's number, then resets the flow."""
    flow, guest = establish()
    flow.guest_segment(guest.segment(RST, position=5000), T0)
    assert not flow.closed and flow.stats["rst_challenged"] == 1
    (challenge,) = emit(flow, T0)
    assert challenge.flags == ACK and acked(guest, challenge) == 0
    flow.guest_segment(guest.segment(RST, position=acked(guest, challenge)), T0 + 0.01)
    assert flow.closed and flow.reset_upstream and flow.close_reason == "guest_rst"


def test_guest_rst_at_the_acknowledged_sequence_resets_with_data_unwritten() -> None:
    """Data received but not yet written upstream is not acknowledged: an RST at our ACK
    number (how a stack answers a challenge ACK) is exact too."""
    flow, guest = establish()
    flow.guest_segment(guest.send(b"unwritten"), T0)
    flow.guest_segment(guest.segment(RST, position=0), T0 + 0.01)
    assert flow.closed and flow.close_reason == "guest_rst"


def test_upstream_reset_resets_the_guest() -> None:
    """The host reset its side: the guest gets an RST at our next sequence number, and the
    driver need not reset the host again."""
    flow, guest = establish()
    flow.upstream_data(b"x" * 100, T0)
    guest.receive(emit(flow, T0))
    flow.upstream_reset(T0 + 1)
    (rst,) = emit(flow, T0 + 1)
    assert rst.flags == RST | ACK
    assert relay_offset(guest, rst) == 101
    assert flow.closed and flow.close_reason == "upstream_rst"
    assert not flow.reset_upstream


def test_abort_resets_both_sides() -> None:
    flow, guest = establish()
    flow.abort(T0)
    (rst,) = emit(flow, T0)
    assert rst.flags == RST | ACK and relay_offset(guest, rst) == 1
    assert flow.closed and flow.reset_upstream and flow.close_reason == "aborted"


# -- wrap-around ------------------------------------------------------------------------------


def test_sequence_numbers_wrap_in_both_directions() -> None:
    """Both initial sequence numbers a few bytes below 2**32: data crossing zero, in and out of
    order, arrives intact and every ACK is right."""
    guest = Guest(isn=MOD - 10, relay_isn=MOD - 3)
    flow, guest = establish(guest)
    up = pattern(40, seed=9)
    for start in (0, 16, 8, 24, 32):  # positions 9 onwards are past the wrap
        flow.guest_segment(guest.segment(ACK, up[start : start + 8], position=start), T0)
    assert write_all(flow, T0) == up
    (ack,) = emit(flow, T0)
    assert ack.ack == (MOD - 10 + 1 + 40) % MOD == 31
    assert acked(guest, ack) == 40

    down = pattern(5 * MSS, seed=10)
    flow.upstream_data(down, T0)
    out = emit(flow, T0)
    assert out[0].seq == MOD - 2 and out[1].seq == MSS - 2  # the second one wrapped
    guest.receive([out[0], *out[2:]])  # the second one lost: one new ACK, three duplicates
    for _ in range(4):
        flow.guest_segment(guest.segment(), T0 + 0.1)
    (retransmit,) = emit(flow, T0 + 0.1)
    assert relay_offset(guest, retransmit) == 1 + MSS
    guest.receive([retransmit, *out[2:]])
    flow.guest_segment(guest.segment(), T0 + 0.2)
    assert guest.received == down
    assert flow.stats["ack_of_unsent"] == 0
    flow.guest_segment(guest.segment(RST, position=40), T0 + 0.3)  # in window, past the wrap
    assert flow.close_reason == "guest_rst"


# -- properties -------------------------------------------------------------------------------

STREAM = pattern(2500, seed=11)
UPSTREAM = pattern(6000, seed=12)
HYPOTHESIS_SETTINGS = settings(max_examples=200, deadline=None)


def stream_at(position: int, length: int) -> bytes:
    """The guest's true bytes at ``position``: :data:`STREAM`, then a formula for ever (also
    "before" the stream, for segments that overlap the SYN)."""
    return bytes(
        STREAM[p] if 0 <= p < len(STREAM) else (p * 7 + (p >> 8) * 13 + 5) & 0xFF
        for p in range(position, position + length)
    )


@dataclass(frozen=True)
class Send:
    """A guest segment: payload true to the stream at its position, anything else random.

    The position is ``position`` bytes after what the relay has acknowledged (where a real
    guest resends from; negative: old data), or anywhere in the sequence space if ``far``,
    so segments fall before, in and beyond the window, overlapping in every way. ``ack`` and
    the SACK edges count back from the highest relay offset sent so far (so most are
    plausible, some ahead of what was sent), unless ``ack_raw``: then ``ack`` is the relay
    offset itself.
    """

    position: int
    far: bool
    length: int
    flags: int
    ack: int
    ack_raw: bool
    window: int
    sack: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Write:
    """The host socket takes up to ``count`` bytes (then the shutdown, if it is wanted)."""

    count: int


@dataclass(frozen=True)
class Upstream:
    count: int
    eof: bool


@dataclass(frozen=True)
class Wait:
    """Time passes; the timer runs if a deadline has come."""

    seconds: float


Action = Send | Write | Upstream | Wait

back = st.one_of(st.just(0), st.integers(-2, 400))
RARE_FLAGS = (RST, FIN | RST, SYN, SYN, URG, URG, PSH, PSH, FIN, FIN, FIN, FIN, FIN, FIN)
"""Flags beside ACK, one segment in 120 each (an RST in the window ends the run, so rare)."""
extra_flags = st.integers(0, 119).map(lambda n: RARE_FLAGS[n] if n < len(RARE_FLAGS) else 0)
sends = st.builds(
    Send,
    position=st.one_of(st.just(0), st.integers(-300, 2000), st.integers(-(2**31), 2**31)),
    far=st.integers(0, 7).map(lambda n: n == 0),
    length=st.one_of(st.just(0), st.integers(0, 300)),  # many pure ACKs: duplicates
    flags=st.builds(lambda extra, n: extra | (ACK if n else 0), extra_flags, st.integers(0, 7)),
    ack=st.one_of(back, st.integers(0, MOD - 1)),
    ack_raw=st.integers(0, 7).map(lambda n: n == 0),
    window=st.one_of(st.sampled_from([0, 1000, 0xFFFF]), st.integers(0, 0xFFFF)),
    sack=st.lists(st.tuples(back, back), max_size=4).map(tuple),
)
actions: st.SearchStrategy[Action] = st.one_of(
    sends,
    sends,
    st.builds(Write, st.integers(0, 1000)),
    st.builds(Upstream, st.integers(0, 2000), st.integers(0, 9).map(lambda n: n == 0)),
    st.builds(Wait, st.floats(0.0, 4.0)),
)


@HYPOTHESIS_SETTINGS
@given(
    wscale=st.sampled_from([None, 0, 2, 14]),
    receive_buffer=st.sampled_from([1500, 100_000]),
    handshake_ack=st.booleans(),
    script=st.lists(actions, min_size=20, max_size=80),
)
def test_random_guest_segments_keep_the_stream_intact(
    wscale: int | None, receive_buffer: int, handshake_ack: bool, script: list[Action]
) -> None:
    """Whatever the guest sends (out of window, duplicated, reordered, lost, with random FIN,
    RST, SYN, ACK numbers and SACK blocks), the flow raises nothing, and:

    * the bytes it hands upstream are always a prefix of the guest's true stream;
    * it never acknowledges a byte not yet written to the host (nor a FIN before shutdown);
    * it only half-closes the host where the guest put a FIN, and nothing follows;
    * what it sends the guest is the host's stream, in MSS-sized segments;
    * once the timer has run at ``now`` (and its output is sent, as the driver's pump does)
      the next deadline is later than ``now``: the timer task never spins.
    """
    tcp = TcpSettings(
        mss=100,
        receive_buffer=receive_buffer,
        send_buffer=3000,
        initial_cwnd_segments=4,
        max_burst=4,
    )
    guest = Guest(isn=MOD - 700, relay_isn=MOD - 1500, mss=120, wscale=wscale)
    flow = TcpFlow(guest.syn(), tcp, T0, guest.relay_isn)
    now = T0
    flow.upstream_connected(now)
    delivered = bytearray()
    fin_ends: set[int] = set()
    shut_down = False
    upstream_sent = 0
    eof = False
    seen = 0  # the highest relay offset sent to the guest
    una = 0  # the guest's stream acknowledged by the relay

    def check_output() -> None:
        nonlocal seen, una
        for segment in emit(flow, now):
            seen = max(seen, relay_offset(guest, segment) + segment.seg_len)
            una = max(una, acked(guest, segment))
            assert len(segment.payload) <= 100 and segment.window <= 0xFFFF
            assert acked(guest, segment) <= len(delivered) + (1 if shut_down else 0)
            if segment.payload:
                start = relay_offset(guest, segment) - 1
                assert segment.payload == UPSTREAM[start : start + len(segment.payload)]

    check_output()
    if handshake_ack:
        flow.guest_segment(guest.segment(), now)
        check_output()
    for action in script:
        if isinstance(action, Send):
            position = action.position if action.far else una + action.position
            payload = stream_at(position, action.length)
            if action.flags & FIN:
                fin_ends.add(position + action.length)
            segment = guest.segment(
                action.flags,
                payload,
                position=position,
                ack=action.ack if action.ack_raw else seen - action.ack,
                window=action.window,
                sack=tuple((seen - left, seen - right) for left, right in action.sack),
            )
            flow.guest_segment(segment, now)
        elif isinstance(action, Write):
            pending = flow.pending_upstream()
            count = min(action.count, len(pending))
            delivered += pending[:count]
            flow.upstream_written(count, now)
            if not flow.pending_upstream() and flow.upstream_shutdown_wanted:
                assert len(delivered) in fin_ends
                flow.upstream_shutdown_done()
                shut_down = True
        elif isinstance(action, Upstream):
            count = min(action.count, flow.upstream_room(), len(UPSTREAM) - upstream_sent)
            if count > 0:
                flow.upstream_data(UPSTREAM[upstream_sent : upstream_sent + count], now)
                upstream_sent += count
            if action.eof and not flow.closed:
                flow.upstream_eof(now)
                eof = True
        else:
            now += action.seconds
            deadline = flow.next_deadline()
            if deadline is not None and deadline <= now:
                flow.timer(now)
                check_output()
                deadline = flow.next_deadline()
                assert deadline is None or deadline > now, "the timer task would spin"
        check_output()
        pending = flow.pending_upstream()
        assert bytes(delivered + pending) == stream_at(0, len(delivered) + len(pending))
        if shut_down:
            assert pending == b""
        if eof or flow.closed:
            assert flow.upstream_room() == 0
        if flow.closed:
            assert state(flow) is TcpState.CLOSED and flow.next_deadline() is None


@HYPOTHESIS_SETTINGS
@given(drops=st.lists(st.booleans(), max_size=80), reorder=st.booleans())
def test_lossy_link_to_the_guest_delivers_everything(drops: list[bool], reorder: bool) -> None:
    """Relay → guest over a link that drops (and maybe reverses) segments by a script, then
    stops dropping: RTOs, fast and SACK-guided retransmits, tail probes and go-back-N get the
    whole stream across, and the FIN after it, never beyond the guest's window."""
    tcp = TcpSettings(mss=200, initial_cwnd_segments=4, max_retransmits=100, max_burst=8)
    data = pattern(6000, seed=13)
    flow, guest = establish(Guest(mss=200, wscale=None, window=3000), tcp)
    flow.upstream_data(data, T0)
    flow.upstream_eof(T0)
    losses = iter(drops)
    now = T0
    for _ in range(3000):
        out = emit(flow, now)
        deadline = flow.next_deadline()  # due timers ran just before: none is due again
        assert deadline is not None and deadline > now
        for segment in out:  # never beyond the window the guest last advertised
            end = relay_offset(guest, segment) + len(segment.payload)
            assert end <= guest.rcv_nxt + 3000
        if reorder:
            out.reverse()
        now += 0.01  # the link's delay; each arrival is acked at once
        for segment in out:
            if not next(losses, False):
                guest.receive([segment])
                flow.guest_segment(guest.segment(), now)
        if guest.fin_received and state(flow) is TcpState.FIN_WAIT_2:
            break
        deadline = flow.next_deadline()
        assert deadline is not None
        if not out and deadline > now:  # nothing in transit: wait for the timer
            now = deadline
        if deadline <= now:
            flow.timer(now)
    assert guest.received == data
    assert guest.fin_received
    assert not flow.closed


# -- the segment codec ------------------------------------------------------------------------

segments = st.builds(
    Segment,
    sport=st.integers(0, 0xFFFF),
    dport=st.integers(0, 0xFFFF),
    seq=st.integers(0, MOD - 1),
    ack=st.integers(0, MOD - 1),
    flags=st.integers(0, 0x3F),
    window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=64),
    mss=st.none() | st.integers(0, 0xFFFF),
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
)


@HYPOTHESIS_SETTINGS
@given(data=st.binary(max_size=120), verify=st.booleans())
def test_parse_arbitrary_bytes_returns_a_segment_or_raises_bad_segment(
    data: bytes, verify: bool
) -> None:
    """Untrusted bytes: a Segment or BadSegment with a bounded reason, never anything else."""
    reason: str | None = None
    try:
        segment = parse_segment(GUEST_IP, SERVER_IP, data, verify_checksum=verify)
    except BadSegment as exc:
        reason = exc.reason
    else:
        assert data.endswith(segment.payload)
        assert segment.flags <= 0x3F
    assert reason is None or reason in BAD_SEGMENT_REASONS


@HYPOTHESIS_SETTINGS
@given(
    header=st.binary(min_size=20, max_size=20),
    options=st.binary(max_size=40),
    payload=st.binary(max_size=20),
)
def test_parse_arbitrary_options_with_a_valid_checksum(
    header: bytes, options: bytes, payload: bytes
) -> None:
    """Option parsing behind a consistent data offset and a correct checksum: garbage options
    are BadSegment("tcp_option") or skipped, never an IndexError."""
    options += b"\x00" * (-len(options) % 4)
    offset = ((20 + len(options)) // 4) << 4
    data = bytearray(header[:12] + bytes([offset]) + header[13:16] + b"\0\0" + header[18:])
    data += options + payload
    pseudo = SERVER_IP + GUEST_IP + bytes([0, 6]) + len(data).to_bytes(2, "big")
    data[16:18] = internet_checksum(pseudo + bytes(data)).to_bytes(2, "big")
    reason: str | None = None
    try:
        segment = parse_segment(SERVER_IP, GUEST_IP, bytes(data))
    except BadSegment as exc:
        reason = exc.reason
    else:
        assert segment.payload == payload
        assert segment.wscale is None or 0 <= segment.wscale <= 14
    assert reason in (None, "tcp_option")


@HYPOTHESIS_SETTINGS
@given(segment=segments, corrupt=st.integers(0, 200), mask=st.integers(1, 255))
def test_build_then_parse_round_trips_and_any_corruption_is_caught(
    segment: Segment, corrupt: int, mask: int
) -> None:
    """What the relay builds the guest parses back exactly (the checksum covers the real IPv4
    pseudo-header), and one flipped byte, or the wrong address, is a BadSegment."""
    data = build_segment(SERVER_IP, GUEST_IP, segment)
    assert parse_segment(SERVER_IP, GUEST_IP, data) == segment
    index = corrupt % len(data)
    broken = data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]
    with pytest.raises(BadSegment):
        parse_segment(SERVER_IP, GUEST_IP, broken)
    other = bytes((10, 0, 2, 16))
    with pytest.raises(BadSegment, match="checksum"):
        parse_segment(SERVER_IP, other, data)
