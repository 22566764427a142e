"""The learning switch and port security, sans-IO."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import BROADCAST, GATEWAY_MAC, arp_frame, ip, mac, udp_frame

from relay.lan.port_security import Binding, TokenBucket, Violation, check
from relay.lan.switch import Switch, SwitchDrop, SwitchLimits
from relay.packets.headers import read_header

GW = 0


def lan(ports: int = 3, limits: SwitchLimits | None = None) -> Switch:
    """A switch with the gateway on port 0 and VMs 1..n bound to mac(n)/10.0.2.(100+n)."""
    switch = Switch(limits, now=0.0)
    switch.add_port(GW, 0.0, trusted=True)
    switch.bind(GW, Binding(GATEWAY_MAC, ip(2)), 0.0)
    for n in range(1, ports + 1):
        switch.add_port(n, 0.0)
        switch.bind(n, Binding(mac(n), ip(100 + n)), 0.0)
    return switch


def frame_from(n: int, dst_mac: bytes, dst_last: int = 2) -> bytes:
    return udp_frame(mac(n), dst_mac, ip(100 + n), ip(dst_last), 5000, 6000, b"hello")


def test_unicast_goes_to_the_owner_only() -> None:
    switch = lan()
    assert switch.ingress(1, frame_from(1, mac(2), 102), 1.0) == (2,)
    assert switch.ingress(2, frame_from(2, GATEWAY_MAC), 1.0) == (GW,)


def test_broadcast_floods_to_every_bound_port_but_the_ingress() -> None:
    switch = lan()
    switch.add_port(9, 0.0)  # attached, not registered: gets nothing
    verdict = switch.ingress(1, frame_from(1, BROADCAST), 1.0)
    assert sorted(verdict) == [GW, 2, 3]


def test_unknown_unicast_floods_and_a_frame_never_returns_to_its_port() -> None:
    switch = lan()
    assert sorted(switch.ingress(1, frame_from(1, mac(77)), 1.0)) == [GW, 2, 3]
    # The gateway (trusted) forwards to a VM's own MAC arriving from that VM: dropped.
    assert switch.ingress(1, frame_from(1, mac(1)), 1.0) == SwitchDrop.SAME_PORT


def test_ports_removed_leave_the_table_and_the_flood() -> None:
    switch = lan()
    switch.remove_port(2)
    assert switch.lookup(mac(2)) is None
    assert sorted(switch.ingress(1, frame_from(1, BROADCAST), 1.0)) == [GW, 3]


def test_learned_macs_age_out_but_bindings_do_not() -> None:
    switch = lan(limits=SwitchLimits(mac_aging=10.0, max_macs_per_port=4))
    extra = mac(50)
    # The trusted gateway port may send from other MACs: they are learned and age.
    frame = udp_frame(extra, BROADCAST, ip(2), ip(255), 1, 2, b"")
    switch.ingress(GW, frame, 1.0)
    assert switch.lookup(extra) == GW
    assert switch.expire(5.0) == 0
    assert switch.expire(20.0) == 1
    assert switch.lookup(extra) is None
    assert switch.lookup(mac(1)) == 1


def test_mac_table_caps_per_port_and_total() -> None:
    frames = [udp_frame(mac(60 + i), BROADCAST, ip(2), ip(255), 1, 2, b"") for i in range(3)]
    # Per port: the gateway's own MAC plus two learned ones make three.
    switch = lan(ports=1, limits=SwitchLimits(max_macs_per_port=3, max_macs=100))
    verdicts = [switch.ingress(GW, frame, 1.0) for frame in frames]
    assert verdicts == [(1,), (1,), SwitchDrop.PORT_MAC_LIMIT]
    # In total: two bindings plus two learned fill a table of four.
    switch = lan(ports=1, limits=SwitchLimits(max_macs_per_port=100, max_macs=4))
    verdicts = [switch.ingress(GW, frame, 1.0) for frame in frames]
    assert verdicts == [(1,), (1,), SwitchDrop.MAC_TABLE_FULL]
    assert switch.table_size == 4
    # Aged entries make room.
    assert switch.ingress(GW, frames[2], 1000.0) == (1,)


def test_storm_control_limits_floods_not_unicast() -> None:
    switch = lan(limits=SwitchLimits(port_flood_rate=10.0, port_flood_burst=5.0))
    results = [switch.ingress(1, frame_from(1, BROADCAST), 1.0) for _ in range(20)]
    assert results.count(Violation.STORM) == 15
    assert all(switch.ingress(1, frame_from(1, mac(2), 102), 1.0) == (2,) for _ in range(50))
    assert switch.ingress(1, frame_from(1, BROADCAST), 2.0) != Violation.STORM  # refilled
    assert switch.ports[1].drops[Violation.STORM] == 15


def test_unbound_port_cannot_send() -> None:
    switch = lan()
    switch.add_port(7, 0.0)
    assert switch.ingress(7, frame_from(7, BROADCAST), 1.0) == SwitchDrop.UNBOUND


def test_counters() -> None:
    switch = lan()
    frame = frame_from(1, mac(2), 102)
    switch.ingress(1, frame, 1.0)
    assert (switch.ports[1].frames_in, switch.ports[1].bytes_in) == (1, len(frame))
    assert (switch.ports[2].frames_out, switch.ports[2].bytes_out) == (1, len(frame))


# -- port security -------------------------------------------------------------------------

OWN = Binding(mac(1), ip(101))


@pytest.mark.parametrize(
    ("frame", "violation"),
    [
        (udp_frame(mac(1), BROADCAST, ip(101), ip(255), 1, 2, b""), None),
        (udp_frame(mac(9), BROADCAST, ip(101), ip(255), 1, 2, b""), Violation.SPOOFED_MAC),
        (udp_frame(mac(1), BROADCAST, ip(102), ip(255), 1, 2, b""), Violation.SPOOFED_IP),
        (
            udp_frame(b"\x03" + mac(1)[1:], BROADCAST, ip(101), ip(2), 1, 2, b""),
            Violation.GROUP_SOURCE,
        ),
        # DHCP from 0.0.0.0 is allowed, any other traffic from 0.0.0.0 is not.
        (udp_frame(mac(1), BROADCAST, b"\0\0\0\0", b"\xff" * 4, 68, 67, b""), None),
        (udp_frame(mac(1), BROADCAST, b"\0\0\0\0", b"\xff" * 4, 68, 53, b""), Violation.SPOOFED_IP),
        (udp_frame(mac(1), BROADCAST, ip(101), b"\xff" * 4, 67, 68, b""), Violation.ROGUE_DHCP),
        # ARP: only the port's own binding; a probe from 0.0.0.0 is fine.
        (arp_frame(1, mac(1), ip(101), bytes(6), ip(2), BROADCAST), None),
        (arp_frame(1, mac(1), b"\0\0\0\0", bytes(6), ip(101), BROADCAST), None),
        (arp_frame(2, mac(1), ip(2), mac(2), ip(102), mac(2)), Violation.ARP_SPOOF),
        (arp_frame(2, mac(1), ip(3), mac(2), ip(102), mac(2)), Violation.ARP_SPOOF),
        (arp_frame(2, mac(1), ip(102), mac(2), ip(102), BROADCAST), Violation.ARP_SPOOF),
        (arp_frame(2, mac(1), b"\0\0\0\0", mac(2), ip(102), mac(2)), Violation.ARP_SPOOF),
        (
            arp_frame(1, mac(9), ip(101), bytes(6), ip(2), BROADCAST)[:6]
            + mac(1)
            + arp_frame(1, mac(9), ip(101), bytes(6), ip(2), BROADCAST)[12:],
            Violation.ARP_SPOOF,
        ),
        (BROADCAST + mac(1) + b"\x81\x00" + bytes(46), Violation.VLAN),
        (BROADCAST + mac(1) + b"\x86\xdd" + bytes(46), Violation.ETHERTYPE),
    ],
)
def test_port_security_rules(frame: bytes, violation: Violation | None) -> None:
    assert check(OWN, read_header(frame)) == violation


def test_spoofed_frames_are_dropped_and_counted_by_the_switch() -> None:
    switch = lan()
    spoof = udp_frame(mac(1), mac(2), ip(102), ip(102), 1, 2, b"")
    assert switch.ingress(1, spoof, 1.0) == Violation.SPOOFED_IP
    assert switch.ports[1].drops[Violation.SPOOFED_IP] == 1
    assert switch.drops[Violation.SPOOFED_IP] == 1


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.5)
    assert not bucket.take(0.5)


# -- hypothesis: switch invariants ---------------------------------------------------------

_ports = st.integers(1, 4)
_dsts = st.sampled_from([BROADCAST, GATEWAY_MAC, mac(1), mac(2), mac(3), mac(4), mac(99)])


@settings(max_examples=200)
@given(st.lists(st.tuples(_ports, _dsts, st.integers(0, 3), st.floats(0, 1000)), max_size=60))
def test_switch_never_echoes_never_leaks_and_only_delivers_to_owners(
    events: list[tuple[int, bytes, int, float]],
) -> None:
    switch = lan(ports=4)
    now = 0.0
    for port, dst, spoof, step in events:
        now += step
        src_ip = ip(100 + port) if spoof != 1 else ip(200)
        src_mac = mac(port) if spoof != 2 else mac(40)
        frame = udp_frame(src_mac, dst, src_ip, ip(2), 1, 2, b"x")
        verdict = switch.ingress(port, frame, now)
        if spoof in (1, 2):
            assert isinstance(verdict, str)
            continue
        if isinstance(verdict, str):
            assert verdict in (Violation.STORM, SwitchDrop.SAME_PORT)
            continue
        assert port not in verdict
        owner = switch.lookup(dst)
        if owner is not None and not dst[0] & 1:
            assert verdict == (owner,)
        else:
            assert sorted(verdict) == sorted(p for p in (GW, 1, 2, 3, 4) if p != port)
    assert switch.table_size == 5  # only the bindings: spoofed MACs were never learned
