"""A small HTTP/1.1 server for the relay's API: trio streams driving h11 (sans-IO).

It faces the internet, so everything is bounded: concurrent connections (beyond the cap a new
one is closed at once), the request head (h11 refuses more than ``max_head`` bytes), the time
a request may take to arrive and its answer to leave (so a slowloris client cannot hold a
socket), requests per connection, and bodies (none accepted: the API is GET/HEAD/OPTIONS).
TLS handshake failures and abrupt disconnects are normal on the internet: they are counted
and logged at most every few seconds. A handler that raises gets a 500; the server lives on.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from relay.logs import RateLimitedLog

log = logging.getLogger("relay.http")
_event_log = RateLimitedLog(log)

ALLOWED_METHODS = ("GET", "HEAD", "OPTIONS")
READ_SIZE = 16384


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what one client can make the server hold."""

    max_connections: int = 256
    max_per_client: int = 32
    """Connections from one address (so one client cannot take every slot)."""
    request_timeout: float = 10.0
    """Seconds for a request to arrive completely (TLS handshake and keep-alive idle time
    included) and for its answer to be sent."""
    max_head: int = 16384
    """Bytes of request line + headers."""
    max_requests_per_connection: int = 100
    backlog: int = 128


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the application sees it."""

    method: str
    path: str
    """The target's path, not percent-decoded (routes and file names are plain ASCII)."""
    query: str
    headers: tuple[tuple[str, str], ...]
    """Lower-case names."""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class HttpStats:
    """What the server saw; read by /metrics and /status."""

    addresses: list[tuple[str, int]] = field(default_factory=list)
    """Where it listens (filled in once bound)."""
    active: int = 0
    """Connections open now."""
    connections: int = 0
    """Connections accepted in total (refused ones included)."""
    responses: Counter[int] = field(default_factory=Counter)
    """Responses sent, by status code."""
    drops: Counter[str] = field(default_factory=Counter)
    """Connections ended abnormally, by reason."""


class HttpHandler(Protocol):
    """What :func:`serve_http` serves: a synchronous request → response function."""

    http_stats: HttpStats

    def handle(self, request: Request) -> Response: ...


def text_response(
    status: int, text: str = "", headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = (text or _phrase(status).decode()).encode() + b"\n"
    return Response(status, body, "text/plain; charset=utf-8", headers)


def _open_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket; ``::`` is dual-stack like the QUIC endpoint's UDP sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_listeners(binds: Sequence[tuple[str, int]], backlog: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for host, port in binds:
            try:
                socks.append(_open_listener(host, port, backlog))
            except OSError as exc:
                if host == "::" and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("IPv6 unavailable (%s); HTTP on IPv4 only", exc.strerror)
                    socks.append(_open_listener("0.0.0.0", port, backlog))
                else:
                    raise
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class _Closed(Exception):
    """The client closed the connection between requests."""


class _Server:
    def __init__(
        self,
        app: HttpHandler,
        ssl_context: Callable[[], ssl.SSLContext | None],
        limits: HttpLimits,
    ) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.limits = limits
        self.stats = app.http_stats
        self.per_client: Counter[str] = Counter()

    def _drop(self, reason: str, peer: str) -> None:
        self.stats.drops[reason] += 1
        _event_log.event(reason, "HTTP connection from %s ended: %s", peer, reason)

    async def connection(self, tcp: trio.SocketStream) -> None:
        """One accepted connection, start to end; never raises (it would stop the server)."""
        stats = self.stats
        stats.connections += 1
        peer = _peer_name(tcp)
        if stats.active >= self.limits.max_connections:
            self._drop("connection_limit", peer)
            await trio.aclose_forcefully(tcp)
            return
        if self.per_client[peer] >= self.limits.max_per_client:
            self._drop("client_limit", peer)
            await trio.aclose_forcefully(tcp)
            return
        stats.active += 1
        self.per_client[peer] += 1
        stream: trio.abc.Stream = tcp
        phase = "tls_handshake"
        try:
            context = self.ssl_context()
            if context is not None:
                tls = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
                stream = tls
                with trio.move_on_after(self.limits.request_timeout) as scope:
                    await tls.do_handshake()
                if scope.cancelled_caught:
                    self._drop("tls_handshake_timeout", peer)
                    return
            phase = "http"
            await self._exchange(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._drop("tls_handshake_failed" if phase == "tls_handshake" else "disconnected", peer)
        except Exception:
            stats.drops["internal_error"] += 1
            log.exception("HTTP connection from %s: internal error", peer)
        finally:
            stats.active -= 1
            self.per_client[peer] -= 1
            if not self.per_client[peer]:
                del self.per_client[peer]
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.abc.Stream, peer: str) -> None:
        """Requests and responses on one connection (keep-alive) until either side closes."""
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        for _ in range(limits.max_requests_per_connection):
            with trio.move_on_after(limits.request_timeout) as scope:
                try:
                    request, has_body = await self._read_request(conn, stream)
                except _Closed:
                    return
                except h11.RemoteProtocolError as exc:
                    self._drop("bad_request", peer)
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        status = exc.error_status_hint
                        await self._send(conn, stream, "GET", text_response(status), close=True)
                    return
                response, close = self._respond(request, has_body)
                await self._send(conn, stream, request.method, response, close=close)
            if scope.cancelled_caught:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    self.stats.drops["idle_timeout"] += 1  # a quiet keep-alive: normal
                else:
                    self._drop("request_timeout", peer)
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[Request, bool]:
        """The next request, and whether it came with a body (which is never read)."""
        event = await _next_event(conn, stream, self.limits.max_head)
        if isinstance(event, h11.ConnectionClosed):
            raise _Closed
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
        # Without a body h11 has the request's end already; anything else means a body.
        has_body = not isinstance(conn.next_event(), h11.EndOfMessage)
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
        )
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        if not target.startswith("/"):
            raise h11.RemoteProtocolError("request target is not a path", error_status_hint=400)
        path, _, query = target.partition("?")
        return Request(method, path, query, headers), has_body

    def _respond(self, request: Request, has_body: bool) -> tuple[Response, bool]:
        """The response, and whether the connection must close after it."""
        if request.method not in ALLOWED_METHODS:
            allow = (("allow", ", ".join(ALLOWED_METHODS)),)
            return text_response(405, headers=allow), has_body
        if has_body:
            return text_response(413, "request bodies are not accepted"), True
        try:
            return self.app.handle(request), False
        except Exception:
            self.stats.drops["handler_error"] += 1
            log.exception("HTTP %s %s: handler error", request.method, request.path[:200])
            return text_response(500), False

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        method: str,
        response: Response,
        *,
        close: bool,
    ) -> None:
        if conn.their_state is h11.SEND_BODY:
            close = True  # an unread body (or a broken request): cannot reuse the connection
        headers = [
            ("content-length", str(len(response.body))),
            ("x-content-type-options", "nosniff"),
            *response.headers,
        ]
        if response.content_type is not None:
            headers.append(("content-type", response.content_type))
        if close:
            headers.append(("connection", "close"))
        head = h11.Response(
            status_code=response.status, headers=headers, reason=_phrase(response.status)
        )
        data = conn.send(head) or b""
        if method != "HEAD" and response.body:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.stats.responses[response.status] += 1
        await stream.send_all(data)
        if close:
            conn.send(h11.ConnectionClosed())


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, max_head: int) -> h11.Event:
    """The next complete h11 event, reading from the stream as needed.

    h11 checks ``max_incomplete_event_size`` only while a head is incomplete in its buffer,
    so a head arriving complete in a few large reads could exceed it: checked here too.
    """
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif event is h11.PAUSED:  # only between requests, which the caller never asks for
            raise RuntimeError("h11 paused while reading a request")
        else:
            assert isinstance(event, h11.Event)
            if isinstance(event, h11.Request) and _head_size(event) > max_head:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event


def _head_size(request: h11.Request) -> int:
    """About the bytes of a request's head as sent (h11 does not keep the raw head)."""
    line = len(request.method) + len(request.target) + 11
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(address[0]).removeprefix("::ffff:")


async def serve_http(
    app: HttpHandler,
    binds: Sequence[tuple[str, int]],
    *,
    ssl_context: Callable[[], ssl.SSLContext | None],
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on every bind address until cancelled; report the bound addresses.

    ``ssl_context`` is called for every new connection: HTTPS when it returns a context (a
    reloaded certificate applies to the next connection), plain HTTP when it returns None.
    """
    limits = limits or HttpLimits()
    socks = open_listeners(binds, limits.backlog)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
    addresses = [(str(a[0]), int(a[1])) for a in (s.getsockname() for s in socks)]
    app.http_stats.addresses = addresses
    server = _Server(app, ssl_context, limits)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, server.connection, listeners))
            task_status.started(addresses)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
