"""Sans-IO LAN tables: MAC ownership and address leases."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from relay.lan.addresses import MemoryPool, PoolExhausted
from relay.lan.ownership import Claimed, MacOwners, Refused

MAC_A = b"\x52\x54\0\0\0\x01"
MAC_B = b"\x52\x54\0\0\0\x02"


@dataclass(eq=False)
class FakePort:
    remote_host: str
    last_seen: float


def test_pool_is_handed_out_highest_first_and_sticky() -> None:
    pool = MemoryPool()
    a = pool.lease(MAC_A, in_use=frozenset())
    b = pool.lease(MAC_B, in_use=frozenset())
    assert (a.ip, b.ip) == (IPv4Address("10.0.2.254"), IPv4Address("10.0.2.253"))
    assert pool.lease(MAC_A, in_use=frozenset()).ip == a.ip
    assert pool.lookup(MAC_B) == b


def test_exhaustion_reclaims_an_idle_lease_but_never_a_live_one() -> None:
    pool = MemoryPool(IPv4Address("10.0.2.10"), IPv4Address("10.0.2.11"))
    pool.lease(MAC_A, in_use=frozenset())
    pool.lease(MAC_B, in_use=frozenset())
    mac_c = b"\x52\x54\0\0\0\x03"
    with pytest.raises(PoolExhausted):
        pool.lease(mac_c, in_use=frozenset({MAC_A, MAC_B}))
    lease = pool.lease(mac_c, in_use=frozenset({MAC_B}))
    assert lease.ip == IPv4Address("10.0.2.11")  # MAC_A's, the least recently leased idle one
    assert pool.lookup(MAC_A) is None


def test_same_host_takes_over_at_once() -> None:
    owners: MacOwners[FakePort] = MacOwners(takeover_after=20.0)
    old, new = FakePort("198.51.100.7", 100.0), FakePort("198.51.100.7", 100.0)
    assert owners.claim(MAC_A, old, 100.0) == Claimed(None)
    assert owners.claim(MAC_A, new, 101.0) == Claimed(old)
    # The old session's cleanup must not unregister the new one.
    assert owners.release(MAC_A, old) is False
    assert owners.owner(MAC_A) is new


def test_other_host_is_refused_while_the_owner_is_alive() -> None:
    owners: MacOwners[FakePort] = MacOwners(takeover_after=20.0)
    owner, thief = FakePort("198.51.100.7", 100.0), FakePort("203.0.113.9", 105.0)
    owners.claim(MAC_A, owner, 100.0)
    assert isinstance(owners.claim(MAC_A, thief, 110.0), Refused)
    assert owners.claim(MAC_A, thief, 120.0) == Claimed(owner)  # silent for 20 s


def test_release_frees_the_mac() -> None:
    owners: MacOwners[FakePort] = MacOwners()
    port = FakePort("h", 0.0)
    owners.claim(MAC_A, port, 0.0)
    assert owners.release(MAC_A, port) is True
    assert owners.owner(MAC_A) is None and len(owners) == 0
