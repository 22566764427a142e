"""The JSON documents of /cert-hash, /status and /readyz, built from the running relay.

Pure functions over the relay's live objects: nothing is counted here, everything is read at
request time. Times in the relay are trio's clock; ``Clocks`` converts them to wall-clock
ISO 8601 (``wall = wall_now - (trio_now - t)``). No trio import: the caller passes the clocks.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.tls import TlsIdentity
from relay.wire.messages import format_mac

if TYPE_CHECKING:
    from relay.lan.network import Network, Port
    from relay.server import Relay

Json = dict[str, Any]

MAX_PEERS_LISTED = 1024
"""Peers listed per LAN in /status (``peer_count`` is always exact)."""


@dataclass(frozen=True, slots=True)
class Clocks:
    """One instant on both clocks, to convert trio times to wall-clock times."""

    wall: float
    """``time.time()``"""
    trio: float
    """``trio.current_time()``"""

    def iso(self, trio_time: float) -> str:
        return iso8601(self.wall - (self.trio - trio_time))


def iso8601(wall: float | datetime.datetime) -> str:
    """UTC, millisecond precision, ``Z`` suffix (what JavaScript's ``Date`` parses)."""
    if not isinstance(wall, datetime.datetime):
        wall = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    text = wall.astimezone(datetime.UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- /cert-hash -----------------------------------------------------------------------------


def cert_hash_document(published: Sequence[TlsIdentity]) -> Json:
    """Current certificate first, then the next one (self-signed rotation).

    ``hashes`` is shaped for ``new WebTransport(url, {serverCertificateHashes})`` except that
    ``value`` is hex: the page converts it to bytes (``Uint8Array`` of the hex pairs).
    """
    current = published[0]
    return {
        "algorithm": "sha-256",
        "hash": current.hash_hex,
        "not_after": iso8601(current.not_after),
        "hashes": [
            {
                "algorithm": "sha-256",
                "value": identity.hash_hex,
                "not_before": iso8601(identity.not_before),
                "not_after": iso8601(identity.not_after),
            }
            for identity in published
        ],
        "self_signed": current.self_signed,
    }


# -- /readyz --------------------------------------------------------------------------------


def readiness(
    relay: Relay, certificate: TlsIdentity, now: datetime.datetime, *, draining: bool = False
) -> tuple[bool, Json]:
    """Ready when the QUIC endpoint listens and the current certificate is valid now."""
    checks = {
        "quic_listening": _quic_listening(relay),
        "certificate_valid": certificate.not_before <= now < certificate.not_after,
        "not_draining": not draining,
    }
    failing = [name for name, ok in checks.items() if not ok]
    document: Json = {
        "status": "fail" if failing else "pass",
        "checks": {name: "pass" if ok else "fail" for name, ok in checks.items()},
    }
    if failing:
        document["failing"] = failing
    return not failing, document


def _quic_listening(relay: Relay) -> bool:
    sockets = relay.endpoint.sockets
    return bool(sockets) and all(sock.fileno() != -1 for sock in sockets)


def quic_addresses(relay: Relay) -> list[str]:
    addresses = []
    for sock in relay.endpoint.sockets:
        try:
            name = sock.getsockname()
        except OSError:  # closed at shutdown
            continue
        addresses.append(host_port((str(name[0]), int(name[1]))))
    return addresses


# -- /status --------------------------------------------------------------------------------


def relay_status(
    relay: Relay,
    certificate: TlsIdentity,
    *,
    version: str,
    started: float,
    clocks: Clocks,
    http_addresses: Iterable[tuple[str, int]],
) -> Json:
    """Everything an operator (or the dashboard) wants to see at a glance."""
    endpoint = relay.endpoint
    dns = relay.lans.dns
    return {
        "version": version,
        "started_at": iso8601(started),
        "now": iso8601(clocks.wall),
        "uptime_s": round(max(0.0, clocks.wall - started), 3),
        "listening": {
            "quic": quic_addresses(relay),
            "http": [host_port(a) for a in http_addresses],
        },
        "certificate": {
            "hash": certificate.hash_hex,
            "not_before": iso8601(certificate.not_before),
            "not_after": iso8601(certificate.not_after),
            "self_signed": certificate.self_signed,
        },
        "lans": [lan_status(network, clocks) for network in list(relay.lans.networks.values())],
        "lans_refused": relay.lans.refused,
        "lans_evicted": relay.lans.evicted,
        "nat": nat_status(relay),
        "quic": {
            "connections": len(endpoint.peers),
            "half_open": endpoint.half_open,
            "handshakes_started": endpoint.handshakes_started,
            "retries_sent": endpoint.retries_sent,
            "drops": _counts(endpoint.drops),
        },
        "dns": {
            "upstreams": []
            if dns is None
            else [host_port((u.host, u.port)) for u in dns.upstreams],
            "in_flight": 0 if dns is None else dns.inflight,
            "stats": {} if dns is None else _counts(dns.stats),
        },
    }


def lan_status(network: Network, clocks: Clocks) -> Json:
    switch = network.switch
    ports = list(network.ports.values())
    drops: Counter[str] = Counter()
    drops.update(switch.drops)
    drops.update(network.drops)
    return {
        "name": network.name,
        "peer_count": len(ports),
        "peers": [peer_status(port, clocks) for port in ports[:MAX_PEERS_LISTED]],
        "frames_switched": switch.frames_switched,
        "frames_flooded": switch.frames_flooded,
        "mac_entries": switch.table_size,
        "drops": _counts(drops),
        "gateway": {
            "answered": _counts(network.gateway.stats.answered),
            "drops": _counts(network.gateway.stats.drops),
        },
    }


def peer_status(port: Port, clocks: Clocks) -> Json:
    counters = port.network.switch.ports.get(port.port_id)
    return {
        "mac": None if port.mac is None else format_mac(port.mac),
        "ip": None if port.ip is None else str(port.ip),
        "raw": port.raw,
        "connected_since": clocks.iso(port.connected_at),
        "last_seen": clocks.iso(port.last_seen),
        "frames_in": 0 if counters is None else counters.frames_in,
        "frames_out": 0 if counters is None else counters.frames_out,
        "bytes_in": 0 if counters is None else counters.bytes_in,
        "bytes_out": 0 if counters is None else counters.bytes_out,
        "drops": {} if counters is None else _counts(counters.drops),
    }


def _counts(counter: Counter[str]) -> dict[str, int]:
    return {str(key): value for key, value in sorted(counter.items()) if value}


def nat_status(relay: Relay) -> Json:
    nat = relay.lans.nat
    if nat is None:
        return {"available": False, "flows": 0, "tcp": 0, "udp": 0, "icmp": 0}
    counts = nat.flow_counts()
    return {
        "available": True,
        "flows": sum(counts.values()),
        **counts,
        "icmp_mode": nat.icmp_mode.value,
        "events": _counts(nat.context.events),
        "drops": _counts(nat.context.drops),
        "refusals": _counts(nat.context.budget.refusals),
    }
