"""A learning Ethernet switch for one LAN, sans-IO.

Every session is a port and so is the gateway. A frame from a port is checked by port
security, its source MAC is learned (with aging), and it goes to the one port that owns its
destination MAC, or — broadcast, multicast, or a destination not in the table — to every
bound port but the one it came from. Flooded frames cost tokens from the sender's and the
LAN's storm-control buckets. The MAC table is capped per port and in total, so no sender can
grow it without bound. :meth:`Switch.ingress` returns the destination ports; the driver hands
the frame to them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from relay.lan.port_security import Binding, TokenBucket, Violation, check
from relay.packets.headers import BadFrame, read_header


@dataclass(frozen=True, slots=True)
class SwitchLimits:
    mac_aging: float = 300.0
    """Seconds a learned MAC stays in the table without traffic."""
    max_macs: int = 4096
    max_macs_per_port: int = 4
    port_flood_rate: float = 200.0
    """Broadcast/multicast/unknown-unicast frames per second one port may send."""
    port_flood_burst: float = 100.0
    lan_flood_rate: float = 2000.0
    lan_flood_burst: float = 500.0


class SwitchDrop(StrEnum):
    """Drops that are the switch's own (port-security ones are :class:`Violation`)."""

    UNBOUND = "port_unbound"
    SAME_PORT = "same_port"
    MAC_TABLE_FULL = "mac_table_full"
    PORT_MAC_LIMIT = "port_mac_limit"
    UNKNOWN_PORT = "unknown_port"


class Port:
    """A port's state; owned by its :class:`Switch`."""

    __slots__ = (
        "binding",
        "bytes_in",
        "bytes_out",
        "drops",
        "flood_bucket",
        "frames_in",
        "frames_out",
        "macs",
        "port_id",
        "trusted",
    )

    def __init__(self, port_id: int, trusted: bool, bucket: TokenBucket) -> None:
        self.port_id = port_id
        self.trusted = trusted
        """The gateway: not subject to port security or storm control."""
        self.binding: Binding | None = None
        self.macs = 0
        self.flood_bucket = bucket
        self.frames_in = self.bytes_in = self.frames_out = self.bytes_out = 0
        self.drops: Counter[str] = Counter()


class _Entry:
    __slots__ = ("last_seen", "port_id", "static")

    def __init__(self, port_id: int, last_seen: float, static: bool) -> None:
        self.port_id = port_id
        self.last_seen = last_seen
        self.static = static


Verdict = tuple[int, ...] | str
"""Destination ports, or the reason the frame was dropped."""


class Switch:
    """One LAN's forwarding state."""

    def __init__(self, limits: SwitchLimits | None = None, now: float = 0.0) -> None:
        self.limits = limits or SwitchLimits()
        self.ports: dict[int, Port] = {}
        self._bound: dict[int, Port] = {}
        self._table: dict[bytes, _Entry] = {}
        self._lan_bucket = TokenBucket(self.limits.lan_flood_rate, self.limits.lan_flood_burst, now)
        self.drops: Counter[str] = Counter()
        self.frames_switched = 0
        self.frames_flooded = 0

    # -- ports ------------------------------------------------------------------------------

    def add_port(self, port_id: int, now: float, *, trusted: bool = False) -> Port:
        limits = self.limits
        bucket = TokenBucket(limits.port_flood_rate, limits.port_flood_burst, now)
        port = self.ports[port_id] = Port(port_id, trusted, bucket)
        return port

    def bind(self, port_id: int, binding: Binding, now: float) -> None:
        """``port_id`` now owns ``binding``; its MAC is known at once (no flood to find it)."""
        port = self.ports[port_id]
        if port.binding is not None and port.binding.mac != binding.mac:
            self._forget(port.binding.mac, port)
        port.binding = binding
        self._bound[port_id] = port
        entry = self._table.get(binding.mac)
        if entry is not None and entry.port_id != port_id:
            self._forget(binding.mac, self.ports.get(entry.port_id))
            entry = None
        if entry is None:
            port.macs += 1
        self._table[binding.mac] = _Entry(port_id, now, static=True)

    def remove_port(self, port_id: int) -> None:
        port = self.ports.pop(port_id, None)
        self._bound.pop(port_id, None)
        if port is None or port.macs == 0:
            return
        for mac in [m for m, e in self._table.items() if e.port_id == port_id]:
            del self._table[mac]

    def _forget(self, mac: bytes, port: Port | None) -> None:
        if self._table.pop(mac, None) is not None and port is not None:
            port.macs -= 1

    def lookup(self, mac: bytes) -> int | None:
        entry = self._table.get(mac)
        return None if entry is None else entry.port_id

    @property
    def table_size(self) -> int:
        return len(self._table)

    # -- frames -----------------------------------------------------------------------------

    def ingress(self, port_id: int, frame: bytes, now: float) -> Verdict:
        """Where ``frame`` from ``port_id`` goes."""
        port = self.ports.get(port_id)
        if port is None:
            return self._drop(None, SwitchDrop.UNKNOWN_PORT)
        try:
            header = read_header(frame)
        except BadFrame as exc:
            return self._drop(port, exc.reason)
        binding = port.binding
        if binding is None:
            return self._drop(port, SwitchDrop.UNBOUND)
        if not port.trusted:
            violation = check(binding, header)
            if violation is not None:
                return self._drop(port, violation)
        learned = self._learn(port, header.src, now)
        if learned is not None:
            return self._drop(port, learned)
        port.frames_in += 1
        port.bytes_in += len(frame)
        if not header.is_group:
            entry = self._table.get(header.dst)
            if entry is not None:
                if now - entry.last_seen > self.limits.mac_aging and not entry.static:
                    self._forget(header.dst, self.ports.get(entry.port_id))
                elif entry.port_id == port_id:
                    return self._drop(port, SwitchDrop.SAME_PORT)
                else:
                    return self._deliver((entry.port_id,), len(frame))
        if not port.trusted and not (port.flood_bucket.take(now) and self._lan_bucket.take(now)):
            return self._drop(port, Violation.STORM)
        self.frames_flooded += 1
        return self._deliver(tuple(p for p in self._bound if p != port_id), len(frame))

    def _deliver(self, ports: tuple[int, ...], size: int) -> tuple[int, ...]:
        self.frames_switched += 1
        bound = self._bound
        for port_id in ports:
            out = bound[port_id]
            out.frames_out += 1
            out.bytes_out += size
        return ports

    def _learn(self, port: Port, mac: bytes, now: float) -> str | None:
        entry = self._table.get(mac)
        if entry is not None and entry.port_id == port.port_id:
            entry.last_seen = now
            return None
        if entry is not None:  # moved here from another port (only trusted ports can do this)
            self._forget(mac, self.ports.get(entry.port_id))
        if port.macs >= self.limits.max_macs_per_port:
            return SwitchDrop.PORT_MAC_LIMIT
        if len(self._table) >= self.limits.max_macs and not self.expire(now):
            return SwitchDrop.MAC_TABLE_FULL
        self._table[mac] = _Entry(port.port_id, now, static=False)
        port.macs += 1
        return None

    def expire(self, now: float) -> int:
        """Forget learned MACs silent for longer than the aging time; how many went."""
        horizon = now - self.limits.mac_aging
        stale = [m for m, e in self._table.items() if not e.static and e.last_seen < horizon]
        for mac in stale:
            self._forget(mac, self.ports.get(self._table[mac].port_id))
        return len(stale)

    def _drop(self, port: Port | None, reason: str) -> str:
        self.drops[reason] += 1
        if port is not None:
            port.drops[reason] += 1
        return reason
