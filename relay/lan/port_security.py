"""Port security: what a port may send, checked on every frame it sends into the switch.

The relay *is* the switch, so enforcement is exact (libvirt ``clean-traffic`` rules): a port
sends only from the MAC it registered (a raw port: the first MAC it used) and only from its
own leased IPv4 address, or 0.0.0.0 for DHCP. ARP must carry the same binding, so no ARP reply
can claim 10.0.2.2, 10.0.2.3 or another VM's address. No DHCP server replies from guests, no
VLAN tags, and — the LAN being IPv4 only — no other EtherTypes. Broadcast, multicast and
unknown-unicast frames are rate-limited per port and per network (storm control).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from relay.packets.headers import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    IPPROTO_UDP,
    VLAN_ETHERTYPES,
    FrameHeader,
)

UNSPECIFIED = b"\x00\x00\x00\x00"
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
ARP_REQUEST = 1


class Violation(StrEnum):
    """Why port security dropped a frame; also a bounded counter label."""

    GROUP_SOURCE = "group_source_mac"
    SPOOFED_MAC = "spoofed_source_mac"
    SPOOFED_IP = "spoofed_source_ip"
    ARP_SPOOF = "arp_spoof"
    ROGUE_DHCP = "rogue_dhcp_server"
    VLAN = "vlan_tagged"
    ETHERTYPE = "unsupported_ethertype"
    STORM = "storm_control"


@dataclass(frozen=True, slots=True)
class Binding:
    """The MAC and IPv4 address (4 bytes) a port owns."""

    mac: bytes
    ip: bytes


def check(binding: Binding, header: FrameHeader) -> Violation | None:
    """The rule ``header`` breaks, or None if the port may send it."""
    if header.src[0] & 1:
        return Violation.GROUP_SOURCE
    if header.src != binding.mac:
        return Violation.SPOOFED_MAC
    ip = header.ipv4
    if ip is not None:
        if ip.proto == IPPROTO_UDP and ip.ports is not None:
            if ip.ports[0] == DHCP_SERVER_PORT:
                return Violation.ROGUE_DHCP
            if ip.src == UNSPECIFIED and ip.ports == (DHCP_CLIENT_PORT, DHCP_SERVER_PORT):
                return None
        return None if ip.src == binding.ip else Violation.SPOOFED_IP
    arp = header.arp
    if arp is not None:
        if arp.sender_mac != binding.mac:
            return Violation.ARP_SPOOF
        if arp.sender_ip == binding.ip or (arp.sender_ip == UNSPECIFIED and arp.op == ARP_REQUEST):
            return None
        return Violation.ARP_SPOOF
    if header.ethertype in VLAN_ETHERTYPES:
        return Violation.VLAN
    if header.ethertype in (ETHERTYPE_IPV4, ETHERTYPE_ARP):  # truncated: read_header refused
        return None
    return Violation.ETHERTYPE


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
