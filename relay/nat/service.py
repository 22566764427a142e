"""The NAT: packets a VM sends beyond 10.0.2.0/24 leave through the relay's host sockets.

:meth:`Nat.outbound` runs in a LAN's switch task for each such packet and never waits: an
existing flow gets the packet at once (a non-blocking ``send`` for UDP and ICMP, a bounded
queue for TCP); a new flow must pass the egress policy and the flow budget first, and then
gets a task of its own in the NAT's nursery. Refusals are counted and answered as a router
would: ICMP "administratively prohibited" for a denied destination, RST for TCP to no flow.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from ipaddress import IPv4Address

import trio

from relay.lan.port_security import Binding
from relay.nat.context import NatContext, drop_log, log
from relay.nat.guest import Guest, GuestLink
from relay.nat.icmp import IcmpNat, describe, detect_mode
from relay.nat.limits import FlowBudget
from relay.nat.policy import Address, EgressPolicy, Proto
from relay.nat.settings import IcmpMode, NatSettings
from relay.nat.tcp import TcpFlow
from relay.nat.tcp_flows import TcpConnection, TcpKey, reset_for, tcp_settings
from relay.nat.tcp_segment import ACK, RST, SYN, BadSegment, Segment, build_segment, parse_segment
from relay.nat.udp import UdpNat
from relay.packets import build
from relay.packets.headers import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, FrameHeader

ETH = 14


class Nat:
    """ICMP, UDP and TCP flows of every LAN, under one policy and one budget."""

    def __init__(
        self,
        policy: EgressPolicy,
        settings: NatSettings | None = None,
        read_host_addresses: Callable[[], frozenset[Address]] | None = None,
    ) -> None:
        self.settings = settings or NatSettings()
        self.policy = policy
        self._read_host_addresses = read_host_addresses
        self.context = NatContext(self.settings, FlowBudget(self.settings.limits))
        self.icmp_mode = detect_mode(self.settings.icmp_mode)
        self.icmp = IcmpNat(self.context, self.icmp_mode)
        self.udp = UdpNat(self.context)
        self.tcp: dict[TcpKey, TcpConnection] = {}
        self._tcp_settings = tcp_settings(self.context)

    def log_mode(self) -> None:
        """Once at start, with the other startup lines (after the sockets are bound)."""
        log.info("NAT: ICMP echo through %s", describe(self.icmp_mode))

    async def run(self, task_status: trio.TaskStatus[Nat] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.context.nursery = nursery
                nursery.start_soon(self.icmp.run, name="nat icmp raw")
                if self._read_host_addresses is not None:
                    nursery.start_soon(
                        self._refresh_host_addresses,
                        self._read_host_addresses,
                        name="nat host addresses",
                    )
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self.context.nursery = None

    async def _refresh_host_addresses(self, read: Callable[[], frozenset[Address]]) -> None:
        """Keep the policy's "host's own addresses" current: a guest must not reach the relay
        host through an address it gained after the start."""
        while True:
            await trio.sleep(self.settings.host_address_refresh)
            await self.reread_host_addresses(read)

    async def reread_host_addresses(self, read: Callable[[], frozenset[Address]]) -> None:
        current = await trio.to_thread.run_sync(read)  # may resolve the host name
        if current != self.policy.host_addresses:
            added = sorted(map(str, current - self.policy.host_addresses))
            gone = sorted(map(str, self.policy.host_addresses - current))
            log.info("NAT: host addresses changed (denied now: +%s, -%s)", added, gone)
            self.policy = self.policy.with_host_addresses(current)

    # -- from the switch task ----------------------------------------------------------------

    def outbound(
        self, link: GuestLink, sender: Binding, frame: bytes, header: FrameHeader, now: float
    ) -> None:
        """A guest's IPv4 packet for the outside (port security has checked its source)."""
        ip = header.ipv4
        assert ip is not None
        packet = frame[ETH : ETH + ip.total_len]
        if ip.fragment:
            self.context.drop("fragment", "guest IP fragments are not forwarded")
            return
        guest = Guest(link, sender.mac, sender.ip)
        if ip.proto == IPPROTO_TCP and ip.ports is not None:
            self._tcp(guest, packet, ip.header_len, now)
        elif ip.proto == IPPROTO_UDP and ip.ports is not None:
            if len(packet) < ip.header_len + 8:
                self.context.drop("udp_truncated")
            elif not self.udp.send(guest, packet, ip.ports, now) and self._allowed(
                guest, packet, Proto.UDP, ip.ports[1]
            ):
                self.udp.open(guest, packet, ip.ports, now)
        elif ip.proto == IPPROTO_ICMP:
            if not self.icmp.known(guest, packet, now) and self._allowed(
                guest, packet, Proto.ICMP, None
            ):
                self.icmp.open(guest, packet, now)
        else:
            self.context.drop("protocol", "IP protocol %d not forwarded", ip.proto)

    def _allowed(self, guest: Guest, packet: bytes, proto: Proto, port: int | None) -> bool:
        """The egress policy for a new flow; a denied one gets ICMP admin prohibited."""
        destination = IPv4Address(packet[16:20])
        decision = self.policy.check(proto, destination, port)
        if decision.allowed:
            return True
        reason = f"egress_{decision.reason}"
        self.context.drops[reason] += 1
        drop_log.event(
            reason,
            "NAT: %s to %s%s denied by the egress policy (%s)",
            proto.value,
            destination,
            "" if port is None else f":{port}",
            decision.reason,
        )
        guest.send_unreachable(build.UNREACHABLE_ADMIN, packet)
        return False

    def _tcp(self, guest: Guest, packet: bytes, header_len: int, now: float) -> None:
        src, dst = packet[12:16], packet[16:20]
        try:
            segment = parse_segment(src, dst, packet[header_len:])
        except BadSegment as exc:
            self.context.drop(exc.reason, "bad TCP segment from a guest")
            return
        key = (guest.link.name, guest.ip, segment.sport, dst, segment.dport)
        connection = self.tcp.get(key)
        if connection is not None:
            connection.deliver(segment)
            return
        if segment.flags & RST:
            return
        if not segment.flags & SYN or segment.flags & ACK:
            self.context.drops["tcp_no_flow"] += 1
            self._send_segment(guest, dst, reset_for(segment))
            return
        if not self._allowed(guest, packet, Proto.TCP, segment.dport):
            return
        self._open_tcp(guest, key, segment, packet[: header_len + 8], now)

    def _open_tcp(self, guest: Guest, key: TcpKey, syn: Segment, quote: bytes, now: float) -> None:
        context, budget = self.context, self.context.budget
        refusal = budget.admit(guest.vm, Proto.TCP, now)
        if refusal is None and not budget.half_open(guest.vm, +1):
            budget.release(guest.vm, Proto.TCP)
            refusal_reason = "half_open"
        elif refusal is not None:
            refusal_reason = refusal.value
        else:
            refusal_reason = ""
        if refusal_reason:
            context.drop(f"tcp_{refusal_reason}", "TCP flow refused")
            self._send_segment(guest, key[3], reset_for(syn))
            return
        flow = TcpFlow(syn, self._tcp_settings, now, isn=_isn())
        connection = TcpConnection(key, guest, flow, context, quote)

        async def run() -> None:
            try:
                await connection.run()
            finally:
                if self.tcp.get(key) is connection:
                    del self.tcp[key]

        if not context.spawn(run, name="nat tcp"):
            budget.half_open(guest.vm, -1)
            budget.release(guest.vm, Proto.TCP)
            return
        self.tcp[key] = connection
        context.events["tcp_opened"] += 1

    def _send_segment(self, guest: Guest, src_ip: bytes, segment: Segment) -> None:
        data = build_segment(src_ip, guest.ip, segment)
        guest.send_packet(src_ip, IPPROTO_TCP, data, self.settings.mtu)

    # -- housekeeping ------------------------------------------------------------------------

    def close_lan(self, name: str) -> None:
        """A LAN went away: its flows end (TCP with RST to nobody, sockets closed)."""
        self.udp.close_lan(name)
        self.icmp.close_lan(name)
        now = trio.current_time()
        for key, connection in list(self.tcp.items()):
            if key[0] == name:
                connection.flow.abort(now)
                connection.pump()

    def flow_counts(self) -> dict[str, int]:
        return {"tcp": len(self.tcp), "udp": len(self.udp.flows), "icmp": len(self.icmp.flows)}


def _isn() -> int:
    """An unpredictable initial sequence number (RFC 6528's goal, without the clock)."""
    return secrets.randbits(32)


__all__ = ["IcmpMode", "Nat", "NatSettings"]
