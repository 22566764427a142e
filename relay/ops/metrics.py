"""Prometheus metrics read from the relay's live objects at scrape time.

The frame path keeps its own plain counters (switch, sessions, queues, endpoint); this
collector adds them up when Prometheus asks, so nothing is counted twice. Labels are bounded
sets of code-defined reasons — never a MAC, an IP, a session or a LAN name.

Counters of sessions, connections and LANs vanish with their objects; :class:`Totals` keeps
what they had counted when they close, so the ``_total`` series never go backwards. It needs
three hooks in the relay (see the methods); without them those series cover live objects only.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.session.core import SessionProtocol
from relay.tls import TlsIdentity

if TYPE_CHECKING:
    from relay.lan.network import Network
    from relay.ops.http import HttpStats
    from relay.quic.connection import QuicPeer, WebTransportSession
    from relay.server import Relay

MAX_LABEL_VALUES = 64
"""Distinct values one label may take in one family; the rest are summed as ``other``."""


@dataclass
class _Counts:
    """Counters kept for objects that have gone (and, at scrape time, the live sum)."""

    sessions_closed: Counter[str] = field(default_factory=Counter)
    session_frames: Counter[str] = field(default_factory=Counter)
    session_bytes: Counter[str] = field(default_factory=Counter)
    frame_drops: Counter[tuple[str, str]] = field(default_factory=Counter)
    quic_drops: Counter[str] = field(default_factory=Counter)
    queue_drops: Counter[str] = field(default_factory=Counter)
    gateway_answers: Counter[str] = field(default_factory=Counter)
    frames_switched: int = 0
    frames_flooded: int = 0

    def add(self, other: _Counts) -> None:
        self.sessions_closed.update(other.sessions_closed)
        self.session_frames.update(other.session_frames)
        self.session_bytes.update(other.session_bytes)
        self.frame_drops.update(other.frame_drops)
        self.quic_drops.update(other.quic_drops)
        self.queue_drops.update(other.queue_drops)
        self.gateway_answers.update(other.gateway_answers)
        self.frames_switched += other.frames_switched
        self.frames_flooded += other.frames_flooded


def _add_session(counts: _Counts, session: WebTransportSession) -> None:
    """A session's own counters (its switch port's frames and bytes, its drops)."""
    network: Network | None = getattr(session, "network", None)
    port = getattr(session, "port", None)
    if network is not None and port is not None:
        counters = network.switch.ports.get(port.port_id)
        if counters is not None:
            counts.session_frames["in"] += counters.frames_in
            counts.session_frames["out"] += counters.frames_out
            counts.session_bytes["in"] += counters.bytes_in
            counts.session_bytes["out"] += counters.bytes_out
    core = getattr(session, "core", None)
    if isinstance(core, SessionProtocol):
        _add_drops(counts, "session", core.drops)
        _add_drops(counts, "reassembly", core.reassembler.drops)
    drops = getattr(session, "drops", None)  # a raw session's
    if isinstance(drops, Counter):
        _add_drops(counts, "session", drops)


def _add_drops(counts: _Counts, stage: str, drops: Mapping[str, int]) -> None:
    for reason, n in drops.items():
        counts.frame_drops[stage, str(reason)] += n


def _add_peer(counts: _Counts, peer: QuicPeer) -> None:
    counts.quic_drops.update(peer.drops)
    counts.queue_drops.update(peer.queue.drops)


def _add_network(counts: _Counts, network: Network) -> None:
    switch = network.switch
    counts.frames_switched += switch.frames_switched
    counts.frames_flooded += switch.frames_flooded
    _add_drops(counts, "switch", switch.drops)
    _add_drops(counts, "lan", network.drops)
    _add_drops(counts, "gateway", network.gateway.stats.drops)
    counts.gateway_answers.update(network.gateway.stats.answered)


def close_label(session: WebTransportSession) -> str:
    """Why a session closed, as a bounded label."""
    core = getattr(session, "core", None)
    if isinstance(core, SessionProtocol):
        return str(core.close_reason or "transport_closed")
    return "raw"


class Totals:
    """What closed sessions, connections and evicted LANs had counted.

    Hooks (each idempotent, so calling one twice for an object is harmless):

    * :meth:`session_closed` at the start of ``BavySession.on_closed`` and
      ``RawSession.on_closed`` (before ``network.detach``: the switch port's counters are read);
    * :meth:`peer_closed` in ``Endpoint.forget``;
    * :meth:`lan_removed` in ``Lans._evict_idle`` when a LAN is dropped.
    """

    def __init__(self) -> None:
        self.counts = _Counts()
        self._folded: weakref.WeakSet[object] = weakref.WeakSet()

    def _first_time(self, thing: object) -> bool:
        if thing in self._folded:
            return False
        self._folded.add(thing)
        return True

    def session_closed(self, session: WebTransportSession) -> None:
        if self._first_time(session):
            _add_session(self.counts, session)
            self.counts.sessions_closed[close_label(session)] += 1

    def peer_closed(self, peer: QuicPeer) -> None:
        if self._first_time(peer):
            _add_peer(self.counts, peer)

    def lan_removed(self, network: Network) -> None:
        if self._first_time(network):
            _add_network(self.counts, network)


def _live(relay: Relay) -> tuple[_Counts, Counter[tuple[str, str]]]:
    """The live objects' counters, and sessions now by (framing, state)."""
    counts = _Counts()
    sessions: Counter[tuple[str, str]] = Counter()
    for peer in list(relay.endpoint.peers):
        _add_peer(counts, peer)
        for session in list(peer.sessions.values()):
            _add_session(counts, session)
    for network in list(relay.lans.networks.values()):
        _add_network(counts, network)
        for port in list(network.ports.values()):
            framing = "raw" if port.raw else "bavy"
            sessions[framing, "registering" if port.mac is None else "registered"] += 1
    return counts, sessions


def _bounded(counter: Mapping[str, int]) -> Iterator[tuple[str, int]]:
    """Label values in a stable order; past :data:`MAX_LABEL_VALUES` they sum as ``other``."""
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    other = 0
    for index, (label, value) in enumerate(items):
        if index < MAX_LABEL_VALUES:
            yield label, value
        else:
            other += value
    if other:
        yield "other", other


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, counter: Mapping[str, int]
) -> CounterMetricFamily | GaugeMetricFamily:
    for label, value in _bounded(counter):
        family.add_metric([label], value)
    return family


class RelayCollector(Collector):
    """``relay_*`` metrics of one running relay (register it on a private registry)."""

    def __init__(
        self,
        relay: Relay,
        certificate: Callable[[], TlsIdentity],
        *,
        version: str,
        started: float,
        totals: Totals | None = None,
        http: HttpStats | None = None,
    ) -> None:
        self.relay = relay
        self.certificate = certificate
        self.version = version
        self.started = started
        self.totals = totals or Totals()
        self.http = http

    def collect(self) -> Iterable[Metric]:
        relay = self.relay
        live, sessions = _live(relay)
        counts = _Counts()
        counts.add(self.totals.counts)
        counts.add(live)

        yield InfoMetricFamily(
            "relay_build", "The relay's version.", value={"version": self.version}
        )
        yield _gauge(
            "relay_start_time_seconds", "When the relay started (Unix time).", self.started
        )
        yield _gauge("relay_lans", "LANs now.", len(relay.lans.networks))
        yield _counter(
            "relay_lans_refused_total", "New LANs refused at the cap.", relay.lans.refused
        )
        yield _counter(
            "relay_lans_evicted_total", "Idle LANs evicted at the cap.", relay.lans.evicted
        )
        family = GaugeMetricFamily(
            "relay_sessions", "WebTransport sessions now.", labels=["framing", "state"]
        )
        for framing in ("bavy", "raw"):
            for state in ("registering", "registered"):
                family.add_metric([framing, state], sessions[framing, state])
        yield family
        closed = sum(counts.sessions_closed.values())
        yield _counter(
            "relay_sessions_opened_total", "Sessions accepted.", closed + sum(sessions.values())
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_sessions_closed_total", "Sessions ended, by reason.", labels=["reason"]
            ),
            counts.sessions_closed,
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_session_frames_total",
                "Frames accepted from clients (in) and delivered to them (out).",
                labels=["direction"],
            ),
            {"in": counts.session_frames["in"], "out": counts.session_frames["out"]},
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_session_bytes_total",
                "Frame bytes accepted from clients (in) and delivered to them (out).",
                labels=["direction"],
            ),
            {"in": counts.session_bytes["in"], "out": counts.session_bytes["out"]},
        )
        yield _counter(
            "relay_frames_switched_total", "Frames the switches forwarded.", counts.frames_switched
        )
        yield _counter(
            "relay_frames_flooded_total",
            "Frames flooded (broadcast, multicast, unknown unicast).",
            counts.frames_flooded,
        )
        drops = CounterMetricFamily(
            "relay_frame_drops_total",
            "Frames and datagrams dropped, by stage and reason.",
            labels=["stage", "reason"],
        )
        for stage in ("session", "reassembly", "lan", "switch", "gateway"):
            per_stage = {r: n for (s, r), n in counts.frame_drops.items() if s == stage}
            for reason, value in _bounded(per_stage):
                drops.add_metric([stage, reason], value)
        yield drops
        yield _labelled(
            CounterMetricFamily(
                "relay_gateway_answers_total",
                "Answers of the gateway's services.",
                labels=["service"],
            ),
            counts.gateway_answers,
        )
        yield _gauge(
            "relay_mac_entries",
            "MAC table entries over all LANs.",
            sum(n.switch.table_size for n in list(relay.lans.networks.values())),
        )
        yield from _nat(relay)
        yield from self._quic(counts)
        yield from _udp_kernel_errors()
        yield from self._dns()
        yield from self._tls()
        yield from self._http()

    def _quic(self, counts: _Counts) -> Iterator[Metric]:
        relay = self.relay
        endpoint = relay.endpoint
        peers = list(endpoint.peers)
        yield _gauge("relay_quic_connections", "QUIC connections now.", len(peers))
        yield _gauge(
            "relay_quic_handshakes_in_flight", "Handshakes not yet complete.", endpoint.half_open
        )
        yield _counter(
            "relay_quic_handshakes_total", "Handshakes started.", endpoint.handshakes_started
        )
        yield _counter(
            "relay_quic_retries_sent_total", "Retry packets sent.", endpoint.retries_sent
        )
        quic_drops: Counter[str] = Counter(endpoint.drops)
        quic_drops.update(counts.quic_drops)
        yield _labelled(
            CounterMetricFamily(
                "relay_quic_drops_total",
                "UDP packets, requests and datagrams dropped by QUIC connections and the endpoint.",
                labels=["reason"],
            ),
            quic_drops,
        )
        yield _gauge(
            "relay_datagram_queue_datagrams",
            "Datagrams waiting in the connections' send queues.",
            sum(len(p.queue) for p in peers),
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_datagram_queue_drops_total",
                "Outgoing datagrams dropped before sending.",
                labels=["reason"],
            ),
            counts.queue_drops,
        )
        held = 0
        for peer in peers:
            for session in list(peer.sessions.values()):
                core = getattr(session, "core", None)
                if isinstance(core, SessionProtocol):
                    held += core.reassembler.bytes_held
        yield _gauge("relay_reassembly_bytes", "Bytes held in partial frames.", held)

    def _dns(self) -> Iterator[Metric]:
        dns = self.relay.lans.dns
        stats: Counter[str] = Counter() if dns is None else dns.stats
        yield _counter(
            "relay_dns_queries_total", "Guests' DNS queries forwarded.", stats["queries"]
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_dns_events_total",
                "What happened to forwarded DNS queries (answers, errors, timeouts, fallbacks).",
                labels=["event"],
            ),
            {k: v for k, v in stats.items() if k != "queries"},
        )
        yield _gauge(
            "relay_dns_queries_in_flight",
            "DNS queries waiting for upstreams.",
            dns.inflight if dns else 0,
        )

    def _tls(self) -> Iterator[Metric]:
        certificate = self.certificate()
        yield _gauge(
            "relay_tls_cert_expiry_timestamp_seconds",
            "When the current certificate expires (Unix time).",
            certificate.not_after.timestamp(),
        )
        yield _gauge(
            "relay_tls_cert_not_before_timestamp_seconds",
            "When the current certificate became valid (Unix time).",
            certificate.not_before.timestamp(),
        )

    def _http(self) -> Iterator[Metric]:
        http = self.http
        if http is None:
            return
        yield _gauge("relay_http_connections", "HTTP connections open now.", http.active)
        yield _counter(
            "relay_http_connections_total", "HTTP connections accepted.", http.connections
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_http_responses_total", "HTTP responses, by status code.", labels=["code"]
            ),
            {str(code): n for code, n in http.responses.items()},
        )
        yield _labelled(
            CounterMetricFamily(
                "relay_http_connection_drops_total",
                "HTTP connections ended abnormally, by reason.",
                labels=["reason"],
            ),
            http.drops,
        )


SNMP_PATH = "/proc/net/snmp"


def udp_kernel_counters(text: str) -> dict[str, int]:
    """The ``Udp:`` counters of a ``/proc/net/snmp`` text (header line, then values)."""
    rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2 or len(rows[0]) != len(rows[1]):
        return {}
    try:
        return {name: int(value) for name, value in zip(rows[0][1:], rows[1][1:], strict=True)}
    except ValueError:
        return {}


def _udp_kernel_errors(path: str = SNMP_PATH) -> Iterator[Metric]:
    """The kernel's UDP drops in the relay's network namespace: a QUIC relay that cannot
    drain its socket fast enough shows up here first (the relay cannot count those itself)."""
    try:
        with open(path, encoding="ascii") as snmp:
            counters = udp_kernel_counters(snmp.read())
    except OSError:
        return
    family = CounterMetricFamily(
        "relay_udp_kernel_errors",
        "UDP datagrams the kernel dropped (whole network namespace, every socket), by kind.",
        labels=["kind"],
    )
    for name, kind in (
        ("RcvbufErrors", "receive_buffer"),
        ("SndbufErrors", "send_buffer"),
        ("InErrors", "input"),
    ):
        if name in counters:
            family.add_metric([kind], counters[name])
    yield family


def _nat(relay: Relay) -> Iterator[Metric]:
    nat = relay.lans.nat
    flows = GaugeMetricFamily("relay_nat_flows", "NAT flows now, by protocol.", labels=["proto"])
    for proto, count in ({} if nat is None else nat.flow_counts()).items():
        flows.add_metric([proto], count)
    yield flows
    events: Mapping[str, int] = {} if nat is None else nat.context.events
    drops: Mapping[str, int] = {} if nat is None else nat.context.drops
    yield _labelled(
        CounterMetricFamily(
            "relay_nat_events",
            "NAT flows opened and closed, datagrams, by event.",
            labels=["event"],
        ),
        events,
    )
    yield _labelled(
        CounterMetricFamily(
            "relay_nat_drops",
            "Guest packets the NAT did not forward (egress policy, limits, errors), by reason.",
            labels=["reason"],
        ),
        drops,
    )
