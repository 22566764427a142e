"""The relay's QUIC congestion control: aioquic's NewReno with a loss-tolerant decrease.

Registered with aioquic as ``relay-westwood`` and used by the relay's server connections and
by the Python client (``relay tap``). Growth is NewReno's (slow start, then one datagram per
window acknowledged); a loss event sets the window from the delivery rate
(:mod:`relay.delivery_rate`) instead of halving it, so a browser on a lossy link keeps its
throughput; a flight beyond twice rate * srtt is still cut back, persistent congestion still
collapses the window.
"""

from __future__ import annotations

from collections.abc import Iterable

from aioquic.quic.congestion.base import (
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    QuicRttMonitor,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket

from relay.delivery_rate import DeliveryRate

NAME = "relay-westwood"


class LossTolerantCongestionControl(QuicCongestionControl):
    """aioquic's Reno, but a loss sizes the window from the delivery rate (see the module)."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._datagram = max_datagram_size
        self._recovery_start = 0.0
        self._stash = 0
        self._delivered = 0
        self._rate = DeliveryRate()
        self._rtt_monitor = QuicRttMonitor()

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        self._rate.on_delivered(self._delivered, now)
        if (packet.sent_time or 0.0) <= self._recovery_start:
            return  # no growth in recovery
        if self.ssthresh is None or self.congestion_window < self.ssthresh:
            self.congestion_window += packet.sent_bytes
        else:
            self._stash += packet.sent_bytes
            count = self._stash // self.congestion_window
            if count:
                self._stash -= count * self.congestion_window
                self.congestion_window += count * self._datagram

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        latest = 0.0
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            latest = packet.sent_time or 0.0
        if latest > self._recovery_start:  # a new loss event, not more of the last one
            self._recovery_start = now
            floor = K_MINIMUM_WINDOW * self._datagram
            self.congestion_window = self._rate.loss_window(self.congestion_window, floor)
            self.ssthresh = self.congestion_window

    def on_persistent_congestion(self) -> None:
        self.congestion_window = K_MINIMUM_WINDOW * self._datagram
        self._recovery_start = 0.0

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        self._rate.on_rtt(rtt)
        if self.ssthresh is None and self._rtt_monitor.is_rtt_increasing(now=now, rtt=rtt):
            self.ssthresh = self.congestion_window  # slow start ends, as in aioquic's Reno


register_congestion_control(NAME, LossTolerantCongestionControl)
