"""IPv4 address allocation for registered MACs.

:class:`AddressAllocator` is the interface the session layer uses; :class:`MemoryPool` keeps
leases in memory for the life of the process (tests use it; the relay persists leases with
:mod:`relay.lan.leases`). The pool is handed out highest first, 10.0.2.254 down to
10.0.2.10, as the BAVY relay does, and the same MAC always gets the same address back: the
guest never learns of a change.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

GATEWAY = IPv4Address("10.0.2.2")
NETMASK = IPv4Address("255.255.255.0")
DNS = IPv4Address("8.8.8.8")
POOL_FIRST = IPv4Address("10.0.2.10")
POOL_LAST = IPv4Address("10.0.2.254")


@dataclass(frozen=True, slots=True)
class Lease:
    """An address bound to a MAC."""

    mac: bytes
    ip: IPv4Address


class LeaseError(Exception):
    """No address can be leased; ``str(exc)`` is what the client is told."""


class PoolExhausted(LeaseError):
    """No free address is left and none can be reclaimed."""


class AddressAllocator(Protocol):
    """What the session layer needs from address management."""

    def lease(self, mac: bytes, *, in_use: frozenset[bytes]) -> Lease:
        """The address for ``mac``: its old one if it had one. ``in_use`` are MACs with live
        sessions, whose addresses must not be reclaimed. Raises :class:`PoolExhausted`."""
        ...

    def lookup(self, mac: bytes) -> Lease | None:
        """The lease ``mac`` holds, if any."""
        ...


class MemoryPool:
    """Sticky in-memory leases; at exhaustion the least recently leased idle MAC gives way."""

    def __init__(self, first: IPv4Address = POOL_FIRST, last: IPv4Address = POOL_LAST) -> None:
        self._free = [IPv4Address(n) for n in range(int(first), int(last) + 1)]  # pop() = highest
        self._leases: dict[bytes, IPv4Address] = {}  # insertion order = least recently leased

    def lookup(self, mac: bytes) -> Lease | None:
        ip = self._leases.get(mac)
        return None if ip is None else Lease(mac, ip)

    def lease(self, mac: bytes, *, in_use: frozenset[bytes]) -> Lease:
        ip = self._leases.pop(mac, None)
        if ip is None:
            if self._free:
                ip = self._free.pop()
            else:
                ip = self._reclaim(in_use)
        self._leases[mac] = ip
        return Lease(mac, ip)

    def _reclaim(self, in_use: frozenset[bytes]) -> IPv4Address:
        for old_mac in self._leases:
            if old_mac not in in_use:
                return self._leases.pop(old_mac)
        raise PoolExhausted("IP pool exhausted")
