"""Who a NAT flow belongs to, and how its packets reach that VM.

A flow keeps the VM's LAN link, MAC and address; everything it sends back is an IPv4 packet
from the gateway's MAC, entering the LAN through the gateway port like a DNS answer does (the
link's ``to_guest`` queues it on the LAN's inbox without blocking, and counts a full queue).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from relay.gateway.core import GATEWAY_IP, GATEWAY_MAC
from relay.packets import build
from relay.packets.headers import ETHERTYPE_IPV4, IPPROTO_ICMP

_idents = itertools.count(1)


class GuestLink(Protocol):
    """The LAN a VM is on (a :class:`relay.lan.network.Network`)."""

    @property
    def name(self) -> str: ...

    def to_guest(self, frame: bytes) -> None:
        """Queue a frame from the gateway port into the LAN (never blocks)."""


@dataclass(frozen=True, slots=True)
class Guest:
    link: GuestLink
    mac: bytes
    ip: bytes

    @property
    def vm(self) -> Hashable:
        """The key of this VM's budget: addresses repeat across LANs."""
        return (self.link.name, self.ip)

    def send_packet(self, src_ip: bytes, proto: int, payload: bytes, mtu: int) -> int:
        """Send ``payload`` from ``src_ip``, fragmented to ``mtu`` if need be; frames sent."""
        packets = build.ipv4_fragments(
            src_ip, self.ip, proto, payload, mtu, ident=next(_idents) & 0xFFFF
        )
        for packet in packets:
            self.link.to_guest(build.ethernet(self.mac, GATEWAY_MAC, ETHERTYPE_IPV4, packet))
        return len(packets)

    def send_unreachable(
        self, code: int, original: bytes, src_ip: bytes = GATEWAY_IP.packed
    ) -> None:
        """ICMP destination unreachable about ``original`` (the guest's IPv4 packet)."""
        message = build.icmp_error(build.ICMP_UNREACHABLE, code, original)
        frame = build.ipv4_frame(self.mac, GATEWAY_MAC, src_ip, self.ip, IPPROTO_ICMP, message)
        self.link.to_guest(frame)
