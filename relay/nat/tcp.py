"""One guest TCP connection terminated by the relay, sans-IO: segments and host bytes in,
segments and host bytes out, ``now`` passed in.

The guest talks to this state machine; a driver (:mod:`relay.nat.tcp_flows`) owns the host
socket and shuttles bytes. What users feel is here, so it is built for loss:

* the SYN-ACK waits for the host ``connect`` (refused → RST, unreachable → ICMP);
* the guest's bytes are ACKed only once written to the host socket, so ACKed data is never
  lost, and the window is the room left in a bounded buffer (backpressure to the guest);
* out-of-order segments are kept (bounded by the window) and delivered upstream in order,
  exactly once;
* SACK (RFC 2018) when the guest offers it: our ACKs carry blocks for the out-of-order data
  we keep, so the guest's stack repairs several losses per round trip (and Linux may use
  RACK and tail loss probes); its SACK blocks tell us which holes to resend first;
* towards the guest: its window (scaled if both sides agreed), slow start and congestion
  avoidance, RFC 6298 RTO with Karn's rule and backoff, fast retransmit with RFC 6675
  pipe-based SACK recovery (NewReno without SACK), a loss response sized from the delivery
  rate (:mod:`relay.delivery_rate`), zero-window probes, and pacing in bursts so an
  emulated NIC with a small RX ring is not flooded;
* FIN half-close both ways, RST both ways (RFC 5961's exact-sequence rule for the guest's),
  a short TIME_WAIT, idle and half-open timeouts.

Sequence numbers are kept as unbounded offsets from each side's initial number (the SYN is
offset 0), so no comparison anywhere has to think about wrap-around.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum

from relay.delivery_rate import DeliveryRate
from relay.nat.tcp_scoreboard import Scoreboard
from relay.nat.tcp_segment import ACK, FIN, MAX_SACK_BLOCKS, PSH, RST, SYN, Segment

MOD = 1 << 32
DEFAULT_MSS = 536
MAX_WINDOW = 0xFFFF
PENDING_CHUNK = 65536
"""At most this much of the guest's data is handed to the driver per write."""
TRIM_AT = 65536
"""Bytes acked (or written) before a buffer is compacted (a memmove per trim)."""
REORDER_SLACK = 0.005
"""Seconds beyond 1.5 round trips before a resent head segment counts as lost again."""
MIN_PROBE = 0.01
"""The tail loss probe waits at least this long."""
DELAYED_ACK = 0.04
"""Linux's shortest delayed ACK: added to the probe's wait when a lone segment is in flight
(RFC 8985 §7.2), so a guest that delays its ACK is not probed for nothing."""


class TcpState(Enum):
    SYN_RECEIVED_WAIT_CONNECT = "syn-received-wait-connect"
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    CLOSE_WAIT = "close-wait"
    LAST_ACK = "last-ack"
    FIN_WAIT_1 = "fin-wait-1"
    FIN_WAIT_2 = "fin-wait-2"
    CLOSING = "closing"
    TIME_WAIT = "time-wait"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class TcpSettings:
    mss: int = 896
    """Largest payload to the guest (guest MTU - 40), also our SYN-ACK's MSS option."""
    receive_buffer: int = 256 * 1024
    send_buffer: int = 256 * 1024
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 30.0
    max_retransmits: int = 8
    syn_ack_retries: int = 5
    time_wait: float = 10.0
    idle_timeout: float = 7440.0
    """RFC 5382: an established connection lives 2 h 4 min without traffic."""
    half_open_timeout: float = 30.0
    initial_cwnd_segments: int = 10
    max_burst: int = 16


def _signed(delta: int) -> int:
    """``delta`` mod 2**32 as a signed distance."""
    delta %= MOD
    return delta - MOD if delta >= MOD // 2 else delta


class TcpFlow:
    """The relay's end of one guest connection (see the module docstring)."""

    def __init__(self, syn: Segment, settings: TcpSettings, now: float, isn: int) -> None:
        self.settings = settings
        self.sport, self.dport = syn.dport, syn.sport  # ours is the outside port
        self.stats: Counter[str] = Counter()
        self.unreachable = False
        self.reset_upstream = False
        self.close_reason: str | None = None
        self.closed = False
        self._created = now
        self._last_activity = now
        self._connected = False
        self._established = False
        # Receive side (guest → upstream), offsets from the guest's ISN.
        self._irs = syn.seq
        self._rcv_nxt = 1
        self._rx = bytearray()
        self._rx_start = 0  # bytes of _rx already written upstream
        self._rcv_written = 1
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._last_ooo = 0  # offset of the latest out-of-order segment: our first SACK block
        self._sack_ok = syn.sack_permitted
        self._fin_in: int | None = None  # offset of the guest's FIN once in order
        self._fin_in_acked = False
        self._shutdown_done = False
        # Window scaling (RFC 7323): only if the guest offered it.
        self._snd_shift = syn.wscale if syn.wscale is not None else 0
        buffer = settings.receive_buffer
        shift = 0
        if syn.wscale is not None:
            while buffer >> shift > MAX_WINDOW:
                shift += 1
        else:
            buffer = min(buffer, MAX_WINDOW)
        self._rcv_shift = shift
        self._rcv_buffer = buffer
        self._offered_wscale = syn.wscale is not None
        # Send side (upstream → guest), offsets from our ISN.
        self._iss = isn % MOD
        self.mss = max(64, min(settings.mss, syn.mss or DEFAULT_MSS))
        self._tx = bytearray()
        self._tx_base = 1  # offset of _tx[0]
        self._tx_end = 1  # offset after the last byte read from upstream
        self._snd_una = 0
        self._snd_nxt = 0
        self._snd_max = 0
        self._snd_wnd = syn.window
        self._wl1 = 0
        self._wl2 = 0
        self._fin_out = False  # upstream EOF: a FIN follows the data
        self._fin_sent = False
        self._cwnd = settings.initial_cwnd_segments * self.mss
        self._ssthresh = 1 << 30
        self._dupacks = 0
        self._recover: int | None = None
        self._board = Scoreboard()  # the guest's SACK blocks; holes resent in recovery
        self._head_rexmit_at: float | None = None  # when snd_una was last resent, in recovery
        self._probe_at: float | None = None  # tail loss probe (RFC 8985 §7, simplified)
        self._rate = DeliveryRate()
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = settings.initial_rto
        self._retries = 0
        self._rto_at: float | None = None
        self._timed: tuple[int, float] | None = None
        self._persist_at: float | None = None
        self._pace_until = 0.0
        self._time_wait_until: float | None = None
        self._they_closed_first = False
        # Output.
        self._out: list[Segment] = []
        self._ack_due = False
        self._synack_due = False

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> TcpState:
        if self.closed:
            return TcpState.CLOSED
        if self._time_wait_until is not None:
            return TcpState.TIME_WAIT
        if not self._connected:
            return TcpState.SYN_RECEIVED_WAIT_CONNECT
        if not self._established:
            return TcpState.SYN_RECEIVED
        fin_in = self._fin_in is not None
        fin_acked = self._fin_sent and self._snd_una > self._tx_end
        if not self._fin_sent:
            return TcpState.CLOSE_WAIT if fin_in else TcpState.ESTABLISHED
        if fin_in:
            return TcpState.LAST_ACK if self._they_closed_first else TcpState.CLOSING
        return TcpState.FIN_WAIT_2 if fin_acked else TcpState.FIN_WAIT_1

    def _close(self, reason: str, *, reset_upstream: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.reset_upstream = self.reset_upstream or reset_upstream
            self._ack_due = False

    def _rst(self) -> None:
        self._out.append(self._segment(RST | ACK, self._snd_nxt))

    def abort(self, now: float) -> None:
        """The relay wants the flow gone: RST to the guest and the host."""
        if self.closed:
            return
        if self._connected:
            self._rst()
        self._close("aborted", reset_upstream=True)

    # -- segments from the guest ----------------------------------------------------------------

    def _offset_in(self, seq: int) -> int:
        return self._rcv_nxt + _signed(seq - (self._irs + self._rcv_nxt))

    def _offset_out(self, ack: int) -> int:
        return self._snd_una + _signed(ack - (self._iss + self._snd_una))

    def guest_segment(self, segment: Segment, now: float) -> None:
        if self.closed:
            return
        self._last_activity = now
        flags = segment.flags
        if flags & SYN:
            if not flags & ACK and segment.seq == self._irs:
                if self._connected and not self._established:
                    self._synack_due = True
                    self.stats["syn_retransmitted"] += 1
                elif self._established:
                    self._ack_due = True
                return
            self.stats["bad_syn"] += 1
            self._ack_due = self._established
            return
        seq = self._offset_in(segment.seq)
        if flags & RST:
            self._guest_rst(seq)
            return
        if not self._connected:
            return  # nothing to talk about before the SYN-ACK
        if not flags & ACK:
            self.stats["no_ack"] += 1
            return
        if not self._ack(segment, seq, now):
            return
        if self.closed:
            return
        if segment.payload or flags & FIN:
            self._receive(seq, segment.payload, bool(flags & FIN), now)

    def _guest_rst(self, seq: int) -> None:
        """RFC 5961 §3.2: an RST resets only at exactly the next expected sequence (what we
        received, or what we acknowledged: the guest answers a challenge ACK with an RST at
        its ACK number); elsewhere in the window it gets a challenge ACK, outside it is
        dropped. A blind attacker must then guess the sequence exactly."""
        acked = self._rcv_written + (1 if self._fin_in_acked else 0)
        right = self._rcv_written + self._rcv_buffer
        if seq in (self._rcv_nxt, acked):
            self._close("guest_rst", reset_upstream=True)
        elif acked <= seq < max(right, self._rcv_nxt + 1):
            self.stats["rst_challenged"] += 1
            self._ack_due = self._established
        else:
            self.stats["rst_out_of_window"] += 1

    def _ack(self, segment: Segment, seq: int, now: float) -> bool:
        """Process the ACK field; False if the segment must be dropped."""
        ack = self._offset_out(segment.ack)
        if ack > self._snd_max:
            self.stats["ack_of_unsent"] += 1
            self._ack_due = True
            return False
        if not self._established:
            if ack < 1:
                self.stats["bad_ack"] += 1
                return False
            self._established = True
            self._retries = 0
        window = segment.window << self._snd_shift
        if segment.sack and self._sack_ok:
            self._update_scoreboard(segment)
        if ack > self._snd_una:
            self._new_ack(ack, now)
        elif (
            ack == self._snd_una
            and not segment.payload
            and not segment.flags & FIN
            # RFC 5681 wants the window unchanged, but a Linux guest's window grows while it
            # tunes its buffer: an ACK with SACK blocks is a duplicate whatever its window.
            and (window == self._snd_wnd or bool(segment.sack))
            and self._snd_max > self._snd_una
        ):
            self._duplicate_ack(now)
        delivered = self._snd_una + self._board.sacked_bytes()
        self._rate.on_delivered(delivered, now)
        if seq > self._wl1 or (seq == self._wl1 and ack >= self._wl2):
            opened = window > self._snd_wnd
            if opened and not self._snd_wnd:
                # A zero window opens: what it did not ack (the probe byte) lay beyond it and
                # was dropped, so send from snd_una again rather than leave a hole to repair.
                self._snd_nxt = self._snd_una
            self._snd_wnd, self._wl1, self._wl2 = window, seq, ack
            if opened or window:
                self._persist_at = None
        return True

    def _new_ack(self, ack: int, now: float) -> None:
        acked = ack - self._snd_una
        if self._timed is not None and ack > self._timed[0]:
            self._rtt_sample(now - self._timed[1])
            self._timed = None
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        self._board.acked(ack)
        self._retries = 0
        if self._recover is not None:
            if ack >= self._recover:
                self._cwnd = self._ssthresh  # full ACK: recovery over
                self._recover = None
                self._head_rexmit_at = None
                self._board.end_recovery()
            elif self._board.blocks:  # partial ACK: the holes above are resent by the pipe
                self._head_rexmit_at = self._board.resent_at.get(ack)
            else:  # partial ACK, nothing SACKed above (NewReno): the next segment is lost too
                self._retransmit_first(now)
                self._cwnd = max(self.mss, self._cwnd - acked + self.mss)
        elif self._cwnd < self._ssthresh:
            self._cwnd += min(acked, self.mss)
        else:
            self._cwnd += max(1, self.mss * self.mss // self._cwnd)
        self._dupacks = 0
        self._rto_at = now + self._rto if self._snd_max > self._snd_una else None
        self._arm_probe(now)
        self._trim_tx()

    def _duplicate_ack(self, now: float) -> None:
        self._dupacks += 1
        self.stats["dup_acks"] += 1
        if self._dupacks == 3 and self._recover is None:
            flight = self._snd_max - self._snd_una
            self._ssthresh = self._rate.loss_window(flight, 2 * self.mss)
            # With SACK the pipe estimate (RFC 6675) paces recovery; without, NewReno's
            # inflation by the three segments that left the network.
            self._cwnd = self._ssthresh + (0 if self._board.blocks else 3 * self.mss)
            self._recover = self._snd_max
            self._probe_at = None
            self.stats["fast_retransmits"] += 1
            self._retransmit_first(now)
        elif self._dupacks > 3:
            if not self._board.blocks:
                self._cwnd += self.mss
            if self._head_retransmit_lost(now):
                self.stats["lost_retransmits"] += 1
                self._retransmit_first(now)

    def _arm_probe(self, now: float) -> None:
        """Two round trips after the last progress, resend the first unacked segment: by then
        it is lost (a hole below SACKed data, or a tail nothing followed), and the probe
        repairs it without the RTO's wait and its collapse of the congestion window. In
        recovery the same wait runs from the head's retransmission: when that copy is lost
        too and everything after it is SACKed, no duplicate ACK is left to say so."""
        self._probe_at = None
        if self._srtt is None or self._snd_max <= self._snd_una:
            return
        wait = max(2 * self._srtt, MIN_PROBE)
        if self._recover is not None:
            if self._head_rexmit_at is not None:
                self._probe_at = self._head_rexmit_at + wait
            return
        if self._snd_max - self._snd_una <= self.mss:
            wait += DELAYED_ACK
        probe_at = now + wait
        if self._rto_at is None or probe_at < self._rto_at:
            self._probe_at = probe_at

    def _on_probe(self, now: float) -> None:
        self._probe_at = None
        if self._snd_max <= self._snd_una:
            return
        if self._recover is not None:
            self.stats["lost_retransmits"] += 1
            self._retransmit_first(now)
        elif self._snd_wnd:
            self.stats["tail_probes"] += 1
            self.stats["retransmits"] += 1
            self._timed = None
            self._out.append(self._data_segment(self._snd_una, self.mss))

    def _head_retransmit_lost(self, now: float) -> bool:
        """RACK's idea, for the first hole only: a duplicate ACK arriving well over a round
        trip after we resent ``snd_una`` means that copy was lost too. Without this a lost
        retransmission waits for the RTO, which at 5 % loss is most of the lost time."""
        if self._recover is None or self._head_rexmit_at is None or self._srtt is None:
            return False
        return now - self._head_rexmit_at > 1.5 * self._srtt + REORDER_SLACK

    def _update_scoreboard(self, segment: Segment) -> None:
        """Take the guest's SACK blocks that lie inside what is in flight."""
        blocks = []
        for left, right in segment.sack:
            start, end = self._offset_out(left), self._offset_out(right)
            if self._snd_una <= start < end <= self._snd_max:
                blocks.append((start, end))
        if blocks:
            self._board.add(blocks)

    def _retransmit_first(self, now: float) -> None:
        """Send the segment at ``snd_una`` again, now."""
        self._timed = None
        self._head_rexmit_at = now
        self.stats["retransmits"] += 1
        segment = self._data_segment(self._snd_una, self.mss)
        self._out.append(segment)
        if self._recover is not None:
            self._board.resent(self._snd_una, max(1, len(segment.payload)), now)
        self._arm_probe(now)

    def _rtt_sample(self, rtt: float) -> None:
        self._rate.on_rtt(rtt)
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        rto = self._srtt + max(0.01, 4 * self._rttvar)
        self._rto = min(self.settings.max_rto, max(self.settings.min_rto, rto))

    def _receive(self, seq: int, payload: bytes, fin: bool, now: float) -> None:
        """Data (and FIN) at offset ``seq``: in order into the buffer, else kept aside."""
        right = self._rcv_written + self._rcv_buffer
        end = seq + len(payload)
        if end > right:  # beyond the window: keep what fits, the FIN goes with the rest
            payload = payload[: max(0, right - seq)]
            end, fin = seq + len(payload), False
            self.stats["beyond_window"] += 1
        if seq < self._rcv_nxt:  # duplicate start
            payload = payload[self._rcv_nxt - seq :]
            seq = self._rcv_nxt
        self._ack_due = True  # every data segment is answered (with what is written)
        if self._fin_in is not None:
            # Nothing follows the guest's FIN (RFC 9293 §3.10.7.4: ignore the text); taken, it
            # would reach the host after the byte stream's end and skew our ACK numbers.
            return
        if seq > self._rcv_nxt:
            if payload and self._ooo_bytes + len(payload) <= self._rcv_buffer:
                if len(payload) > len(self._ooo.get(seq, b"")):
                    self._ooo_bytes += len(payload) - len(self._ooo.get(seq, b""))
                    self._ooo[seq] = payload
                self._last_ooo = seq
                self.stats["out_of_order"] += 1
            else:
                self.stats["out_of_order_dropped"] += 1
            return
        if payload:
            self._rx += payload
            self._rcv_nxt += len(payload)
            self._drain_out_of_order()
        # The FIN sits at the segment's original ``end``: a FIN on a segment wholly below
        # rcv_nxt (its payload trimmed away above) is an old one, not a FIN at rcv_nxt.
        if fin and self._fin_in is None and end == self._rcv_nxt:
            self._fin_in = self._rcv_nxt
            self._rcv_nxt += 1
            self._they_closed_first = not self._fin_sent

    def _drain_out_of_order(self) -> None:
        while self._ooo:
            ready = [offset for offset in self._ooo if offset <= self._rcv_nxt]
            if not ready:
                return
            for offset in sorted(ready):
                data = self._ooo.pop(offset)
                self._ooo_bytes -= len(data)
                if offset + len(data) > self._rcv_nxt:
                    self._rx += data[self._rcv_nxt - offset :]
                    self._rcv_nxt = offset + len(data)

    # -- the host side ------------------------------------------------------------------------

    def upstream_connected(self, now: float) -> None:
        if self.closed or self._connected:
            return
        self._connected = True
        self._synack_due = True
        self._last_activity = now

    def upstream_failed(self, now: float, *, refused: bool) -> None:
        if self.closed:
            return
        if refused:
            ack = (self._irs + 1) % MOD
            self._out.append(Segment(self.sport, self.dport, 0, ack, RST | ACK, 0))
            self._close("refused")
        else:
            self.unreachable = True
            self._close("unreachable")

    def upstream_room(self) -> int:
        if self.closed or self._fin_out or not self._established:
            return 0
        return max(0, self.settings.send_buffer - (self._tx_end - self._snd_una))

    def upstream_data(self, data: bytes, now: float) -> None:
        if self.closed or self._fin_out:
            return
        self._tx += data
        self._tx_end += len(data)
        self._last_activity = now

    def upstream_eof(self, now: float) -> None:
        if not self.closed:
            self._fin_out = True

    def upstream_reset(self, now: float) -> None:
        if self.closed:
            return
        self._rst()
        self._close("upstream_rst")

    def pending_upstream(self) -> bytes:
        if self.closed:
            return b""
        start = self._rx_start
        return bytes(self._rx[start : start + PENDING_CHUNK])

    def upstream_written(self, count: int, now: float) -> None:
        if self.closed or count <= 0:
            return
        count = min(count, len(self._rx) - self._rx_start)
        self._rx_start += count
        self._rcv_written += count
        if self._rx_start >= TRIM_AT or self._rx_start == len(self._rx):
            del self._rx[: self._rx_start]
            self._rx_start = 0
        self._ack_due = True

    @property
    def upstream_shutdown_wanted(self) -> bool:
        return (
            not self.closed
            and not self._shutdown_done
            and self._fin_in is not None
            and self._rcv_written == self._fin_in
        )

    def upstream_shutdown_done(self) -> None:
        """All the guest sent is written and the host socket half-closed: ACK the FIN."""
        self._shutdown_done = True
        self._fin_in_acked = True
        self._ack_due = True

    # -- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self.closed:
            return None
        candidates = [self._last_activity + self.settings.idle_timeout]
        if not self._established:
            candidates.append(self._created + self.settings.half_open_timeout)
        for deadline in (self._rto_at, self._probe_at, self._persist_at, self._time_wait_until):
            if deadline is not None:
                candidates.append(deadline)
        if self._pace_until and self._tx_end > self._snd_nxt:
            candidates.append(self._pace_until)
        return min(candidates)

    def timer(self, now: float) -> None:
        if self.closed:
            return
        if self._time_wait_until is not None:
            if now >= self._time_wait_until:
                self._close("fin")
            return
        if not self._established and now >= self._created + self.settings.half_open_timeout:
            if self._connected:
                self._rst()
            self._close("half_open_timeout", reset_upstream=True)
            return
        if now >= self._last_activity + self.settings.idle_timeout:
            self._rst()
            self._close("idle", reset_upstream=True)
            return
        if self._rto_at is not None and now >= self._rto_at:
            self._on_rto(now)
        if self._probe_at is not None and now >= self._probe_at:
            self._on_probe(now)
        if self._persist_at is not None and now >= self._persist_at:
            self._on_persist(now)

    def _on_rto(self, now: float) -> None:
        settings = self.settings
        self._rto = min(settings.max_rto, self._rto * 2)
        self._rto_at = None
        self._timed = None
        if not self._established:
            self._retries += 1
            if self._retries > settings.syn_ack_retries:
                self._close("half_open_timeout", reset_upstream=True)
                return
            self._synack_due = True
            return
        if self._snd_wnd:
            self._retries += 1
        if self._retries > settings.max_retransmits:
            self._rst()
            self._close("retransmit_limit", reset_upstream=True)
            return
        flight = self._snd_max - self._snd_una
        self._ssthresh = self._rate.loss_window(flight, 2 * self.mss)
        self._cwnd = self.mss
        self._recover = None
        self._head_rexmit_at = None
        self._probe_at = None
        self._dupacks = 0
        self._board.clear()
        self._rate.restart(self._snd_una, now)
        self._snd_nxt = self._snd_una  # go back: resend from the first unacked byte
        self._pace_until = 0.0
        self.stats["timeouts"] += 1

    def _on_persist(self, now: float) -> None:
        """Zero window: send one byte beyond it; the guest's ACK tells the window again."""
        self._persist_at = None
        if self._snd_wnd == 0 and self._tx_end > self._snd_nxt == self._snd_una:
            self.stats["zero_window_probes"] += 1
            self._out.append(self._data_segment(self._snd_nxt, 1))
            self._snd_nxt += 1
            self._snd_max = max(self._snd_max, self._snd_nxt)
            self._rto_at = now + self._rto

    # -- output -------------------------------------------------------------------------------

    def _segment(self, flags: int, offset: int, payload: bytes = b"") -> Segment:
        ack = self._rcv_written + (1 if self._fin_in_acked else 0)
        window = self._rcv_buffer if flags & SYN else self._rcv_buffer >> self._rcv_shift
        # SACK blocks only on segments without data: with them a full segment would not
        # fit the guest's MTU.
        sack = self._sack_blocks() if self._ooo and self._sack_ok and not payload else ()
        return Segment(
            self.sport,
            self.dport,
            (self._iss + offset) % MOD,
            (self._irs + ack) % MOD,
            flags,
            min(window, MAX_WINDOW),
            payload,
            sack=sack,
        )

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """The out-of-order data we keep, as wire SACK blocks; the block holding the latest
        segment first (RFC 2018 §4), then the highest ones."""
        ranges: list[tuple[int, int]] = []
        for start in sorted(self._ooo):
            end = start + len(self._ooo[start])
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
            else:
                ranges.append((start, end))
        latest = [r for r in ranges if r[0] <= self._last_ooo < r[1]]
        rest = [r for r in reversed(ranges) if r not in latest]
        chosen = (latest + rest)[:MAX_SACK_BLOCKS]
        return tuple(((self._irs + a) % MOD, (self._irs + b) % MOD) for a, b in chosen)

    def _data_segment(self, offset: int, size: int) -> Segment:
        """The segment starting at ``offset``: data, and the FIN if it is next."""
        start = offset - self._tx_base
        payload = bytes(self._tx[start : start + min(size, self._tx_end - offset)])
        flags = ACK | (PSH if payload else 0)
        if self._fin_out and offset + len(payload) == self._tx_end:
            flags |= FIN
        return self._segment(flags, offset, payload)

    def to_guest(self, now: float) -> list[Segment]:
        out, self._out = self._out, []
        if self.closed:
            return out
        if self._synack_due and self._connected and not self._established:
            self._synack_due = False
            synack = self._segment(SYN | ACK, 0)
            wscale = self._rcv_shift if self._offered_wscale else None
            out.append(
                Segment(
                    synack.sport,
                    synack.dport,
                    synack.seq,
                    synack.ack,
                    synack.flags,
                    synack.window,
                    mss=self.mss,
                    wscale=wscale,
                    sack_permitted=self._sack_ok,
                )
            )
            self._snd_nxt = self._snd_max = max(self._snd_max, 1)
            self._rto_at = now + self._rto
            return out
        if not self._established:
            return out
        sent = self._send_data(out, now)
        if self._ack_due and not sent:
            out.append(self._segment(ACK, self._snd_nxt))
        self._ack_due = False
        self._enter_time_wait(now)
        return out

    def _send_data(self, out: list[Segment], now: float) -> int:
        """New data (and retransmissions after a timeout), within window, cwnd and pacing."""
        if now < self._pace_until:
            return 0
        self._pace_until = 0.0
        sack_recovery = self._recover is not None and bool(self._board.blocks)
        sent = self._resend_holes(out, now) if sack_recovery else 0
        fin_end = self._tx_end + (1 if self._fin_out else 0)
        while sent < self.settings.max_burst and self._snd_nxt < fin_end:
            flight = self._snd_nxt - self._snd_una
            pipe = self._board.pipe(self._snd_una, self._snd_nxt) if sack_recovery else flight
            usable = min(self._cwnd - pipe, self._snd_wnd - flight)
            remaining = self._tx_end - self._snd_nxt
            size = min(self.mss, remaining, usable)
            if remaining > 0 and size <= 0:
                if self._snd_wnd == 0 and flight == 0 and self._persist_at is None:
                    self._persist_at = now + self._rto
                break
            segment = self._data_segment(self._snd_nxt, max(size, 0))
            if self._timed is None and self._snd_nxt >= self._snd_max:
                self._timed = (self._snd_nxt, now)
            elif self._snd_nxt < self._snd_max:
                self.stats["retransmits"] += 1
            out.append(segment)
            self._snd_nxt += len(segment.payload) + (1 if segment.flags & FIN else 0)
            if segment.flags & FIN:
                self._fin_sent = True
            self._snd_max = max(self._snd_max, self._snd_nxt)
            if self._rto_at is None:
                self._rto_at = now + self._rto
            sent += 1
        if sent and self._probe_at is None:
            self._arm_probe(now)
        if sent >= self.settings.max_burst and self._srtt is not None:
            segments_per_rtt = max(1.0, self._cwnd / self.mss)
            self._pace_until = now + self._srtt * sent / segments_per_rtt / 1.25
        return sent

    def _resend_holes(self, out: list[Segment], now: float) -> int:
        """In recovery with SACK: resend the holes, lowest first, while the pipe has room."""
        sent = 0
        while sent < self.settings.max_burst:
            hole = self._board.next_hole(self._snd_una, self.mss)
            if hole is None:
                break
            offset, size = hole
            if self._board.pipe(self._snd_una, self._snd_nxt) + size > self._cwnd:
                break
            self.stats["retransmits"] += 1
            self.stats["sack_retransmits"] += 1
            out.append(self._data_segment(offset, size))
            self._board.resent(offset, size, now)
            if offset == self._snd_una:
                self._head_rexmit_at = now
                self._arm_probe(now)  # its loss, too, is found by the timer
            sent += 1
        return sent

    def _enter_time_wait(self, now: float) -> None:
        """Both FINs done: our FIN acked and theirs acked by us."""
        if not (self._fin_sent and self._snd_una > self._tx_end and self._fin_in_acked):
            return
        if self._they_closed_first:
            self._close("fin")
        elif self._time_wait_until is None:
            self._time_wait_until = now + self.settings.time_wait
            self._rto_at = None

    def _trim_tx(self) -> None:
        done = min(self._snd_una, self._tx_end) - self._tx_base
        if done >= TRIM_AT or (done > 0 and self._snd_una >= self._tx_end):
            del self._tx[:done]
            self._tx_base += done
