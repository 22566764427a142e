"""The DNS forwarder behind 10.0.2.3: a guest's query goes to the host's resolvers unchanged.

A thin trio driver over :mod:`relay.gateway.dns_messages`. Per query and per try it opens a fresh
connected UDP socket, so the kernel picks a random source port and drops datagrams from anyone but
the upstream; the id sent upstream is random too (guests' ids may be predictable) and the guest's
id is put back into the answer. A TC=1 answer is fetched again over TCP from the same upstream
(RFC 1035 §4.2.2, RFC 7766), because a guest behind the gateway has no direct TCP path to the
host's resolver. Answers are otherwise passed on byte for byte, so every record type and EDNS
option survives.

Failures of the network (OSError, silence) are counted in :attr:`DnsForwarder.stats`, never
raised: the guest gets SERVFAIL when nothing answered.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
import struct
from collections.abc import Sequence

import trio

from relay.gateway.dns_messages import (
    Upstream,
    is_truncated,
    matches,
    message_id,
    servfail,
    truncated,
    with_id,
)
from relay.logs import RateLimitedLog

logger = logging.getLogger(__name__)

_MAX_UDP_ANSWER = 65535
_TCP_LENGTH = struct.Struct("!H")


class _UpstreamClosed(Exception):
    """The upstream closed a TCP connection in the middle of an answer."""


class DnsForwarder:
    """Resolves guests' queries through ``upstreams``, tried in order, ``attempts`` rounds.

    Worst case a query takes ``attempts * len(upstreams) * timeout`` seconds (twice that per
    upstream that answers TC=1 and then fails over TCP). The gateway spawns one task per query
    and checks :meth:`busy` first, dropping (and counting) queries while it is true.

    ``stats`` keys: queries, udp_answers, udp_errors, timeouts, mismatched, tcp_fallback,
    tcp_answers, tcp_errors, tcp_timeouts, truncated, partial_answers, servfail.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        timeout: float = 2.0,
        attempts: int = 2,
        max_inflight: int = 64,
    ) -> None:
        if timeout <= 0 or attempts < 1 or max_inflight < 1:
            raise ValueError("timeout must be > 0, attempts and max_inflight >= 1")
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.attempts = attempts
        self.max_inflight = max_inflight
        self.stats: collections.Counter[str] = collections.Counter()
        self._inflight = 0
        self._admitted = 0
        self._log = RateLimitedLog(logger, level=logging.WARNING)

    @property
    def inflight(self) -> int:
        """Number of :meth:`resolve` calls running now."""
        return self._inflight

    def busy(self) -> bool:
        """True when a new query should be dropped instead of spawning another task."""
        return self._inflight + self._admitted >= self.max_inflight

    def admit(self) -> bool:
        """Reserve a place for a query whose task is about to start (then call
        ``resolve(..., admitted=True)``): tasks started in one batch do not run until the
        batch ends, so counting only running ones would let a burst past the cap."""
        if self.busy():
            return False
        self._admitted += 1
        return True

    async def resolve(
        self, query: bytes, *, max_udp_size: int = 512, admitted: bool = False
    ) -> bytes:
        """The answer to ``query`` (already accepted by ``check_query``) for the guest.

        Longer than ``max_udp_size`` → the truncated form (TC=1), so the guest retries; no
        answer at all → SERVFAIL. Never raises for network failures.
        """
        if admitted:
            self._admitted -= 1
        self._inflight += 1
        try:
            answer = await self._forward(query)
        finally:
            self._inflight -= 1
        if len(answer) > max_udp_size:
            self.stats["truncated"] += 1
            return truncated(answer)
        return answer

    async def _forward(self, query: bytes) -> bytes:
        self.stats["queries"] += 1
        guest_id = message_id(query)
        partial: bytes | None = None  # a TC=1 answer whose TCP retry failed: better than nothing
        for _ in range(self.attempts):
            for upstream in self.upstreams:
                sent = with_id(query, secrets.randbits(16))
                answer = await self._ask_udp(upstream, sent)
                if answer is None:
                    continue
                if is_truncated(answer):
                    self.stats["tcp_fallback"] += 1
                    full = await self._ask_tcp(upstream, sent)
                    if full is None:
                        partial = answer
                        continue
                    answer = full
                return with_id(answer, guest_id)
        if partial is not None:
            self.stats["partial_answers"] += 1
            return with_id(partial, guest_id)
        self.stats["servfail"] += 1
        return servfail(query)

    async def _ask_udp(self, upstream: Upstream, query: bytes) -> bytes | None:
        """One UDP exchange; ``None`` after a timeout or a socket error (both counted)."""
        try:
            with trio.socket.socket(_family(upstream), socket.SOCK_DGRAM) as sock:
                with trio.move_on_after(self.timeout):
                    await sock.connect((upstream.host, upstream.port))
                    await sock.send(query)
                    while True:
                        data = await sock.recv(_MAX_UDP_ANSWER)
                        if matches(query, data):
                            self.stats["udp_answers"] += 1
                            return data
                        self.stats["mismatched"] += 1
        except OSError as exc:
            self.stats["udp_errors"] += 1
            self._note(upstream, "udp error", exc)
            return None
        self.stats["timeouts"] += 1
        self._note(upstream, "timeout", f"no answer within {self.timeout:g} s")
        return None

    async def _ask_tcp(self, upstream: Upstream, query: bytes) -> bytes | None:
        """One TCP exchange (2-byte length prefix); ``None`` on any failure (counted)."""
        data: bytes | None = None
        try:
            with trio.move_on_after(self.timeout):
                stream = await trio.open_tcp_stream(upstream.host, upstream.port)
                async with stream:
                    await stream.send_all(_TCP_LENGTH.pack(len(query)) + query)
                    (length,) = _TCP_LENGTH.unpack(await _receive_exactly(stream, 2))
                    data = await _receive_exactly(stream, length)
        except (OSError, trio.BrokenResourceError, _UpstreamClosed) as exc:
            self.stats["tcp_errors"] += 1
            self._note(upstream, "tcp error", exc)
            return None
        if data is None:
            self.stats["tcp_errors"] += 1
            self.stats["tcp_timeouts"] += 1
            self._note(upstream, "tcp timeout", f"no answer within {self.timeout:g} s")
            return None
        if not matches(query, data):
            self.stats["tcp_errors"] += 1
            self.stats["mismatched"] += 1
            self._note(upstream, "tcp mismatch", "answer does not match the query")
            return None
        self.stats["tcp_answers"] += 1
        return data

    def _note(self, upstream: Upstream, kind: str, detail: object) -> None:
        self._log.event(
            f"{kind} {upstream.host} {upstream.port}",
            "DNS upstream %s port %d: %s: %s",
            upstream.host,
            upstream.port,
            kind,
            detail,
        )


def _family(upstream: Upstream) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in upstream.host else socket.AF_INET


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = await stream.receive_some(size - len(buffer))
        if not chunk:
            raise _UpstreamClosed(f"connection closed after {len(buffer)} of {size} bytes")
        buffer += chunk
    return bytes(buffer)
