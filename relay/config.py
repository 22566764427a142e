"""The relay's settings, built by the CLI (or a test) and never changed afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import ConfigError
from relay.nat.limits import NatLimits
from relay.nat.policy import parse_rule
from relay.nat.settings import IcmpMode


@dataclass(frozen=True)
class RelayConfig:
    """Everything ``relay serve`` can be told."""

    binds: tuple[str, ...] = ("::",)
    """Addresses to listen on; ``::`` is dual-stack (IPv6 and IPv4)."""
    port: int = 4433
    cert_pem: Path | None = None
    key_pem: Path | None = None
    cert_sans: tuple[str, ...] = ()
    self_signed_days: float = 13.0
    heartbeat_interval: float = 30.0
    """How often clients are expected to send a Heartbeat (BAVY clients: every 15 s)."""
    peer_timeout: float = 150.0
    """A session silent this long is closed, so its client reconnects."""
    registration_timeout: float = 30.0
    data_dir: Path = field(default_factory=lambda: Path("relay-data"))
    idle_timeout: float = 180.0
    max_datagram_size: int = 1350
    """QUIC packet size; 1200-1452 (Chromium drops larger packets)."""
    max_connections: int = 4096
    max_half_open: int = 256
    retry_above: int = 32
    always_retry: bool = False
    http: bool = True
    """Serve the dashboard and the HTTP API (cert hash, status, metrics, health) on TCP."""
    http_port: int | None = None
    """TCP port of the HTTP side; None: the QUIC port's number (4433/tcp next to 4433/udp)."""
    http_binds: tuple[str, ...] = ()
    """Addresses for the HTTP side; empty: the QUIC binds."""
    cert_poll_interval: float = 60.0
    """Seconds between checks of the PEM files (reloaded when they change) and of the
    self-signed certificates' age (rotated before expiry)."""
    dns_upstreams: tuple[str, ...] = ()
    """Resolvers the gateway's DNS service forwards to; empty: those in /etc/resolv.conf."""
    guest_mtu: int = 936
    """IP MTU advertised to guests by DHCP: 936 + 14 = 950 bytes, the largest frame the BAVY
    framing carries in one datagram."""
    nat: bool = True
    """Carry guests' ICMP, UDP and TCP to the outside through host sockets."""
    egress_allow: tuple[str, ...] = ()
    """``CIDR[:ports]`` rules that open the default-deny egress table (labs, tests)."""
    egress_deny: tuple[str, ...] = ()
    """``CIDR[:ports]`` rules denied on top of the table; they win over allow rules."""
    icmp_mode: str = "auto"
    """How echo requests leave: auto, socket (ping sockets), raw, off."""
    nat_limits: NatLimits = field(default_factory=NatLimits)
    """Per-VM and global caps on NAT flows, new flows per second and bytes per second."""

    def __post_init__(self) -> None:
        if (self.cert_pem is None) != (self.key_pem is None):
            raise ConfigError("--cert-pem and --key-pem must be given together")
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ConfigError(f"port {self.port} is out of range")
        if not 1200 <= self.max_datagram_size <= 1452:
            raise ConfigError("max datagram size must be within 1200-1452")
        if self.heartbeat_interval <= 0:
            raise ConfigError("--heartbeat-interval must be positive")
        if self.peer_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"--peer-timeout ({self.peer_timeout:g} s) must be at least twice "
                f"--heartbeat-interval ({self.heartbeat_interval:g} s)"
            )
        if self.registration_timeout <= 0:
            raise ConfigError("registration timeout must be positive")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"HTTP port {self.http_port} is out of range")
        if self.cert_poll_interval <= 0:
            raise ConfigError("--cert-poll-interval must be positive")
        if not 576 <= self.guest_mtu <= 1400:
            raise ConfigError("--guest-mtu must be within 576-1400")
        if not self.binds:
            raise ConfigError("at least one --bind address is needed")
        for rule in (*self.egress_allow, *self.egress_deny):
            parse_rule(rule)
        if self.icmp_mode not in {mode.value for mode in IcmpMode}:
            choices = ", ".join(mode.value for mode in IcmpMode)
            raise ConfigError(f"--icmp-mode must be one of {choices}: {self.icmp_mode}")
