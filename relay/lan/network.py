"""The trio side of one LAN: the task that owns its switch and its gateway, and the table of
LANs by name.

Sessions hand frames in over one bounded channel (``inbox``); the one switch task runs
:class:`~relay.lan.switch.Switch` and :class:`~relay.gateway.core.Gateway`, which are sans-IO,
so a frame's whole trip through the LAN happens in one task without locks. Frames leave by
the destination port's ``deliver``, which encodes them straight into that session's bounded
drop-oldest datagram queue, and each port the batch touched is flushed once at its end: no
second task hop (it cost ~0.15 ms per frame here), and a slow port still drops (counted by
its queue) instead of stalling the switch. DNS queries are resolved by short tasks of their
own (bounded by the forwarder), whose answers come back through the inbox like any frame.
Port-table changes (attach, register, detach) are synchronous calls from the sessions' tasks:
trio runs one task at a time, so they never interleave with a switching batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import trio

from relay.gateway.core import DnsRequest, Gateway, GatewaySettings, Outbound, Reply
from relay.gateway.dns_forwarder import DnsForwarder
from relay.lan.addresses import (
    DNS,
    GATEWAY,
    NETMASK,
    AddressAllocator,
    LeaseError,
    MemoryPool,
    PoolExhausted,
)
from relay.lan.ownership import Claimed, MacOwners, Refused
from relay.lan.port_security import Binding, Violation
from relay.lan.switch import Switch, SwitchLimits
from relay.logs import RateLimitedLog
from relay.nat.service import Nat
from relay.packets.headers import BadFrame, read_header
from relay.wire.messages import Assigned, format_mac

log = logging.getLogger("relay.lan")
_drop_log = RateLimitedLog(log, level=logging.WARNING)
_policy_log = RateLimitedLog(log, interval=3600.0, level=logging.INFO)
"""Drops by design, not by misbehaviour: the IPv6 every Linux guest sends on an IPv4 LAN."""

INBOX_QUEUE = 1024
"""Frames queued from all sessions towards the switch."""
GATEWAY_PORT = 0
DNS_PER_VM = 8
"""DNS queries one VM may have in flight; more are dropped (the guest retries)."""
SWEEP_INTERVAL = 30.0
"""Seconds between sweeps of aged MAC entries."""


@dataclass(eq=False)
class Port:
    """A session's attachment to a LAN."""

    network: Network
    port_id: int
    remote_host: str
    raw: bool
    _liveness: Callable[[], float]
    _on_superseded: Callable[[], None]
    deliver: Callable[[bytes], None]
    """Queue a frame towards the session's client (never blocks; a full queue drops)."""
    flush: Callable[[], None]
    """Send what ``deliver`` queued."""
    connected_at: float
    mac: bytes | None = None
    ip: IPv4Address | None = None
    drops: Counter[str] = field(default_factory=Counter)

    @property
    def last_seen(self) -> float:
        return self._liveness()

    def send_frame(self, frame: bytes) -> None:
        """Hand a frame from this port's session to the switch (never blocks)."""
        try:
            self.network.inbox.send_nowait((self.port_id, frame))
        except trio.WouldBlock:
            self.network.drops["switch_queue_full"] += 1
            _drop_log.event(
                "switch_queue_full", "%s: switch queue full; frame dropped", self.network.name
            )


@dataclass(frozen=True, slots=True)
class Registration:
    assigned: Assigned


@dataclass(frozen=True, slots=True)
class Rejection:
    message: str
    pool_exhausted: bool


class Network:
    """One LAN: a switch, its gateway, and the sessions attached to it."""

    def __init__(
        self,
        name: str,
        allocator: AddressAllocator | None = None,
        *,
        takeover_after: float = 60.0,
        dns: DnsForwarder | None = None,
        gateway: GatewaySettings | None = None,
        limits: SwitchLimits | None = None,
        nat: Nat | None = None,
    ) -> None:
        now = trio.current_time()
        self.name = name
        self.allocator = allocator or MemoryPool()
        self.owners: MacOwners[Port] = MacOwners(takeover_after)
        self.switch = Switch(limits, now)
        self.gateway = Gateway(gateway)
        self.dns = dns
        self.nat = nat
        self.switch.add_port(GATEWAY_PORT, now, trusted=True)
        self.switch.bind(GATEWAY_PORT, self.gateway.binding, now)
        self.ports: dict[int, Port] = {}
        self._next_port = GATEWAY_PORT + 1
        self.inbox, self._inbox_rx = trio.open_memory_channel[tuple[int, bytes]](INBOX_QUEUE)
        self.drops: Counter[str] = Counter()
        self._scope = trio.CancelScope()
        self._tasks: trio.Nursery | None = None
        self._next_sweep = now + SWEEP_INTERVAL
        self._dns_inflight: Counter[bytes] = Counter()
        self._touched: set[Port] = set()
        """Ports that got frames in this batch: flushed once at its end."""

    # -- ports (called from session tasks) --------------------------------------------------

    def attach(
        self,
        remote_host: str,
        liveness: Callable[[], float],
        on_superseded: Callable[[], None],
        deliver: Callable[[bytes], None],
        flush: Callable[[], None],
        now: float,
        *,
        raw: bool = False,
    ) -> Port:
        """A new session joins; it sends and receives frames once bound to a MAC."""
        port = Port(
            self,
            self._next_port,
            remote_host,
            raw,
            liveness,
            on_superseded,
            deliver,
            flush,
            now,
        )
        self._next_port += 1
        self.ports[port.port_id] = port
        self.switch.add_port(port.port_id, now)
        return port

    def register(self, port: Port, mac: bytes, now: float) -> Registration | Rejection:
        """Bind ``mac`` and its leased address to ``port``."""
        claim = self.owners.claim(mac, port, now)
        if isinstance(claim, Refused):
            log.warning("%s: refused %s: %s", self.name, format_mac(mac), claim.message)
            return Rejection(claim.message, pool_exhausted=False)
        try:
            lease = self.allocator.lease(mac, in_use=self.owners.macs())
        except LeaseError as exc:
            self.owners.release(mac, port)
            log.warning("%s: %s, refusing %s", self.name, exc, format_mac(mac))
            return Rejection(str(exc), pool_exhausted=isinstance(exc, PoolExhausted))
        assert isinstance(claim, Claimed)
        if claim.superseded is not None:
            old = claim.superseded
            log.info("%s: %s moved to a new session", self.name, format_mac(mac))
            self.switch.remove_port(old.port_id)
            old.mac = None
            old._on_superseded()
        port.mac, port.ip = mac, lease.ip
        self.switch.bind(port.port_id, Binding(mac, lease.ip.packed), now)
        return Registration(Assigned(ip=lease.ip, gateway=GATEWAY, netmask=NETMASK, dns=DNS))

    def detach(self, port: Port) -> None:
        """The session ended: drop the port; release its MAC only if it still owns it."""
        self.ports.pop(port.port_id, None)
        self.switch.remove_port(port.port_id)
        if port.mac is not None:
            self.owners.release(port.mac, port)
        self._touched.discard(port)

    # -- the switch task --------------------------------------------------------------------

    def stop(self) -> None:
        """End the switch task (the LAN was removed)."""
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                await self._switch_loop()

    async def _switch_loop(self) -> None:
        inbox = self._inbox_rx
        ingress = self._ingress_guarded
        while True:
            port_id, frame = await inbox.receive()
            now = trio.current_time()
            ingress(port_id, frame, now)
            while True:
                try:
                    port_id, frame = inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                ingress(port_id, frame, now)
            self._flush_touched()
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_INTERVAL
                self.switch.expire(now)

    def _flush_touched(self) -> None:
        touched, self._touched = self._touched, set()
        for port in touched:
            try:
                port.flush()
            except Exception:  # a broken connection must not stop the LAN
                self.drops["flush_error"] += 1
                log.debug("flush error", exc_info=True)

    def _ingress_guarded(self, port_id: int, frame: bytes, now: float) -> None:
        try:
            self._ingress(port_id, frame, now)
        except Exception:  # one bad frame or bug must not stop the whole LAN
            self.drops["switch_error"] += 1
            _drop_log.event("switch_error", "%s: error switching a frame", self.name)
            log.debug("switch error", exc_info=True)

    def _ingress(self, port_id: int, frame: bytes, now: float) -> None:
        port = self.ports.get(port_id)
        if port is not None and port.raw and port.mac is None:
            self._bind_raw(port, frame, now)
        verdict = self.switch.ingress(port_id, frame, now)
        if isinstance(verdict, str):
            if verdict == Violation.ETHERTYPE:
                _policy_log.event(
                    verdict,
                    "%s: IPv6 and other non-IPv4 frames are dropped (IPv4-only LAN)",
                    self.name,
                )
            else:
                _drop_log.event(
                    verdict, "%s: port %d: frame dropped (%s)", self.name, port_id, verdict
                )
            return
        ports, touched = self.ports, self._touched
        for dest in verdict:
            if dest == GATEWAY_PORT:
                self._to_gateway(port_id, frame, now)
                continue
            out = ports[dest]
            out.deliver(frame)
            touched.add(out)

    def _bind_raw(self, port: Port, frame: bytes, now: float) -> None:
        """A raw port owns the first MAC it sends from."""
        mac = frame[6:12]
        if len(frame) < 14 or mac[0] & 1:
            return  # the switch drops it
        result = self.register(port, mac, now)
        if isinstance(result, Rejection):
            self.drops["raw_bind_refused"] += 1
            port._on_superseded()  # nothing to tell a raw client: close it
        else:
            log.info(
                "%s: raw port %d is %s at %s", self.name, port.port_id, format_mac(mac), port.ip
            )

    def _to_gateway(self, port_id: int, frame: bytes, now: float) -> None:
        port = self.switch.ports.get(port_id)
        if port is None or port.binding is None:
            return
        try:
            header = read_header(frame)
        except BadFrame:
            return  # the switch has already parsed it
        for output in self.gateway.handle(frame, header, port.binding, now):
            if isinstance(output, Reply):
                self._ingress(GATEWAY_PORT, output.frame, now)
            elif isinstance(output, DnsRequest):
                self._resolve(output)
            else:
                assert isinstance(output, Outbound)
                if self.nat is not None:
                    self.nat.outbound(self, port.binding, output.frame, output.header, now)
                    continue
                self.drops["no_route"] += 1
                _drop_log.event("no_route", "%s: no NAT; packet to the outside dropped", self.name)

    def to_guest(self, frame: bytes) -> None:
        """A frame from the gateway port, sent by a task off the frame path (DNS, NAT)."""
        try:
            self.inbox.send_nowait((GATEWAY_PORT, frame))
        except trio.WouldBlock:
            self.drops["switch_queue_full"] += 1

    def _resolve(self, request: DnsRequest) -> None:
        dns = self.dns
        if dns is None or self._tasks is None:
            self.drops["dns_unavailable"] += 1
            return
        if self._dns_inflight[request.client_mac] >= DNS_PER_VM or not dns.admit():
            self.drops["dns_busy"] += 1
            _drop_log.event("dns_busy", "%s: too many DNS queries in flight", self.name)
            return
        self._dns_inflight[request.client_mac] += 1
        self._tasks.start_soon(self._answer_dns, dns, request)

    async def _answer_dns(self, dns: DnsForwarder, request: DnsRequest) -> None:
        try:
            response = await dns.resolve(
                request.query, max_udp_size=request.max_udp_size, admitted=True
            )
        finally:
            self._dns_inflight[request.client_mac] -= 1
            if not self._dns_inflight[request.client_mac]:
                del self._dns_inflight[request.client_mac]
        self.to_guest(self.gateway.dns_answer(request, response))


class Lans:
    """LANs by name, created on first use and capped in number.

    At the cap, a LAN with no sessions left gives way (least recently created first), so
    nobody can use up the table with throw-away names; if every LAN is in use the new name is
    refused. Leases outlive an evicted LAN: they are in the lease database.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        max_networks: int = 256,
        takeover_after: float = 60.0,
        allocator_factory: Callable[[str], AddressAllocator] = lambda _name: MemoryPool(),
        dns: DnsForwarder | None = None,
        gateway: GatewaySettings | None = None,
        limits: SwitchLimits | None = None,
        on_removed: Callable[[Network], None] | None = None,
        nat: Nat | None = None,
    ) -> None:
        self._nursery = nursery
        self._on_removed = on_removed
        self.max_networks = max_networks
        self.takeover_after = takeover_after
        self.allocator_factory = allocator_factory
        self.dns = dns
        self.gateway = gateway
        self.limits = limits
        self.nat = nat
        self.networks: dict[str, Network] = {}
        self.refused = 0
        self.evicted = 0

    def get(self, name: str) -> Network | None:
        network = self.networks.get(name)
        if network is None:
            if len(self.networks) >= self.max_networks and not self._evict_idle():
                self.refused += 1
                return None
            network = Network(
                name,
                self.allocator_factory(name),
                takeover_after=self.takeover_after,
                dns=self.dns,
                gateway=self.gateway,
                limits=self.limits,
                nat=self.nat,
            )
            self.networks[name] = network
            self._nursery.start_soon(network.run, name=f"lan {name}")
        return network

    def _evict_idle(self) -> bool:
        for name, network in self.networks.items():
            if not network.ports:
                del self.networks[name]
                if self._on_removed is not None:
                    self._on_removed(network)
                network.stop()
                if self.nat is not None:
                    self.nat.close_lan(name)
                self.evicted += 1
                return True
        return False
