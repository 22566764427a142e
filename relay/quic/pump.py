"""Datagram hand-off to aioquic shared by the relay's connections and the Python client."""

from __future__ import annotations

from collections.abc import Callable

from aioquic.h3.connection import H3Connection
from aioquic.quic.connection import NetworkAddress, QuicConnection

from relay.quic.datagram_queue import DatagramQueue

AIOQUIC_PENDING = 4
"""Datagrams handed to aioquic at once; the rest wait in our bounded queue."""

# DATAGRAM frame: type (1) + length varint (2); short header: flags (1) + CID + packet
# number (up to 4) + AEAD tag (16).
_DATAGRAM_OVERHEAD = 1 + 2 + 1 + 4 + 16


def max_datagram_payload(quic: QuicConnection, session_id: int) -> int:
    """Largest H3 datagram payload that fits in one packet on ``quic`` right now.

    aioquic never checks: a larger datagram would sit at the head of its queue for ever.
    """
    quarter = session_id >> 2  # the Quarter Stream ID varint that prefixes the payload
    varint = 1 if quarter < 0x40 else 2 if quarter < 0x4000 else 4 if quarter < 0x40000000 else 8
    return quic._max_datagram_size - _DATAGRAM_OVERHEAD - len(quic._peer_cid.cid) - varint


def feed_datagrams(
    quic: QuicConnection, h3: H3Connection, queue: DatagramQueue, now: float
) -> None:
    """Top aioquic's datagram FIFO up to a few entries from our bounded queue."""
    pending = quic._datagrams_pending
    while len(pending) < AIOQUIC_PENDING:
        item = queue.pop(now)
        if item is None:
            return
        h3.send_datagram(item[0], item[1])


def transmit(
    quic: QuicConnection,
    h3: H3Connection | None,
    queue: DatagramQueue,
    now: float,
    send: Callable[[bytes, NetworkAddress], None],
) -> None:
    """Send everything aioquic allows now, feeding it from ``queue`` a few at a time.

    Loops until our queue is empty or aioquic stops taking datagrams (congestion window or
    pacing), so one flush is not limited to the few datagrams handed over at once.
    """
    while True:
        if h3 is not None and queue:
            feed_datagrams(quic, h3, queue, now)
        packets = quic.datagrams_to_send(now=now)
        for data, addr in packets:
            send(data, addr)
        if not queue or quic._datagrams_pending or not packets:
            return
