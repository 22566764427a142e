"""The gateway's port on the switch, sans-IO: ARP, ping, DHCP and DNS for 10.0.2.2 and .3.

Frames reach :meth:`Gateway.handle` when the switch sends them to the gateway port (unicast
to its MAC, or flooded). Answers that need no I/O (ARP, ICMP echo, DHCP) come back at once as
frames; a DNS query becomes a :class:`DnsRequest` the driver resolves off the frame path and
turns into a frame with :meth:`Gateway.dns_answer`; packets for the outside world become
:class:`Outbound` for the NAT. dpkt parses the payloads; whatever it or the services raise
on bad bytes is counted and dropped here, never passed on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

import dpkt

from relay.errors import RemoteProtocolError
from relay.gateway.dhcp import DhcpServer, DhcpSettings
from relay.gateway.dns_messages import check_query, udp_size_limit
from relay.lan.port_security import Binding
from relay.packets import build
from relay.packets.headers import IPPROTO_ICMP, IPPROTO_UDP, FrameHeader

log = logging.getLogger("relay.gateway")

GATEWAY_MAC = bytes.fromhex("525400123456")
NETWORK = IPv4Network("10.0.2.0/24")
GATEWAY_IP = IPv4Address("10.0.2.2")
DNS_IP = IPv4Address("10.0.2.3")
LIMITED_BROADCAST = b"\xff\xff\xff\xff"
DHCP_SERVER_PORT, DHCP_CLIENT_PORT, DNS_PORT = 67, 68, 53
IP_HEADER, UDP_HEADER = 20, 8


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    mtu: int = 936
    """The guests' IP MTU, advertised by DHCP: 936 + 14 = 950 bytes, the largest frame the BAVY
    framing sends in one datagram (larger frames are split into chunks, and a lost chunk
    loses the frame)."""
    domain_name: str = "relay.internal"
    lease_time: int = 3600


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame the gateway sends into the switch."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class DnsRequest:
    """A guest's DNS query to forward; answer with :meth:`Gateway.dns_answer`."""

    query: bytes
    client_mac: bytes
    client_ip: bytes
    client_port: int
    server_ip: bytes
    max_udp_size: int


@dataclass(frozen=True, slots=True)
class Outbound:
    """An IPv4 packet for an address outside the LAN (the NAT's job)."""

    frame: bytes
    header: FrameHeader


Output = Reply | DnsRequest | Outbound


class GatewayDrop(RemoteProtocolError):
    """A frame for the gateway that it cannot use."""


@dataclass
class GatewayStats:
    answered: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)


class Gateway:
    """10.0.2.2 (and the DNS address 10.0.2.3) on one LAN."""

    def __init__(self, settings: GatewaySettings | None = None) -> None:
        self.settings = settings or GatewaySettings()
        self.mac = GATEWAY_MAC
        self.ip = GATEWAY_IP.packed
        self.own_ips = frozenset({GATEWAY_IP.packed, DNS_IP.packed})
        self.dhcp = DhcpServer(
            DhcpSettings(
                server_ip=GATEWAY_IP,
                router=GATEWAY_IP,
                dns_servers=(DNS_IP,),
                domain_name=self.settings.domain_name,
                lease_time=self.settings.lease_time,
                mtu=self.settings.mtu,
            )
        )
        self.stats = GatewayStats()
        self._network = int(NETWORK.network_address)
        self._netmask = int(NETWORK.netmask)

    @property
    def binding(self) -> Binding:
        return Binding(self.mac, self.ip)

    def handle(
        self, frame: bytes, header: FrameHeader, sender: Binding, now: float
    ) -> list[Output]:
        """Serve ``frame`` from the port bound to ``sender`` (already port-security checked)."""
        try:
            outputs = self._serve(frame, header, sender, now)
        except RemoteProtocolError as exc:
            self.stats.drops[exc.reason] += 1
            log.debug("gateway dropped a frame: %s", exc)
            return []
        return outputs

    def _serve(
        self, frame: bytes, header: FrameHeader, sender: Binding, now: float
    ) -> list[Output]:
        if header.arp is not None:
            arp = header.arp
            if arp.op == build.ARP_REQUEST and arp.target_ip in self.own_ips:
                self.stats.answered["arp"] += 1
                return [
                    Reply(
                        build.arp_frame(
                            build.ARP_REPLY, self.mac, arp.target_ip, arp.sender_mac, arp.sender_ip
                        )
                    )
                ]
            return []  # someone else's ARP, flooded to every port
        ip = header.ipv4
        if ip is None:
            return []
        for_us = header.dst == self.mac
        if ip.proto == IPPROTO_UDP and ip.ports == (DHCP_CLIENT_PORT, DHCP_SERVER_PORT):
            if for_us or ip.dst == LIMITED_BROADCAST:
                return self._dhcp(frame, ip.header_len, ip.total_len, sender, now)
            return []
        if not for_us:
            return []  # another guest's broadcast or multicast
        if ip.dst in self.own_ips:
            return self._to_gateway(frame, header, sender)
        if int.from_bytes(ip.dst, "big") & self._netmask == self._network:
            raise GatewayDrop("frame to a LAN address sent to the gateway", reason="misrouted")
        return [Outbound(frame, header)]

    def _to_gateway(self, frame: bytes, header: FrameHeader, sender: Binding) -> list[Output]:
        ip = header.ipv4
        assert ip is not None
        payload = _l4_payload(frame, ip.header_len, ip.total_len)
        if ip.proto == IPPROTO_ICMP:
            return self._icmp(payload, ip.dst, sender)
        if ip.proto == IPPROTO_UDP and ip.ports is not None and ip.ports[1] == DNS_PORT:
            udp = _parse(dpkt.udp.UDP, payload, "udp")
            query = bytes(udp.data)
            check_query(query)
            self.stats.answered["dns_query"] += 1
            return [
                DnsRequest(
                    query=query,
                    client_mac=sender.mac,
                    client_ip=sender.ip,
                    client_port=int(udp.sport),
                    server_ip=ip.dst,
                    max_udp_size=min(
                        self.settings.mtu - IP_HEADER - UDP_HEADER, udp_size_limit(query)
                    ),
                )
            ]
        raise GatewayDrop("no service on this port of the gateway", reason="no_service")

    def _icmp(self, payload: bytes, dst: bytes, sender: Binding) -> list[Output]:
        message = _parse(dpkt.icmp.ICMP, payload, "icmp")
        if message.type != build.ICMP_ECHO_REQUEST:
            raise GatewayDrop("ICMP other than echo request", reason="icmp_type")
        echo = message.data
        if not isinstance(echo, dpkt.icmp.ICMP.Echo):
            raise GatewayDrop("malformed ICMP echo", reason="icmp_malformed")
        rest = int(echo.id).to_bytes(2, "big") + int(echo.seq).to_bytes(2, "big")
        reply = build.icmp(build.ICMP_ECHO_REPLY, 0, rest, bytes(echo.data))
        self.stats.answered["icmp_echo"] += 1
        return [Reply(build.icmp_frame(sender.mac, self.mac, dst, sender.ip, reply))]

    def _dhcp(
        self, frame: bytes, header_len: int, total_len: int, sender: Binding, now: float
    ) -> list[Output]:
        udp = _parse(dpkt.udp.UDP, _l4_payload(frame, header_len, total_len), "udp")
        reply = self.dhcp.handle(
            bytes(udp.data), src_mac=sender.mac, lease=IPv4Address(sender.ip), now=now
        )
        if reply is None:
            return []
        self.stats.answered[f"dhcp_{reply.kind.name.lower()}"] += 1
        return [
            Reply(
                build.udp_frame(
                    reply.dst_mac,
                    self.mac,
                    self.ip,
                    reply.dst_ip.packed,
                    DHCP_SERVER_PORT,
                    DHCP_CLIENT_PORT,
                    reply.payload,
                )
            )
        ]

    def dns_answer(self, request: DnsRequest, response: bytes) -> bytes:
        """The frame carrying ``response`` back to the guest that asked."""
        return build.udp_frame(
            request.client_mac,
            self.mac,
            request.server_ip,
            request.client_ip,
            DNS_PORT,
            request.client_port,
            response,
        )


def _l4_payload(frame: bytes, header_len: int, total_len: int) -> bytes:
    start = 14 + header_len
    return frame[start : 14 + total_len]


def _parse(kind: type[dpkt.Packet], payload: bytes, reason: str) -> dpkt.Packet:
    """dpkt's many exceptions become one counted drop."""
    try:
        return kind(payload)
    except Exception as exc:  # dpkt raises UnpackError, NeedData, struct.error, ...
        raise GatewayDrop(f"malformed {reason}: {exc!r}", reason=f"{reason}_malformed") from None
