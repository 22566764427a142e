"""The HTTP API against a real running relay: documents, CORS, metrics, health, robustness."""

from __future__ import annotations

import datetime
import json
import logging
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import StartRelay, relay_url
from prometheus_client.parser import text_string_to_metric_families

from relay.client import RelayClient, connect, random_mac
from relay.ops import status as status_module
from relay.ops.api import STATIC_DIR, HttpApp
from relay.ops.http import HttpLimits, serve_http
from relay.ops.metrics import Totals, udp_kernel_counters
from relay.packets import build
from relay.quic.endpoint import Endpoint
from relay.server import Listening
from relay.session.service import BavySession
from relay.tls import TlsIdentity, generate_self_signed, self_signed, write_identity
from relay.wire.messages import format_mac

GATEWAY_IP = bytes([10, 0, 2, 2])
UTC = datetime.UTC


class FakeStore:
    """Stands in for relay.certs.CertificateStore: what the HTTP side reads of it."""

    def __init__(
        self,
        current: TlsIdentity,
        next_: TlsIdentity | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.current = current
        self.next = next_
        self.context = context
        self.contexts_asked = 0

    def published(self) -> list[TlsIdentity]:
        return [self.current] if self.next is None else [self.current, self.next]

    def ssl_context(self) -> ssl.SSLContext | None:
        self.contexts_asked += 1
        return self.context


@dataclass
class Api:
    relay: Listening
    app: HttpApp
    store: FakeStore
    port: int


async def start_api(
    nursery: trio.Nursery,
    relay: Listening,
    *,
    store: FakeStore | None = None,
    limits: HttpLimits | None = None,
    binds: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
    **app_options: Any,
) -> Api:
    store = store or FakeStore(relay.identity)
    app = HttpApp(relay.relay, store, started=1.7e9, version="9.9.9-test", **app_options)
    addresses = await nursery.start(
        lambda task_status: serve_http(
            app, binds, ssl_context=store.ssl_context, limits=limits, task_status=task_status
        )
    )
    assert addresses == app.http_stats.addresses
    return Api(relay, app, store, addresses[0][1])


# -- a small HTTP/1.1 client (h11 over trio) --------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(
        cls, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> Client:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname="localhost")
        return cls(stream)

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = ()
    ) -> Reply:
        conn = self.conn
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        head = h11.Request(method=method, target=path, headers=[("host", "relay"), *headers])
        await self.stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
        response: h11.Response | None = None
        body = b""
        with trio.fail_after(5):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await self.stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        headers_ = {k.decode().lower(): v.decode() for k, v in response.headers}
        return Reply(response.status_code, headers_, body)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def get(
    port: int,
    path: str,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    **options: Any,
) -> Reply:
    client = await Client.open(port, **options)
    try:
        return await client.request(method, path, headers)
    finally:
        await client.aclose()


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a state change that has no event of its own (a socket closing elsewhere)."""
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 (no event to wait for)
            await trio.sleep(0.01)


def iso(text: str) -> datetime.datetime:
    assert text.endswith("Z"), text
    return datetime.datetime.fromisoformat(text)


async def registered(nursery: trio.Nursery, relay: Listening) -> RelayClient:
    client = await connect(nursery, relay_url(relay), cert_hash=relay.identity.hash_hex)
    with trio.fail_after(5):
        await client.register(random_mac())
    return client


async def arp_gateway(client: RelayClient) -> None:
    """One frame in, one answer out: the gateway's ARP reply has come back when this returns."""
    assert client.mac is not None and client.assigned is not None
    request = build.arp_frame(
        build.ARP_REQUEST, client.mac, client.assigned.ip.packed, bytes(6), GATEWAY_IP
    )
    client.send_frame(request)
    with trio.fail_after(5):
        while True:
            frame = await client.receive_frame()
            if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                return


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


# -- /cert-hash ------------------------------------------------------------------------------


async def test_cert_hash_lists_current_then_next_with_cors(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    following = generate_self_signed()
    api = await start_api(nursery, relay, store=FakeStore(relay.identity, following))
    reply = await get(api.port, "/cert-hash")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["access-control-allow-origin"] == "*"
    assert reply.headers["cache-control"] == "no-store"
    document = reply.json()
    assert document["algorithm"] == "sha-256"
    assert document["hash"] == relay.identity.hash_hex
    assert document["self_signed"] is True
    assert [h["value"] for h in document["hashes"]] == [
        relay.identity.hash_hex,
        following.hash_hex,
    ]
    for entry, identity in zip(document["hashes"], (relay.identity, following), strict=True):
        assert set(entry) == {"algorithm", "value", "not_before", "not_after"}
        assert entry["algorithm"] == "sha-256"
        assert len(bytes.fromhex(entry["value"])) == 32
        assert iso(entry["not_before"]) == identity.not_before.replace(microsecond=0)
        assert iso(entry["not_after"]) == identity.not_after.replace(microsecond=0)
    # The hash the relay's QUIC side really presents is the one listed first.
    client = await connect(nursery, relay_url(relay), cert_hash=document["hashes"][0]["value"])
    await client.aclose()


async def test_cors_preflight(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    api = await start_api(nursery, await start_relay())
    for path in ("/cert-hash", "/healthz", "/readyz"):
        reply = await get(
            api.port,
            path,
            method="OPTIONS",
            headers=(
                ("origin", "https://app.example"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-custom"),
            ),
        )
        assert reply.status == 204, path
        assert reply.headers["access-control-allow-origin"] == "*"
        assert "GET" in reply.headers["access-control-allow-methods"]
        assert reply.headers["access-control-allow-headers"] == "*"
        assert reply.body == b""


# -- /status ---------------------------------------------------------------------------------


async def test_status_shows_a_registered_client_and_its_counters(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    api = await start_api(nursery, relay)
    client = await registered(nursery, relay)
    assert client.mac is not None and client.assigned is not None
    before = datetime.datetime.now(UTC)

    reply = await get(api.port, "/status")
    assert reply.status == 200
    # It lists the VMs' MACs and addresses: for the same-origin dashboard only, no CORS.
    assert "access-control-allow-origin" not in reply.headers
    document = reply.json()
    assert document["version"] == "9.9.9-test"
    assert iso(document["started_at"]).timestamp() == 1.7e9
    assert document["uptime_s"] > 0
    quic_host, quic_port = relay.addresses[0]
    assert document["listening"] == {
        "quic": [f"{quic_host}:{quic_port}"],
        "http": [f"127.0.0.1:{api.port}"],
    }
    assert document["certificate"]["hash"] == relay.identity.hash_hex
    assert iso(document["certificate"]["not_after"]) < before + datetime.timedelta(days=14)
    assert document["nat"]["flows"] == 0
    assert document["quic"]["connections"] == 1
    assert document["quic"]["handshakes_started"] == 1
    assert set(document["quic"]) == {
        "connections",
        "half_open",
        "handshakes_started",
        "retries_sent",
        "drops",
    }
    [lan] = document["lans"]
    assert lan["name"] == "default"
    [peer] = lan["peers"]
    assert peer["mac"] == format_mac(client.mac)
    assert peer["ip"] == str(client.assigned.ip)
    assert peer["raw"] is False
    connected = iso(peer["connected_since"])
    assert abs((connected - before).total_seconds()) < 10
    assert iso(peer["last_seen"]) >= connected
    assert peer["frames_in"] == peer["frames_out"] == 0

    await arp_gateway(client)
    peer = (await get(api.port, "/status")).json()["lans"][0]["peers"][0]
    assert peer["frames_in"] == 1 and peer["bytes_in"] >= 42
    assert peer["frames_out"] == 1 and peer["bytes_out"] >= 42
    lan = (await get(api.port, "/status")).json()["lans"][0]
    assert lan["frames_switched"] >= 2
    assert lan["gateway"]["answered"]["arp"] == 1
    await client.aclose()


async def test_head_has_the_length_but_no_body(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    api = await start_api(nursery, await start_relay())
    full = await get(api.port, "/cert-hash")
    head = await get(api.port, "/cert-hash", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) == len(full.body) > 0


# -- /metrics --------------------------------------------------------------------------------


EXPECTED_FAMILIES = {
    "relay_build_info",
    "relay_lans",
    "relay_sessions",
    "relay_sessions_opened_total",
    "relay_session_frames_total",
    "relay_session_bytes_total",
    "relay_frames_switched_total",
    "relay_frames_flooded_total",
    "relay_frame_drops_total",
    "relay_gateway_answers_total",
    "relay_mac_entries",
    "relay_nat_flows",
    "relay_quic_connections",
    "relay_quic_handshakes_in_flight",
    "relay_quic_handshakes_total",
    "relay_quic_retries_sent_total",
    "relay_dns_queries_total",
    "relay_udp_kernel_errors_total",
    "relay_tls_cert_expiry_timestamp_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
}


async def test_metrics_parse_and_carry_no_peer_identity(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    api = await start_api(nursery, relay)
    client = await registered(nursery, relay)
    assert client.mac is not None and client.assigned is not None
    await arp_gateway(client)
    # An unparsable datagram: counted as a session-stage drop.
    client.send_datagram(b"\x07junk")
    session = next(iter(next(iter(relay.relay.endpoint.peers)).sessions.values()))
    assert isinstance(session, BavySession)
    await until(lambda: sum(session.core.drops.values()) == 1)

    reply = await get(api.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    found = samples(text)
    names = {name for name, _ in found}
    assert names >= EXPECTED_FAMILIES, EXPECTED_FAMILIES - names
    for family in ("relay_quic_drops_total", "relay_datagram_queue_drops_total"):
        assert f"# TYPE {family} counter" in text  # no samples while nothing was dropped
    assert all(name.startswith(("relay_", "process_")) for name in names)
    assert "_created" not in text
    assert found["relay_build_info", (("version", "9.9.9-test"),)] == 1
    assert found["relay_sessions", (("framing", "bavy"), ("state", "registered"))] == 1
    assert found["relay_sessions", (("framing", "raw"), ("state", "registered"))] == 0
    assert found["relay_session_frames_total", (("direction", "in"),)] == 1
    assert found["relay_session_frames_total", (("direction", "out"),)] == 1
    assert found["relay_gateway_answers_total", (("service", "arp"),)] == 1
    assert found["relay_quic_connections", ()] == 1
    assert found["relay_quic_handshakes_total", ()] == 1
    assert found["relay_mac_entries", ()] == 2  # the gateway's and the client's
    nat_flows = {
        dict(labels)["proto"]: v for (n, labels), v in found.items() if n == "relay_nat_flows"
    }
    assert nat_flows == {"tcp": 0, "udp": 0, "icmp": 0}
    assert found["relay_tls_cert_expiry_timestamp_seconds", ()] == pytest.approx(
        relay.identity.not_after.timestamp()
    )
    [(drop_labels, drops)] = [
        (labels, v) for (name, labels), v in found.items() if name == "relay_frame_drops_total"
    ]
    assert dict(drop_labels)["stage"] == "session" and drops == 1
    # No MAC, guest IP or client address anywhere: not as a label, not in any form.
    for text_form in (
        format_mac(client.mac),
        client.mac.hex(),
        format_mac(client.mac).replace(":", "-"),
        str(client.assigned.ip),
        "127.0.0.1",
    ):
        assert text_form not in text.lower()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= {"version", "framing", "state", "direction", "stage"} | {
                "reason",
                "service",
                "event",
                "code",
                "kind",
                "proto",
            }
    await client.aclose()


def test_udp_kernel_counters_read_from_proc_net_snmp_text() -> None:
    text = (
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "Udp: 10 2 7 9 5 1\n"
        "UdpLite: InDatagrams\nUdpLite: 0\n"
    )
    counters = udp_kernel_counters(text)
    assert counters["RcvbufErrors"] == 5 and counters["InErrors"] == 7
    assert udp_kernel_counters("Udp: a b\nUdp: 1\n") == {}
    assert udp_kernel_counters("garbage") == {}


async def test_metrics_openmetrics_negotiated(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    api = await start_api(nursery, await start_relay())
    client = await Client.open(api.port)
    reply = await client.request(
        "GET", "/metrics", headers=(("accept", "application/openmetrics-text; version=1.0.0"),)
    )
    await client.aclose()
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")
    assert b"_created" not in reply.body


async def test_totals_keep_counters_of_closed_sessions(
    nursery: trio.Nursery, start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the integration hooks, ``_total`` series never go down when sessions close."""
    totals = Totals()
    on_closed, forget = BavySession.on_closed, Endpoint.forget

    def on_closed_hooked(self: BavySession, reason: str) -> None:
        totals.session_closed(self)
        on_closed(self, reason)

    def forget_hooked(self: Endpoint, peer: Any) -> None:
        totals.peer_closed(peer)
        forget(self, peer)

    monkeypatch.setattr(BavySession, "on_closed", on_closed_hooked)
    monkeypatch.setattr(Endpoint, "forget", forget_hooked)
    relay = await start_relay()
    api = await start_api(nursery, relay, totals=totals)
    client = await registered(nursery, relay)
    await arp_gateway(client)
    await arp_gateway(client)
    before = samples((await get(api.port, "/metrics")).body.decode())
    await client.aclose()
    await until(lambda: not relay.relay.endpoint.peers)
    after = samples((await get(api.port, "/metrics")).body.decode())
    frames_in = ("relay_session_frames_total", (("direction", "in"),))
    assert before[frames_in] == after[frames_in] == 2
    assert after["relay_sessions", (("framing", "bavy"), ("state", "registered"))] == 0
    assert after["relay_sessions_opened_total", ()] == 1
    assert after["relay_sessions_closed_total", (("reason", "client_disconnect"),)] == 1
    assert after["relay_quic_connections", ()] == 0
    # An evicted LAN's counters are kept once, however often the hook runs.
    network = relay.relay.lans.networks["default"]
    totals.lan_removed(network)
    totals.lan_removed(network)
    assert totals.counts.gateway_answers["arp"] == 2


async def test_with_the_real_certificate_store(
    nursery: trio.Nursery, start_relay: StartRelay, tmp_path: Path
) -> None:
    """relay.certs.CertificateStore fits: self-signed mode publishes its hash over plain HTTP."""
    from relay.certs import CertificateStore
    from relay.config import RelayConfig

    relay = await start_relay()
    store = CertificateStore(RelayConfig(data_dir=tmp_path), initial=relay.identity)
    app = HttpApp(relay.relay, store, started=1.7e9, version="x")
    [(_, port)] = await nursery.start(
        lambda task_status: serve_http(
            app, [("127.0.0.1", 0)], ssl_context=store.ssl_context, task_status=task_status
        )
    )
    assert store.ssl_context() is None
    document = (await get(port, "/cert-hash")).json()
    assert [h["value"] for h in document["hashes"]] == [i.hash_hex for i in store.published()]
    assert document["hash"] == relay.identity.hash_hex
    assert (await get(port, "/readyz")).status == 200


# -- health ----------------------------------------------------------------------------------


async def test_healthz_and_readyz(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    api = await start_api(nursery, await start_relay())
    health = await get(api.port, "/healthz")
    assert (health.status, health.json()) == (200, {"status": "pass"})
    assert health.headers["content-type"] == "application/health+json"
    ready = await get(api.port, "/readyz")
    assert ready.status == 200
    assert ready.json()["status"] == "pass"
    assert set(ready.json()["checks"]) == {"quic_listening", "certificate_valid", "not_draining"}
    api.app.draining = True
    draining = await get(api.port, "/readyz")
    assert (draining.status, draining.json()["failing"]) == (503, ["not_draining"])


async def test_readyz_fails_with_an_expired_certificate(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    now = datetime.datetime.now(UTC)
    expired = self_signed((), now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
    api = await start_api(nursery, await start_relay(), store=FakeStore(expired))
    reply = await get(api.port, "/readyz")
    assert reply.status == 503
    assert reply.json()["status"] == "fail"
    assert reply.json()["failing"] == ["certificate_valid"]
    assert reply.json()["checks"]["quic_listening"] == "pass"
    assert (await get(api.port, "/healthz")).status == 200


# -- routing and static files ----------------------------------------------------------------


async def test_unknown_paths_and_methods(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    api = await start_api(nursery, await start_relay())
    assert (await get(api.port, "/nope")).status == 404
    assert (await get(api.port, "/status/")).status == 404
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        reply = await get(api.port, "/status", method=method)
        assert reply.status == 405, method
        assert reply.headers["allow"] == "GET, HEAD, OPTIONS"
    for path in (
        "/static/../api.py",
        "/static/..%2fapi.py",
        "/static/%2e%2e/http.py",
        "/static//etc/passwd",
        "/static/",
        "/../../etc/passwd",
    ):
        assert (await get(api.port, path)).status == 404, path


async def test_static_files_come_from_a_fixed_listing(
    nursery: trio.Nursery, start_relay: StartRelay, tmp_path: Path
) -> None:
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>relay</title>")
    (static / "app.js").write_text("console.log(1);")
    (static / "style.css").write_text("body{}")
    (static / "secret.py").write_text("nope")
    (static / ".hidden.js").write_text("nope")
    (static / "sub" / "x.js").write_text("nope")
    (static / "link.js").symlink_to(tmp_path / "outside.js")
    (tmp_path / "outside.js").write_text("outside")
    api = await start_api(nursery, await start_relay(), static_dir=static)
    index = await get(api.port, "/")
    assert (index.status, index.body) == (200, b"<!doctype html><title>relay</title>")
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.headers["x-content-type-options"] == "nosniff"
    js = await get(api.port, "/static/app.js")
    assert (js.status, js.headers["content-type"]) == (200, "text/javascript; charset=utf-8")
    css = await get(api.port, "/static/style.css")
    assert (css.status, css.headers["content-type"]) == (200, "text/css; charset=utf-8")
    for path in ("/static/secret.py", "/static/.hidden.js", "/static/sub/x.js", "/secret.py"):
        assert (await get(api.port, path)).status == 404, path
    # A symlink in the directory is followed at start-up only (the operator put it there).
    assert sorted(api.app.static) == ["app.js", "index.html", "link.js", "style.css"]


async def test_the_packaged_dashboard_is_served(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    api = await start_api(nursery, await start_relay())
    index = STATIC_DIR / "index.html"
    reply = await get(api.port, "/")
    if index.exists():
        assert (reply.status, reply.body) == (200, index.read_bytes())
    else:
        assert reply.status == 404


# -- HTTPS -----------------------------------------------------------------------------------


def https_pair(identity: TlsIdentity, directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context serving ``identity`` and a client context trusting only it."""
    cert, key = write_identity(identity, directory)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


async def test_https_with_a_context_and_new_connections_see_a_new_one(
    nursery: trio.Nursery, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay()
    first, second = generate_self_signed(), generate_self_signed()
    server_1, client_1 = https_pair(first, tmp_path / "1")
    server_2, client_2 = https_pair(second, tmp_path / "2")
    store = FakeStore(relay.identity, context=server_1)
    api = await start_api(nursery, relay, store=store)

    reply = await get(api.port, "/cert-hash", tls=client_1)
    assert reply.status == 200 and reply.json()["hash"] == relay.identity.hash_hex
    # A plain-HTTP client on the HTTPS port: a failed handshake, counted; the server goes on.
    plain = await trio.open_tcp_stream("127.0.0.1", api.port)
    await plain.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(5):
        assert b"HTTP/1.1 200" not in await read_until_closed(plain)
    await plain.aclose()
    await until(lambda: api.app.http_stats.drops["tls_handshake_failed"] == 1)

    keep = await Client.open(api.port, tls=client_1)
    assert (await keep.request("GET", "/healthz")).status == 200
    store.context = server_2  # a reloaded certificate: new connections get it
    with pytest.raises(trio.BrokenResourceError):
        await get(api.port, "/healthz", tls=client_1)
    assert (await get(api.port, "/healthz", tls=client_2)).status == 200
    assert (await keep.request("GET", "/healthz")).status == 200  # the old one stays up
    await keep.aclose()


# -- robustness ------------------------------------------------------------------------------


async def test_slowloris_is_cut_off_at_the_request_timeout(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    api = await start_api(nursery, await start_relay(), limits=HttpLimits(request_timeout=0.5))
    # Half a request, then silence.
    half = await trio.open_tcp_stream("127.0.0.1", api.port)
    await half.send_all(b"GET /status HTTP/1.1\r\nhost: x\r\n")
    start = trio.current_time()
    with trio.fail_after(5):
        assert await read_until_closed(half) == b""
    assert 0.4 < trio.current_time() - start < 3
    # A byte every 0.1 s does not keep it open either: the deadline is for the whole head.
    trickle = await trio.open_tcp_stream("127.0.0.1", api.port)
    start = trio.current_time()
    with trio.fail_after(5):
        try:
            for byte in b"GET /status HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 100:
                await trickle.send_all(bytes([byte]))
                await trio.sleep(0.1)
        except trio.BrokenResourceError:
            pass
        assert await read_until_closed(trickle) == b""
    assert trio.current_time() - start < 3
    # An idle keep-alive connection is closed too.
    idle = await Client.open(api.port)
    assert (await idle.request("GET", "/healthz")).status == 200
    with trio.fail_after(5):
        assert await read_until_closed(idle.stream) == b""
    drops = api.app.http_stats.drops
    await until(lambda: (drops["request_timeout"], drops["idle_timeout"]) == (2, 1))
    assert (await get(api.port, "/healthz")).status == 200
    for stream in (half, trickle, idle.stream):
        await stream.aclose()


async def test_connection_cap(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    api = await start_api(nursery, await start_relay(), limits=HttpLimits(max_connections=2))
    first, second = await Client.open(api.port), await Client.open(api.port)
    for client in (first, second):
        assert (await client.request("GET", "/healthz")).status == 200
    assert api.app.http_stats.active == 2
    refused = await trio.open_tcp_stream("127.0.0.1", api.port)
    with trio.fail_after(5):
        assert await read_until_closed(refused) == b""
    assert api.app.http_stats.drops["connection_limit"] == 1
    await first.aclose()
    await until(lambda: api.app.http_stats.active == 1)
    assert (await get(api.port, "/healthz")).status == 200
    assert (await second.request("GET", "/healthz")).status == 200
    await second.aclose()
    await refused.aclose()


async def test_connections_per_client_cap(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    api = await start_api(nursery, await start_relay(), limits=HttpLimits(max_per_client=1))
    first = await Client.open(api.port)
    assert (await first.request("GET", "/healthz")).status == 200
    refused = await trio.open_tcp_stream("127.0.0.1", api.port)
    with trio.fail_after(5):
        assert await read_until_closed(refused) == b""
    await refused.aclose()
    assert api.app.http_stats.drops["client_limit"] == 1
    # Another address is another client (127.0.0.2 is loopback too).
    other = await trio.open_tcp_stream("127.0.0.1", api.port, local_address="127.0.0.2")
    other_client = Client(other)
    assert (await other_client.request("GET", "/healthz")).status == 200
    await other_client.aclose()
    await first.aclose()


async def test_a_handler_bug_is_a_500_and_the_server_lives_on(
    nursery: trio.Nursery,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = await start_api(nursery, await start_relay())

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(status_module, "relay_status", broken)
    client = await Client.open(api.port)
    with caplog.at_level(logging.ERROR, logger="relay.http"):
        assert (await client.request("GET", "/status")).status == 500
    assert any("handler error" in r.getMessage() and r.exc_info for r in caplog.records)
    assert (await client.request("GET", "/healthz")).status == 200  # same connection
    assert (await get(api.port, "/cert-hash")).status == 200
    assert api.app.http_stats.drops["handler_error"] == 1
    await client.aclose()


async def test_bodies_oversized_heads_and_garbage_are_refused(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    api = await start_api(nursery, await start_relay())
    cases = [
        (b"GET /status HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello", b"413"),
        (b"POST /status HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello", b"405"),
        (
            b"GET /status HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"413",
        ),
        (b"GET /status HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"\x16\x03\x01 not http at all\r\n\r\n", b"400"),
        (b"GET http://elsewhere/ HTTP/1.1\r\nhost: x\r\n\r\n", b"400"),
    ]
    for request, code in cases:
        stream = await trio.open_tcp_stream("127.0.0.1", api.port)
        await stream.send_all(request)
        with trio.fail_after(5):
            answer = await read_until_closed(stream)  # the server closes after answering
        assert answer.startswith(b"HTTP/1.1 " + code), (request[:40], answer[:80])
        assert b"connection: close" in answer.lower()
        await stream.aclose()
    assert (await get(api.port, "/healthz")).status == 200


async def test_keep_alive_and_pipelining(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    api = await start_api(nursery, await start_relay())
    stream = await trio.open_tcp_stream("127.0.0.1", api.port)
    await stream.send_all(
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404", b"200"]
    await stream.aclose()
    assert api.app.http_stats.connections == 1


async def test_dual_stack_and_ipv6_binds(nursery: trio.Nursery, start_relay: StartRelay) -> None:
    relay = await start_relay()
    dual = await start_api(nursery, relay, binds=(("::", 0),))
    for host in ("127.0.0.1", "::1"):
        assert (await get(dual.port, "/healthz", host=host)).status == 200, host
    v6 = await start_api(nursery, relay, binds=(("::1", 0), ("127.0.0.1", 0)))
    [(host6, port6), (host4, port4)] = v6.app.http_stats.addresses
    assert (host6, host4) == ("::1", "127.0.0.1")
    assert (await get(port6, "/healthz", host="::1")).status == 200
    assert (await get(port4, "/healthz", host="127.0.0.1")).status == 200
    status = (await get(port6, "/status", host="::1")).json()
    assert status["listening"]["http"] == [f"[::1]:{port6}", f"127.0.0.1:{port4}"]


# -- the HTTP side ``serve`` starts itself ----------------------------------------------------


async def test_serve_runs_the_http_side_and_counts_closed_sessions(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    assert relay.http is not None and relay.http_addresses
    port = relay.http_addresses[0][1]
    document = (await get(port, "/cert-hash")).json()
    assert document["hash"] == relay.identity.hash_hex
    assert (await get(port, "/healthz")).status == 200
    assert (await get(port, "/readyz")).status == 200
    client = await registered(nursery, relay)
    await client.aclose()
    with trio.fail_after(5):
        while relay.relay.lans.networks["default"].ports:
            await trio.testing.wait_all_tasks_blocked()
    text = (await get(port, "/metrics")).body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    closed = families["relay_sessions_closed"].samples
    assert sum(s.value for s in closed if s.name.endswith("_total")) == 1


async def test_self_signed_rotation_publishes_current_and_next(
    nursery: trio.Nursery, start_relay: StartRelay
) -> None:
    """A fast clock through one rotation: /cert-hash lists both certificates while ``next``
    waits, and a client that pinned ``next`` early still gets in after the switch."""
    from relay.certs import CertificateStore

    relay = await start_relay(self_signed_days=1.0)
    now = [datetime.datetime.now(UTC)]
    store = CertificateStore(relay.relay.config, clock=lambda: now[0])
    relay.relay.endpoint._configuration = store.quic_configuration
    app = HttpApp(relay.relay, store, started=1.7e9, version="t")
    [(_, port)] = await nursery.start(
        partial(serve_http, app, [("127.0.0.1", 0)], ssl_context=store.ssl_context)
    )
    first = (await get(port, "/cert-hash")).json()
    assert [h["value"] for h in first["hashes"]] == [store.current.hash_hex]

    now[0] += datetime.timedelta(hours=13)  # past half-life: next is published
    assert store.check()
    both = (await get(port, "/cert-hash")).json()
    current, upcoming = (h["value"] for h in both["hashes"])
    assert current == first["hash"] and upcoming != current
    client = await connect(nursery, relay_url(relay), cert_hash=current)  # still serving current
    await client.aclose()

    now[0] += datetime.timedelta(hours=6)  # a quarter of the life left: next takes over
    assert store.check()
    after = (await get(port, "/cert-hash")).json()
    assert after["hash"] == upcoming
    client = await connect(nursery, relay_url(relay), cert_hash=upcoming)
    await client.aclose()
