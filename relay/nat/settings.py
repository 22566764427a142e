"""The NAT's settings (sans-IO: the config module and the tests import them freely)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from relay.nat.limits import NatLimits


class IcmpMode(Enum):
    """How echo requests reach the outside (see :mod:`relay.nat.icmp`)."""

    AUTO = "auto"
    SOCKET = "socket"
    RAW = "raw"
    COMMAND = "command"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class NatSettings:
    mtu: int = 936
    """The guests' IP MTU: packets to a guest are fragmented (UDP, ICMP) or segmented (TCP
    MSS) to fit it."""
    udp_idle: float = 120.0
    """RFC 4787: a UDP mapping lives at least 2 minutes without traffic."""
    dns_idle: float = 10.0
    """UDP flows to port 53 end sooner: one query, one answer."""
    icmp_idle: float = 60.0
    tcp_connect_timeout: float = 20.0
    """A host connect not done by then: ICMP host unreachable to the guest."""
    icmp_mode: IcmpMode = IcmpMode.AUTO
    host_address_refresh: float = 30.0
    """Seconds between re-reads of the host's own addresses (a DHCP renewal may change them)."""
    limits: NatLimits = field(default_factory=NatLimits)
