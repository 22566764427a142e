"""The baseline: aioquic's own asyncio server echoing WebTransport datagrams.

``python -m relay.bench.echo_baseline --cert cert.pem --key key.pem --port 0`` accepts every
extended CONNECT with ``:protocol webtransport`` (``:status 200``, no end_stream) and sends
every datagram back on the session it came from — one receive and one send per datagram, the
same work per frame as the relay forwarding client → relay → client. It prints the same
``Certificate SHA-256 Hash (hex):`` and ``Listening on https://...`` lines as ``relay serve``
and runs until SIGTERM or SIGINT.

It is deliberately plain aioquic (``aioquic.asyncio.serve`` and ``QuicConnectionProtocol``,
which transmits after every received packet), with only what correctness needs: the datagram
size check (aioquic would otherwise wedge its datagram queue on an oversized echo) and the same
``max_datagram_size`` and socket buffer sizes as the relay, so the comparison is fair.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

from relay.tls import hash_of_pem_file

MAX_DATAGRAM_SIZE = 1350
"""The relay's default QUIC packet size."""
SOCKET_BUFFER = 8 * 1024 * 1024
"""The relay's socket buffer size."""
_OVERHEAD = 1 + 4 + 16 + 3 + 1
"""Short header flags, packet number, AEAD tag, DATAGRAM frame header, quarter stream id."""


class EchoProtocol(QuicConnectionProtocol):
    """One QUIC connection: accept WebTransport sessions, echo their datagrams."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3: H3Connection | None = None
        self._sessions: set[int] = set()
        self.echoed = 0
        self.dropped = 0

    def _max_payload(self) -> int:
        quic = self._quic
        return quic._max_datagram_size - _OVERHEAD - len(quic._peer_cid.cid)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic, enable_webtransport=True)
        h3 = self._h3
        if h3 is None:
            return
        for h3_event in h3.handle_event(event):
            if isinstance(h3_event, DatagramReceived):
                if h3_event.stream_id in self._sessions and (
                    len(h3_event.data) <= self._max_payload()
                ):
                    h3.send_datagram(h3_event.stream_id, h3_event.data)
                    self.echoed += 1
                else:
                    self.dropped += 1
            elif isinstance(h3_event, HeadersReceived):
                headers = dict(h3_event.headers)
                if (
                    headers.get(b":method") == b"CONNECT"
                    and headers.get(b":protocol") == b"webtransport"
                ):
                    h3.send_headers(
                        h3_event.stream_id,
                        [(b":status", b"200"), (b"sec-webtransport-http3-draft", b"draft02")],
                    )
                    self._sessions.add(h3_event.stream_id)
                else:
                    h3.send_headers(h3_event.stream_id, [(b":status", b"404")], end_stream=True)
        # QuicConnectionProtocol.datagram_received calls transmit() after the events.


async def run(cert: Path, key: Path, host: str, port: int) -> None:
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        max_datagram_frame_size=65536,
        max_datagram_size=MAX_DATAGRAM_SIZE,
    )
    configuration.load_cert_chain(cert, key)
    server = await serve(host, port, configuration=configuration, create_protocol=EchoProtocol)
    transport = server._transport
    assert transport is not None
    sock: socket.socket = transport.get_extra_info("socket")
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    bound_host, bound_port = transport.get_extra_info("sockname")[:2]
    print(f"Certificate SHA-256 Hash (hex): {hash_of_pem_file(cert)}")
    print(f"Listening on https://{bound_host}:{bound_port}/ (udp {bound_host})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay.bench.echo_baseline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(run(args.cert, args.key, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
