"""``serve``: wire the QUIC endpoint, sessions and LANs together and run until cancelled."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TextIO

import trio
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from relay import __version__
from relay.certs import CertificateStore
from relay.config import RelayConfig
from relay.errors import ConfigError
from relay.gateway.core import GatewaySettings
from relay.gateway.dns_forwarder import DnsForwarder
from relay.gateway.dns_messages import Upstream, parse_upstream, read_resolv_conf
from relay.lan.leases import LeaseDatabase
from relay.lan.network import Lans
from relay.lan.paths import Framing, parse_path
from relay.nat.host_addresses import host_addresses
from relay.nat.policy import Address, EgressPolicy, parse_rule
from relay.nat.service import Nat
from relay.nat.settings import IcmpMode, NatSettings
from relay.ops.api import HttpApp
from relay.ops.http import serve_http
from relay.ops.metrics import Totals
from relay.ops.notify import Notifier, run_watchdog
from relay.quic import congestion
from relay.quic.connection import QuicPeer
from relay.quic.endpoint import AdmissionLimits, Endpoint
from relay.session.core import Timeouts
from relay.session.raw import RawSession
from relay.session.service import BavySession
from relay.tls import TlsIdentity, generate_self_signed, load_identity

log = logging.getLogger("relay")

MAX_PATH = 256


def load_tls(config: RelayConfig) -> TlsIdentity:
    """The configured PEM identity, or a fresh self-signed one."""
    if config.cert_pem is not None and config.key_pem is not None:
        identity = load_identity(config.cert_pem, config.key_pem)
    else:
        identity = generate_self_signed(config.cert_sans, days=config.self_signed_days)
    for problem in identity.pinning_problems():
        if identity.self_signed:
            log.warning("certificate hash pinning will fail: %s", problem)
    return identity


def prepare_data_dir(config: RelayConfig) -> None:
    """Create ``--data-dir`` (leases and other state live there)."""
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create data directory {config.data_dir}: {exc.strerror}"
        ) from None


def dns_upstreams(config: RelayConfig) -> tuple[Upstream, ...]:
    """``--dns-upstream``, else the host's resolvers."""
    if config.dns_upstreams:
        return tuple(parse_upstream(text) for text in config.dns_upstreams)
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as file:
            upstreams = read_resolv_conf(file.read())
    except OSError as exc:
        log.warning("cannot read /etc/resolv.conf (%s); DNS answers SERVFAIL", exc.strerror)
        return ()
    if not upstreams:
        log.warning("no nameserver in /etc/resolv.conf; DNS answers SERVFAIL")
    return upstreams


def _log_upstreams(upstreams: tuple[Upstream, ...]) -> None:
    if upstreams:
        shown = ", ".join(f"{u.host}:{u.port}" for u in upstreams)
        log.info("guests' DNS (10.0.2.3) is forwarded to %s", shown)


def make_nat(config: RelayConfig) -> Nat | None:
    """The NAT with the egress policy: the built-in table, the operator's rules, and this
    host's own addresses (a VM must not reach the relay's other services)."""
    if not config.nat:
        return None
    policy = EgressPolicy(
        allow=[parse_rule(text) for text in config.egress_allow],
        deny=[parse_rule(text) for text in config.egress_deny],
        host_addresses=own_addresses(),
    )
    settings = NatSettings(
        mtu=config.guest_mtu, icmp_mode=IcmpMode(config.icmp_mode), limits=config.nat_limits
    )
    return Nat(policy, settings, read_host_addresses=own_addresses)


def own_addresses() -> frozenset[Address]:
    """This host's addresses but loopback, which the table denies already (and whose own
    reason is clearer in the counters)."""
    return frozenset(address for address in host_addresses() if not address.is_loopback)


def quic_configuration(config: RelayConfig, identity: TlsIdentity) -> QuicConfiguration:
    quic = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        max_datagram_frame_size=65536,
        congestion_control_algorithm=congestion.NAME,
        idle_timeout=config.idle_timeout,
        max_datagram_size=config.max_datagram_size,
    )
    quic.certificate = identity.certificate
    quic.certificate_chain = list(identity.chain)
    quic.private_key = identity.private_key
    return quic


@dataclass
class Listening:
    """What ``serve`` reports once it is ready."""

    addresses: list[tuple[str, int]]
    identity: TlsIdentity
    relay: Relay
    http_addresses: list[tuple[str, int]] = field(default_factory=list)
    http: HttpApp | None = None


class Relay:
    """The running relay: its endpoint, its LANs, its certificates."""

    def __init__(
        self, config: RelayConfig, certs: CertificateStore, lans: Lans, totals: Totals
    ) -> None:
        self.config = config
        self.certs = certs
        self.totals = totals
        self.lans = lans
        self.timeouts = Timeouts(registration=config.registration_timeout, peer=config.peer_timeout)
        self.endpoint = Endpoint(
            certs.quic_configuration,
            self.open_session,
            AdmissionLimits(
                max_connections=config.max_connections,
                max_half_open=config.max_half_open,
                retry_above=config.retry_above,
                always_retry=config.always_retry,
            ),
            on_forget=totals.peer_closed,
        )

    def open_session(
        self, peer: QuicPeer, stream_id: int, path: str, now: float
    ) -> BavySession | RawSession | int:
        """Accept a WebTransport CONNECT; the path names the LAN and the framing."""
        if len(path) > MAX_PATH:
            return 400
        lan_path = parse_path(path)
        if lan_path is None:
            return 404
        network = self.lans.get(lan_path.lan)
        if network is None:
            return 503
        log.info("%s: WebTransport session on %s (stream %d)", peer.label, path, stream_id)
        observer = self.totals.session_closed
        if lan_path.framing is Framing.RAW:
            return RawSession(peer, stream_id, network, now, observer)
        return BavySession(peer, stream_id, network, self.timeouts, now, observer)


def _url_host(host: str) -> str:
    if host in ("::", "0.0.0.0"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


async def serve(
    config: RelayConfig,
    *,
    identity: TlsIdentity | None = None,
    out: TextIO | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until cancelled; then close every session and connection."""
    out = out or sys.stdout
    identity = identity or load_tls(config)
    prepare_data_dir(config)
    upstreams = dns_upstreams(config)
    notifier = Notifier.from_environment()
    leases = LeaseDatabase.in_dir(config.data_dir)
    totals = Totals()
    nat = make_nat(config)
    try:
        async with trio.open_nursery() as nursery:
            if nat is not None:
                await nursery.start(nat.run)
            lans = Lans(
                nursery,
                takeover_after=2 * config.heartbeat_interval,
                allocator_factory=leases.pool,
                dns=DnsForwarder(upstreams),
                gateway=GatewaySettings(mtu=config.guest_mtu),
                on_removed=totals.lan_removed,
                nat=nat,
            )
            certs = CertificateStore(config, initial=identity)
            relay = Relay(config, certs, lans, totals)
            app = HttpApp(relay, certs, started=time.time(), version=__version__, totals=totals)
            nursery.start_soon(certs.run, config.cert_poll_interval)
            try:
                addresses = await nursery.start(
                    relay.endpoint.serve, [(host, config.port) for host in config.binds]
                )
                http_addresses: list[tuple[str, int]] = []
                if config.http:
                    http_addresses = await nursery.start(
                        partial(
                            serve_http,
                            app,
                            _http_binds(config, addresses),
                            ssl_context=certs.ssl_context,
                        )
                    )
                _announce(
                    out, identity, addresses, http_addresses, https=certs.ssl_context() is not None
                )
                _log_upstreams(upstreams)
                if nat is not None:
                    nat.log_mode()
                notifier.ready(f"listening on udp port {addresses[0][1]}")
                nursery.start_soon(run_watchdog, notifier)
                task_status.started(Listening(addresses, identity, relay, http_addresses, app))
                await trio.sleep_forever()
            finally:
                # Sessions get their close capsule and CONNECTION_CLOSE synchronously, so the
                # browsers reconnect at once instead of waiting out an idle timeout.
                app.draining = True
                notifier.stopping()
                relay.endpoint.close_all()
                nursery.cancel_scope.cancel()
    finally:
        leases.close()


def _http_binds(config: RelayConfig, quic: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``--http-bind`` (default: the QUIC binds) at ``--http-port`` (default: the QUIC port)."""
    port = config.http_port if config.http_port is not None else quic[0][1]
    return [(host, port) for host in (config.http_binds or config.binds)]


def _announce(
    out: TextIO,
    identity: TlsIdentity,
    addresses: list[tuple[str, int]],
    http_addresses: list[tuple[str, int]],
    *,
    https: bool,
) -> None:
    print(f"Certificate SHA-256 Hash: {identity.hash_colon}", file=out)
    print(f"Certificate SHA-256 Hash (hex): {identity.hash_hex}", file=out)
    print(
        f"Certificate valid {identity.not_before:%Y-%m-%d %H:%M} to "
        f"{identity.not_after:%Y-%m-%d %H:%M} UTC ({identity.source})",
        file=out,
    )
    for host, port in addresses:
        print(f"Listening on https://{_url_host(host)}:{port}/ (udp {host})", file=out)
    scheme = "https" if https else "http"
    for host, port in http_addresses:
        print(f"Dashboard and API on {scheme}://{_url_host(host)}:{port}/ (tcp {host})", file=out)
    out.flush()
