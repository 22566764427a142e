"""UDP NAT: one connected host socket per (VM, VM port, destination, destination port).

A connected socket gives strict 5-tuple demux (answers from anyone else are dropped by the
kernel: RFC 4787 address-and-port-dependent filtering), so guests never see each other's
answers. The guest's datagrams are sent from the switch task with a non-blocking ``send``
(a full socket buffer drops, counted); one task per flow receives the answers and ends the
flow when it has been idle. At a VM's cap the least recently used flow gives way.
"""

from __future__ import annotations

import errno
import socket
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import trio

from relay.nat.context import NatContext, log
from relay.nat.guest import Guest
from relay.nat.policy import Proto
from relay.packets import build
from relay.packets.headers import IPPROTO_UDP

UdpKey = tuple[str, bytes, int, bytes, int]
"""(LAN, VM address, VM port, destination address, destination port)."""
DNS_PORT = 53
RECEIVE_SIZE = 65535


@dataclass(eq=False)
class UdpFlow:
    key: UdpKey
    guest: Guest
    sock: socket.socket
    idle: float
    last_used: float
    quote: bytes = b""
    """The start of the guest's last packet, quoted in an ICMP port unreachable."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def vm_port(self) -> int:
        return self.key[2]

    @property
    def dst(self) -> tuple[bytes, int]:
        return self.key[3], self.key[4]


class UdpNat:
    """The UDP flows of every LAN."""

    def __init__(self, context: NatContext) -> None:
        self.context = context
        self.flows: dict[UdpKey, UdpFlow] = {}
        self._by_vm: dict[Hashable, OrderedDict[UdpKey, UdpFlow]] = {}

    def send(self, guest: Guest, packet: bytes, ports: tuple[int, int], now: float) -> bool:
        """Forward the guest's UDP datagram (``packet`` is the IPv4 packet); False when a new
        flow is needed and must first pass the egress policy (the caller checks it)."""
        dst = packet[16:20]
        key = (guest.link.name, guest.ip, ports[0], dst, ports[1])
        flow = self.flows.get(key)
        if flow is None:
            return False
        self._forward(flow, packet, now)
        return True

    def open(self, guest: Guest, packet: bytes, ports: tuple[int, int], now: float) -> None:
        """A new flow for an allowed destination, then forward ``packet`` on it."""
        context = self.context
        budget = context.budget
        if budget.at_cap(guest.vm, Proto.UDP):
            self._evict_oldest(guest.vm)
        refusal = budget.admit(guest.vm, Proto.UDP, now)
        if refusal is not None:
            context.drop(f"udp_{refusal.value}", "UDP flow refused")
            return
        dst = packet[16:20]
        key = (guest.link.name, guest.ip, ports[0], dst, ports[1])
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            budget.release(guest.vm, Proto.UDP)
            context.drop("udp_socket_error", "cannot open a UDP socket: %s", exc.strerror)
            return
        try:
            sock.setblocking(False)
            sock.connect((str(IPv4Address(dst)), ports[1]))
        except OSError as exc:
            sock.close()
            budget.release(guest.vm, Proto.UDP)
            guest.send_unreachable(build.UNREACHABLE_HOST, packet)
            context.drop("udp_connect_error", "UDP connect failed: %s", exc.strerror)
            return
        idle = context.settings.dns_idle if ports[1] == DNS_PORT else context.settings.udp_idle
        flow = UdpFlow(key, guest, sock, idle, now)
        if not context.spawn(lambda: self._receive(flow), name="nat udp"):
            sock.close()
            budget.release(guest.vm, Proto.UDP)
            return
        self.flows[key] = flow
        self._by_vm.setdefault(guest.vm, OrderedDict())[key] = flow
        context.events["udp_opened"] += 1
        self._forward(flow, packet, now)

    def _forward(self, flow: UdpFlow, packet: bytes, now: float) -> None:
        context = self.context
        header_len = (packet[0] & 0x0F) * 4
        payload = packet[header_len + 8 :]
        if not context.budget.take_bytes(flow.guest.vm, "out", len(payload), now):
            context.drop("udp_rate", "UDP over the VM's byte rate")
            return
        flow.last_used = now
        flow.quote = packet[: header_len + 8]
        by_vm = self._by_vm.get(flow.guest.vm)
        if by_vm is not None:
            by_vm.move_to_end(flow.key)
        try:
            flow.sock.send(payload)
        except BlockingIOError:
            context.drop("udp_send_would_block", "UDP socket buffer full")
        except OSError as exc:
            context.drop("udp_send_error", "UDP send failed: %s", exc.strerror)
        else:
            context.events["udp_datagrams_out"] += 1

    def _evict_oldest(self, vm: Hashable) -> None:
        by_vm = self._by_vm.get(vm)
        if by_vm:
            _key, oldest = next(iter(by_vm.items()))
            self.context.events["udp_evicted"] += 1
            self._close(oldest)

    def _close(self, flow: UdpFlow) -> None:
        if self.flows.pop(flow.key, None) is None:
            return
        by_vm = self._by_vm.get(flow.guest.vm)
        if by_vm is not None:
            by_vm.pop(flow.key, None)
            if not by_vm:
                del self._by_vm[flow.guest.vm]
        self.context.budget.release(flow.guest.vm, Proto.UDP)
        flow.scope.cancel()
        trio.lowlevel.notify_closing(flow.sock)
        flow.sock.close()

    def close_lan(self, name: str) -> None:
        for flow in [f for f in self.flows.values() if f.key[0] == name]:
            self._close(flow)

    async def _receive(self, flow: UdpFlow) -> None:
        """Answers to the guest until the flow has been idle for its timeout."""
        sock = trio.socket.from_stdlib_socket(flow.sock)
        context = self.context
        mtu = context.settings.mtu
        src_ip, src_port = flow.dst
        try:
            with flow.scope:
                while True:
                    deadline = flow.last_used + flow.idle
                    if trio.current_time() >= deadline:
                        context.events["udp_idle"] += 1
                        return
                    with trio.move_on_at(deadline):
                        try:
                            data = await sock.recv(RECEIVE_SIZE)
                        except OSError as exc:
                            if exc.errno == errno.ECONNREFUSED:
                                context.events["udp_port_unreachable"] += 1
                                flow.guest.send_unreachable(
                                    build.UNREACHABLE_PORT, flow.quote, src_ip=src_ip
                                )
                            continue
                        now = trio.current_time()
                        if not context.budget.take_bytes(flow.guest.vm, "in", len(data), now):
                            context.drop("udp_rate_in", "UDP answer over the VM's byte rate")
                            continue
                        datagram = build.udp(src_ip, flow.guest.ip, src_port, flow.vm_port, data)
                        flow.guest.send_packet(src_ip, IPPROTO_UDP, datagram, mtu)
                        context.events["udp_datagrams_in"] += 1
        except Exception:  # one flow's bug must not take down the NAT
            log.exception("UDP flow failed")
        finally:
            self._close(flow)
