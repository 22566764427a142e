"""How much a sender keeps in flight after a loss: sized from what the path delivered.

Both of the relay's senders use it: aioquic's congestion control on each browser connection
(:mod:`relay.quic.congestion`) and the NAT's TCP sender towards each guest
(:mod:`relay.nat.tcp`). Browser VMs sit on Wi-Fi and mobile links whose loss is mostly random,
not a sign of a full queue. Halving the window for each loss (Reno) caps a flow near the
Mathis bound, MSS / RTT * 1.22 / sqrt(p), about 10 Mbit/s at 5 % loss and a few
milliseconds, and two such loops stacked (TCP inside QUIC) compound it. So, in the spirit of
TCP Westwood+ and BBR, a loss sizes the window from the best recent delivery rate times the
smoothed round trip: a flight up to twice that product is kept (random loss alone no longer
shrinks it), a larger one is cut back to it, never below Reno's half. Not the minimum round
trip: on a busy host that is a lucky sample several times below the usual one, and a window
sized from it shrinks with every loss. The price: like BBR, a flow keeps its share against
loss-driven (Reno, CUBIC) flows on a shared bottleneck; persistent congestion and timeouts
still collapse the window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SAMPLES = 10
"""Delivery-rate samples (about one per round trip) the maximum is taken over."""
MIN_INTERVAL = 0.001
"""Seconds: a shorter sample says more about the scheduler than about the path."""
QUEUE_GAIN = 2.0
"""A flight up to this many times rate * round trip is kept through a loss."""


@dataclass(slots=True)
class DeliveryRate:
    """One flow's delivery rate (bytes acked or SACKed per second) and smoothed round trip."""

    samples: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    srtt: float | None = None
    _mark: tuple[float, int] | None = None

    def on_rtt(self, rtt: float) -> None:
        """RFC 6298's smoothing (aioquic keeps its own but does not hand it over)."""
        self.srtt = rtt if self.srtt is None else self.srtt + 0.125 * (rtt - self.srtt)

    def on_delivered(self, delivered: int, now: float) -> None:
        """``delivered``: bytes the peer has acked or SACKed so far (never decreasing)."""
        if self._mark is None:
            self._mark = (now, delivered)
            return
        start, before = self._mark
        interval = now - start
        if interval < max(MIN_INTERVAL, self.srtt or 0.0):
            return
        if delivered > before:
            self.samples.append((delivered - before) / interval)
        self._mark = (now, delivered)

    def restart(self, delivered: int, now: float) -> None:
        """After a timeout: what was SACKed may be gone, so measure afresh from here."""
        self._mark = (now, delivered)

    def loss_window(self, flight: int, floor: int) -> int:
        """The window after a loss with ``flight`` bytes outstanding: the flight is kept up to
        twice rate * srtt; beyond that it is cut, but never below Reno's half (a rate
        measured across an idle spell is low) nor below ``floor``."""
        reno = max(flight // 2, floor)
        if not self.samples or self.srtt is None:
            return reno
        bdp = int(max(self.samples) * self.srtt)
        return max(reno, min(flight, int(QUEUE_GAIN * bdp)))
