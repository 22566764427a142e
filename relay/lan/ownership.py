"""Who owns a MAC on a network: sans-IO rules for registering, taking over and leaving.

A reconnecting client registers its MAC again while its old session may still look alive
(the relay notices a dead browser only at the QUIC idle timeout). The new session takes over
when it comes from the same host, or when the old one has been silent longer than
``takeover_after`` (twice the heartbeat interval: a live client would have spoken); otherwise
the MAC is refused, so a peer elsewhere cannot hijack a live session's MAC. (A client behind the
same NAT as the owner can; binding MACs to a secret is a later concern.)
Leaving releases the MAC only if the leaver still owns it: an old session's cleanup never
unregisters the newer session that took over (the Rust relay's black hole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Owner(Protocol):
    """What the ownership rules need to know about a port."""

    @property
    def remote_host(self) -> str: ...

    @property
    def last_seen(self) -> float: ...


P = TypeVar("P", bound=Owner)


@dataclass(frozen=True, slots=True)
class Claimed(Generic[P]):
    """The MAC is now the claimant's; ``superseded`` (if any) must be closed."""

    superseded: P | None


@dataclass(frozen=True, slots=True)
class Refused:
    """The MAC belongs to a live session elsewhere."""

    message: str


class MacOwners(Generic[P]):
    """MAC → owning port for one network."""

    def __init__(self, takeover_after: float = 60.0) -> None:
        self.takeover_after = takeover_after
        self._owners: dict[bytes, P] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, mac: bytes) -> P | None:
        return self._owners.get(mac)

    def macs(self) -> frozenset[bytes]:
        return frozenset(self._owners)

    def claim(self, mac: bytes, port: P, now: float) -> Claimed[P] | Refused:
        current = self._owners.get(mac)
        if current is None or current is port:
            self._owners[mac] = port
            return Claimed(None)
        same_host = current.remote_host == port.remote_host
        silent = now - current.last_seen >= self.takeover_after
        if not (same_host or silent):
            return Refused("MAC address in use")
        self._owners[mac] = port
        return Claimed(current)

    def release(self, mac: bytes, port: P) -> bool:
        """Release ``mac`` if ``port`` still owns it; True if it did."""
        if self._owners.get(mac) is port:
            del self._owners[mac]
            return True
        return False
