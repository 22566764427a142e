"""A flooding hub per network: every frame goes to every other registered port.

One task per :class:`Hub` does the forwarding. Port-table changes (attach, register, detach)
are synchronous calls from the sessions' tasks, so they never interleave with a forwarding
batch. Sessions hand frames in over one bounded
memory channel and get frames back over their own bounded channel; a full port queue drops
(counted) instead of stalling the hub. The LAN issue replaces this with a learning switch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import trio

from relay.lan.addresses import DNS, GATEWAY, NETMASK, AddressAllocator, MemoryPool, PoolExhausted
from relay.lan.ownership import Claimed, MacOwners, Refused
from relay.logs import RateLimitedLog
from relay.wire.messages import Assigned, format_mac

log = logging.getLogger("relay.lan")
_drop_log = RateLimitedLog(log, level=logging.WARNING)

PORT_QUEUE = 256
"""Frames queued towards one session before the hub drops for it."""
HUB_QUEUE = 1024
"""Frames queued from all sessions towards the hub."""


@dataclass(eq=False)
class Port:
    """A session's attachment to a hub."""

    hub: Hub
    port_id: int
    remote_host: str
    _liveness: Callable[[], float]
    _on_superseded: Callable[[], None]
    to_session: trio.MemorySendChannel[bytes]
    from_hub: trio.MemoryReceiveChannel[bytes]
    connected_at: float
    mac: bytes | None = None
    ip: IPv4Address | None = None
    drops: Counter[str] = field(default_factory=Counter)

    @property
    def last_seen(self) -> float:
        return self._liveness()

    def send_frame(self, frame: bytes) -> None:
        """Hand a frame from this port's session to the hub (never blocks)."""
        try:
            self.hub.inbox.send_nowait((self.port_id, frame))
        except trio.WouldBlock:
            self.hub.drops["hub_queue_full"] += 1
            _drop_log.event("hub_queue_full", "%s: hub queue full; frame dropped", self.hub.name)


@dataclass(frozen=True, slots=True)
class Registration:
    assigned: Assigned


@dataclass(frozen=True, slots=True)
class Rejection:
    message: str
    pool_exhausted: bool


class Hub:
    """One network (one WebTransport path)."""

    def __init__(
        self, name: str, allocator: AddressAllocator | None = None, takeover_after: float = 60.0
    ) -> None:
        self.name = name
        self.allocator = allocator or MemoryPool()
        self.owners: MacOwners[Port] = MacOwners(takeover_after)
        self._scope = trio.CancelScope()
        self.ports: dict[int, Port] = {}
        self._next_port = 1
        self.inbox, self._inbox_rx = trio.open_memory_channel[tuple[int, bytes]](HUB_QUEUE)
        self.drops: Counter[str] = Counter()
        self.frames_forwarded = 0

    def attach(
        self,
        remote_host: str,
        liveness: Callable[[], float],
        on_superseded: Callable[[], None],
        now: float,
    ) -> Port:
        """A new session joins; it receives frames only once registered."""
        to_session, from_hub = trio.open_memory_channel[bytes](PORT_QUEUE)
        port = Port(
            self, self._next_port, remote_host, liveness, on_superseded, to_session, from_hub, now
        )
        self._next_port += 1
        self.ports[port.port_id] = port
        return port

    def register(self, port: Port, mac: bytes, now: float) -> Registration | Rejection:
        """Bind ``mac`` to ``port`` and lease its address."""
        claim = self.owners.claim(mac, port, now)
        if isinstance(claim, Refused):
            log.warning("%s: refused %s: %s", self.name, format_mac(mac), claim.message)
            return Rejection(claim.message, pool_exhausted=False)
        try:
            lease = self.allocator.lease(mac, in_use=self.owners.macs())
        except PoolExhausted:
            self.owners.release(mac, port)
            log.warning("%s: IP pool exhausted, refusing %s", self.name, format_mac(mac))
            return Rejection("IP pool exhausted", pool_exhausted=True)
        assert isinstance(claim, Claimed)
        if claim.superseded is not None:
            old = claim.superseded
            log.info("%s: %s moved to a new session", self.name, format_mac(mac))
            old.mac = None
            old._on_superseded()
        port.mac, port.ip = mac, lease.ip
        return Registration(Assigned(ip=lease.ip, gateway=GATEWAY, netmask=NETMASK, dns=DNS))

    def detach(self, port: Port) -> None:
        """The session ended: drop the port; release its MAC only if it still owns it."""
        self.ports.pop(port.port_id, None)
        if port.mac is not None:
            self.owners.release(port.mac, port)
        port.to_session.close()

    def _forward(self, source: int, frame: bytes) -> None:
        try:
            for port_id, port in self.ports.items():
                if port_id == source or port.mac is None:
                    continue
                try:
                    port.to_session.send_nowait(frame)
                except trio.WouldBlock:
                    port.drops["port_queue_full"] += 1
                    _drop_log.event(
                        "port_queue_full", "%s: port %d is slow; frame dropped", self.name, port_id
                    )
                except trio.ClosedResourceError:
                    pass
        except Exception:  # one bad frame or bug must not stop the whole network
            self.drops["forward_error"] += 1
            _drop_log.event("forward_error", "%s: error forwarding a frame", self.name)
            log.debug("forward error", exc_info=True)
            return
        self.frames_forwarded += 1

    def stop(self) -> None:
        """End the forwarding task (the network was removed)."""
        self._scope.cancel()

    async def run(self) -> None:
        """The forwarding task: drain the inbox in batches and flood."""
        with self._scope:
            await self._forward_loop()

    async def _forward_loop(self) -> None:
        inbox = self._inbox_rx
        forward = self._forward
        while True:
            source, frame = await inbox.receive()
            forward(source, frame)
            while True:
                try:
                    source, frame = inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                forward(source, frame)


class Lans:
    """Networks by WebTransport path, created on first use and capped in number.

    At the cap, a network with no sessions left gives way (least recently created first), so
    nobody can use up the table with throw-away paths; if every network is in use the new
    path is refused.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        max_networks: int = 256,
        takeover_after: float = 60.0,
        allocator_factory: Callable[[str], AddressAllocator] = lambda _path: MemoryPool(),
    ) -> None:
        self._nursery = nursery
        self.max_networks = max_networks
        self.takeover_after = takeover_after
        self.allocator_factory = allocator_factory
        self.hubs: dict[str, Hub] = {}
        self.refused = 0
        self.evicted = 0

    def get(self, path: str) -> Hub | None:
        hub = self.hubs.get(path)
        if hub is None:
            if len(self.hubs) >= self.max_networks and not self._evict_idle():
                self.refused += 1
                return None
            hub = Hub(path, self.allocator_factory(path), self.takeover_after)
            self.hubs[path] = hub
            self._nursery.start_soon(hub.run, name=f"hub {path}")
        return hub

    def _evict_idle(self) -> bool:
        for path, hub in self.hubs.items():
            if not hub.ports:
                del self.hubs[path]
                hub.stop()
                self.evicted += 1
                return True
        return False
