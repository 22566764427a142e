"""The gateway's DHCP server: RFC 2131 exchanges built with dpkt, replies parsed back with dpkt,
one failure mode for junk, and a model of the answer rules checked by hypothesis."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import dpkt.dhcp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.gateway.dhcp import (
    BadDhcp,
    DhcpReply,
    DhcpServer,
    DhcpSettings,
    ReplyKind,
)

MAC = bytes.fromhex("525400abcd01")
OTHER_MAC = bytes.fromhex("525400abcd02")
LEASE = IPv4Address("10.0.2.15")
OTHER_IP = IPv4Address("10.0.2.99")
SERVER = IPv4Address("10.0.2.2")
OTHER_SERVER = IPv4Address("192.168.1.1")
BROADCAST_IP = IPv4Address("255.255.255.255")
BROADCAST_MAC = b"\xff" * 6
ZERO = IPv4Address("0.0.0.0")
NOW = 1000.0

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

# What a Linux client (busybox udhcpc, dhclient) sends besides the type: client id, maximum
# message size, parameter request list, host name, vendor class.
CLIENT_EXTRAS: list[tuple[int, bytes]] = [
    (61, b"\x01" + MAC),
    (57, (576).to_bytes(2, "big")),
    (55, bytes([1, 3, 6, 12, 15, 26, 28, 42, 51, 58, 59])),
    (12, b"guest"),
    (60, b"udhcp 1.36.1"),
]

CONFIG_OPTIONS = {
    1: IPv4Address("255.255.255.0").packed,
    3: SERVER.packed,
    6: IPv4Address("10.0.2.3").packed,
    15: b"relay.internal",
    26: (936).to_bytes(2, "big"),
    28: IPv4Address("10.0.2.255").packed,
}
LEASE_OPTIONS = {
    51: (3600).to_bytes(4, "big"),
    58: (1800).to_bytes(4, "big"),
    59: (3150).to_bytes(4, "big"),
}


def client_message(
    message_type: int | None,
    *,
    xid: int = 0x3903F326,
    flags: int = 0,
    ciaddr: IPv4Address = ZERO,
    chaddr: bytes = MAC,
    options: list[tuple[int, bytes]] | None = None,
    op: int = dpkt.dhcp.DHCP_OP_REQUEST,
    giaddr: int = 0,
    pad_to: int = 300,
) -> bytes:
    """A client message laid out as real clients send it (type first, padded to 300 bytes)."""
    opts = [] if message_type is None else [(53, bytes([message_type]))]
    opts += CLIENT_EXTRAS if options is None else options
    message = dpkt.dhcp.DHCP(
        op=op,
        xid=xid,
        secs=3,
        flags=flags,
        ciaddr=int(ciaddr),
        giaddr=giaddr,
        chaddr=chaddr.ljust(16, b"\x00"),
        opts=opts,
    )
    return bytes(message).ljust(pad_to, b"\x00")


def request(
    *,
    requested: IPv4Address | None = None,
    server_id: IPv4Address | None = None,
    ciaddr: IPv4Address = ZERO,
    flags: int = 0,
) -> bytes:
    options = list(CLIENT_EXTRAS)
    if requested is not None:
        options.insert(0, (50, requested.packed))
    if server_id is not None:
        options.insert(0, (54, server_id.packed))
    return client_message(REQUEST, ciaddr=ciaddr, flags=flags, options=options)


@dataclass
class Parsed:
    message: Any
    options: dict[int, bytes]


def parse_reply(reply: DhcpReply, *, xid: int = 0x3903F326, flags: int = 0) -> Parsed:
    """Parse ``reply.payload`` with dpkt and check the fields every reply must have."""
    payload = reply.payload
    assert len(payload) >= 300
    message = dpkt.dhcp.DHCP(payload)
    assert (message.op, message.hrd, message.hln, message.hops) == (2, 1, 6, 0)
    assert message.xid == xid
    assert message.secs == 0
    assert message.flags == flags
    assert message.giaddr == 0
    assert message.chaddr == MAC
    assert payload[28:44] == MAC + bytes(10)
    assert message.sname == bytes(64)
    assert message.file == bytes(128)
    assert message.magic == 0x63825363
    codes = [code for code, _ in message.opts]
    assert len(codes) == len(set(codes)), "an option appears twice"
    # The options are followed by the end option, then only padding.
    end = 240 + sum(2 + len(value) for _, value in message.opts)
    assert payload[end] == 255
    assert payload[end + 1 :] == bytes(len(payload) - end - 1)
    options = {code: bytes(value) for code, value in message.opts}
    assert options[53] == bytes([reply.kind.value])
    assert options[54] == SERVER.packed
    return Parsed(message, options)


def address(value: int) -> IPv4Address:
    return IPv4Address(value)


# --- the full exchange -----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0, 0x8000])
def test_discover_offer_request_ack(flags: int) -> None:
    server = DhcpServer()
    xid = 0x1234ABCD
    broadcast = bool(flags)

    offer = server.handle(
        client_message(DISCOVER, xid=xid, flags=flags), src_mac=MAC, lease=LEASE, now=NOW
    )
    assert offer is not None
    assert offer.kind is ReplyKind.OFFER
    assert offer.client_ip == LEASE
    assert (offer.dst_ip, offer.dst_mac) == (
        (BROADCAST_IP, BROADCAST_MAC) if broadcast else (LEASE, MAC)
    )
    parsed = parse_reply(offer, xid=xid, flags=flags)
    assert address(parsed.message.yiaddr) == LEASE
    assert address(parsed.message.siaddr) == SERVER
    assert address(parsed.message.ciaddr) == ZERO
    assert (
        parsed.options == {53: bytes([OFFER]), 54: SERVER.packed} | LEASE_OPTIONS | CONFIG_OPTIONS
    )

    # SELECTING: the client names the server and the offered address.
    options = [(54, SERVER.packed), (50, LEASE.packed), *CLIENT_EXTRAS]
    ack = server.handle(
        client_message(REQUEST, xid=xid, flags=flags, options=options),
        src_mac=MAC,
        lease=LEASE,
        now=NOW + 1,
    )
    assert ack is not None
    assert ack.kind is ReplyKind.ACK
    assert ack.client_ip == LEASE
    assert (ack.dst_ip, ack.dst_mac) == (
        (BROADCAST_IP, BROADCAST_MAC) if broadcast else (LEASE, MAC)
    )
    parsed = parse_reply(ack, xid=xid, flags=flags)
    assert address(parsed.message.yiaddr) == LEASE
    assert address(parsed.message.siaddr) == SERVER
    assert parsed.options == {53: bytes([ACK]), 54: SERVER.packed} | LEASE_OPTIONS | CONFIG_OPTIONS

    assert server.stats == {"discover": 1, "offer": 1, "request": 1, "ack": 1}


def test_selecting_request_for_another_address_is_naked() -> None:
    server = DhcpServer()
    reply = server.handle(
        request(server_id=SERVER, requested=OTHER_IP), src_mac=MAC, lease=LEASE, now=NOW
    )
    assert reply is not None
    assert reply.kind is ReplyKind.NAK
    assert_nak(reply)


def test_selecting_request_without_requested_address_is_naked() -> None:
    reply = DhcpServer().handle(request(server_id=SERVER), src_mac=MAC, lease=LEASE, now=NOW)
    assert reply is not None
    assert reply.kind is ReplyKind.NAK


def assert_nak(reply: DhcpReply, *, flags: int = 0) -> None:
    assert reply.kind is ReplyKind.NAK
    assert reply.client_ip is None
    assert (reply.dst_ip, reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)
    parsed = parse_reply(reply, flags=flags)
    assert parsed.options == {53: bytes([NAK]), 54: SERVER.packed}
    assert parsed.message.yiaddr == 0
    assert parsed.message.ciaddr == 0
    assert parsed.message.siaddr == 0


# --- the other REQUEST states ----------------------------------------------------------------


def test_init_reboot_with_the_lease_is_acked() -> None:
    server = DhcpServer()
    reply = server.handle(request(requested=LEASE), src_mac=MAC, lease=LEASE, now=NOW)
    assert reply is not None
    assert reply.kind is ReplyKind.ACK
    assert (reply.dst_ip, reply.dst_mac, reply.client_ip) == (LEASE, MAC, LEASE)
    parsed = parse_reply(reply)
    assert address(parsed.message.yiaddr) == LEASE
    assert parsed.options[51] == (3600).to_bytes(4, "big")


@pytest.mark.parametrize("flags", [0, 0x8000])
def test_init_reboot_with_another_address_is_naked_by_broadcast(flags: int) -> None:
    server = DhcpServer()
    reply = server.handle(
        request(requested=OTHER_IP, flags=flags), src_mac=MAC, lease=LEASE, now=NOW
    )
    assert reply is not None
    assert_nak(reply, flags=flags)
    assert server.stats == {"request": 1, "nak": 1}


@pytest.mark.parametrize("flags", [0, 0x8000])
def test_renewing_and_rebinding_are_acked_by_unicast_to_ciaddr(flags: int) -> None:
    # RENEWING is unicast, REBINDING broadcast; the answer goes to ciaddr either way, even with
    # the BROADCAST flag (RFC 2131 §4.1).
    server = DhcpServer()
    reply = server.handle(request(ciaddr=LEASE, flags=flags), src_mac=MAC, lease=LEASE, now=NOW)
    assert reply is not None
    assert reply.kind is ReplyKind.ACK
    assert (reply.dst_ip, reply.dst_mac, reply.client_ip) == (LEASE, MAC, LEASE)
    parsed = parse_reply(reply, flags=flags)
    assert address(parsed.message.ciaddr) == LEASE
    assert address(parsed.message.yiaddr) == LEASE
    assert parsed.options == {53: bytes([ACK]), 54: SERVER.packed} | LEASE_OPTIONS | CONFIG_OPTIONS


def test_renewing_another_address_is_naked() -> None:
    reply = DhcpServer().handle(request(ciaddr=OTHER_IP), src_mac=MAC, lease=LEASE, now=NOW)
    assert reply is not None
    assert_nak(reply)


def test_renewing_with_a_disagreeing_requested_address_is_naked() -> None:
    reply = DhcpServer().handle(
        request(ciaddr=LEASE, requested=OTHER_IP), src_mac=MAC, lease=LEASE, now=NOW
    )
    assert reply is not None
    assert reply.kind is ReplyKind.NAK


@pytest.mark.parametrize("lease", [LEASE, None])
def test_request_for_another_server_gets_no_answer(lease: IPv4Address | None) -> None:
    server = DhcpServer()
    message = request(server_id=OTHER_SERVER, requested=LEASE)
    assert server.handle(message, src_mac=MAC, lease=lease, now=NOW) is None
    assert server.stats == {"request": 1, "other_server": 1}


# --- RELEASE, DECLINE, INFORM, no lease ------------------------------------------------------


@pytest.mark.parametrize(("message_type", "label"), [(RELEASE, "release"), (DECLINE, "decline")])
def test_release_and_decline_are_counted_and_unanswered(message_type: int, label: str) -> None:
    server = DhcpServer()
    options = [(54, SERVER.packed), (50, LEASE.packed), (61, b"\x01" + MAC)]
    message = client_message(message_type, ciaddr=LEASE, options=options)
    assert server.handle(message, src_mac=MAC, lease=LEASE, now=NOW) is None
    assert server.handle(message, src_mac=MAC, lease=LEASE, now=NOW) is None
    assert server.stats == {label: 2}
    # The lease is sticky: the next DISCOVER is offered the same address.
    offer = server.handle(client_message(DISCOVER), src_mac=MAC, lease=LEASE, now=NOW)
    assert offer is not None
    assert offer.client_ip == LEASE


def test_inform_is_acked_with_configuration_only() -> None:
    server = DhcpServer()
    reply = server.handle(
        client_message(INFORM, ciaddr=LEASE, flags=0x8000), src_mac=MAC, lease=None, now=NOW
    )
    assert reply is not None
    assert reply.kind is ReplyKind.ACK
    assert reply.client_ip is None
    assert (reply.dst_ip, reply.dst_mac) == (LEASE, MAC)
    parsed = parse_reply(reply, flags=0x8000)
    assert parsed.message.yiaddr == 0
    assert address(parsed.message.ciaddr) == LEASE
    assert parsed.options == {53: bytes([ACK]), 54: SERVER.packed} | CONFIG_OPTIONS
    assert server.stats == {"inform": 1, "ack": 1}


def test_inform_without_ciaddr_is_broadcast() -> None:
    reply = DhcpServer().handle(client_message(INFORM), src_mac=MAC, lease=LEASE, now=NOW)
    assert reply is not None
    assert (reply.dst_ip, reply.dst_mac) == (BROADCAST_IP, BROADCAST_MAC)


def test_without_a_lease_discover_is_unanswered_and_requests_are_naked() -> None:
    server = DhcpServer()
    assert server.handle(client_message(DISCOVER), src_mac=MAC, lease=None, now=NOW) is None
    for message in (
        request(server_id=SERVER, requested=LEASE),
        request(server_id=SERVER),
        request(requested=LEASE),
        request(ciaddr=LEASE),
    ):
        reply = server.handle(message, src_mac=MAC, lease=None, now=NOW)
        assert reply is not None
        assert_nak(reply)
    assert server.stats == {"discover": 1, "no_lease": 1, "request": 4, "nak": 4}


# --- settings --------------------------------------------------------------------------------


def test_settings_are_what_the_reply_says() -> None:
    settings = DhcpSettings(
        server_ip=IPv4Address("10.9.0.1"),
        router=IPv4Address("10.9.0.254"),
        netmask=IPv4Address("255.255.0.0"),
        broadcast=IPv4Address("10.9.255.255"),
        dns_servers=(IPv4Address("10.9.0.53"), IPv4Address("10.9.0.54")),
        domain_name="lan.example",
        lease_time=100,
        mtu=1500,
    )
    reply = DhcpServer(settings).handle(
        client_message(DISCOVER), src_mac=MAC, lease=IPv4Address("10.9.3.4"), now=NOW
    )
    assert reply is not None
    message = dpkt.dhcp.DHCP(reply.payload)
    assert address(message.siaddr) == IPv4Address("10.9.0.1")
    assert {code: bytes(value) for code, value in message.opts} == {
        53: bytes([OFFER]),
        54: bytes([10, 9, 0, 1]),
        51: (100).to_bytes(4, "big"),
        58: (50).to_bytes(4, "big"),
        59: (87).to_bytes(4, "big"),
        1: bytes([255, 255, 0, 0]),
        3: bytes([10, 9, 0, 254]),
        6: bytes([10, 9, 0, 53, 10, 9, 0, 54]),
        15: b"lan.example",
        26: (1500).to_bytes(2, "big"),
        28: bytes([10, 9, 255, 255]),
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"mtu": 575},
        {"mtu": 9001},
        {"lease_time": 0},
        {"lease_time": 2**32},
        {"dns_servers": ()},
        {"domain_name": ""},
        {"domain_name": "é.example"},
    ],
)
def test_unusable_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="DHCP"):
        DhcpSettings(**bad)


def test_mtu_bounds_are_inclusive() -> None:
    assert DhcpSettings(mtu=576).mtu == 576
    assert DhcpSettings(mtu=9000).mtu == 9000


# --- bad messages ----------------------------------------------------------------------------


def test_split_option_is_joined_as_rfc_3396_says() -> None:
    options = [(50, LEASE.packed[:2]), (50, LEASE.packed[2:]), *CLIENT_EXTRAS]
    reply = DhcpServer().handle(
        client_message(REQUEST, options=options), src_mac=MAC, lease=LEASE, now=NOW
    )
    assert reply is not None
    assert reply.kind is ReplyKind.ACK


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (client_message(DISCOVER, chaddr=OTHER_MAC), "chaddr_mismatch"),
        (client_message(DISCOVER, op=dpkt.dhcp.DHCP_OP_REPLY), "not_request"),
        (client_message(DISCOVER, giaddr=0x0A000001), "relayed"),
        (client_message(None), "no_message_type"),
        (client_message(None, options=[]), "no_message_type"),
        (client_message(OFFER), "unsupported_type"),
        (client_message(ACK), "unsupported_type"),
        (client_message(NAK), "unsupported_type"),
        (client_message(9), "unsupported_type"),
        (client_message(DISCOVER, options=[(53, b"\x01")]), "malformed"),  # type twice
        (client_message(REQUEST, options=[(50, b"\x0a\x00\x02")]), "malformed"),
        (client_message(REQUEST, options=[(54, b"")]), "malformed"),
        (client_message(DISCOVER)[:239], "malformed"),  # shorter than the fixed header
        (client_message(DISCOVER)[:236] + b"\x63\x82\x53\x00", "malformed"),  # magic cookie
        (client_message(DISCOVER)[:240] + b"\x35", "malformed"),  # option without length
        (b"", "malformed"),
    ],
)
def test_bad_messages_raise_bad_dhcp_with_a_reason(payload: bytes, reason: str) -> None:
    server = DhcpServer()
    with pytest.raises(BadDhcp) as caught:
        server.handle(payload, src_mac=MAC, lease=LEASE, now=NOW)
    assert caught.value.reason == reason
    assert not server.stats


@pytest.mark.parametrize(("hrd", "hln"), [(6, 6), (1, 16), (1, 0)])
def test_non_ethernet_hardware_is_refused(hrd: int, hln: int) -> None:
    payload = bytearray(client_message(DISCOVER))
    payload[1], payload[2] = hrd, hln
    with pytest.raises(BadDhcp) as caught:
        DhcpServer().handle(bytes(payload), src_mac=MAC, lease=LEASE, now=NOW)
    assert caught.value.reason == "not_ethernet"


# --- properties ------------------------------------------------------------------------------


@given(st.binary(max_size=700))
def test_arbitrary_bytes_raise_only_bad_dhcp(payload: bytes) -> None:
    try:
        DhcpServer().handle(payload, src_mac=MAC, lease=LEASE, now=NOW)
    except BadDhcp:
        pass


@given(
    header=st.binary(min_size=236, max_size=236),
    options=st.binary(max_size=400),
    op=st.sampled_from([1, 2]),
    giaddr_zero=st.booleans(),
)
def test_arbitrary_options_raise_only_bad_dhcp(
    header: bytes, options: bytes, op: int, giaddr_zero: bool
) -> None:
    # A plausible fixed header (so parsing reaches the options) with arbitrary option bytes.
    fixed = bytearray(header)
    fixed[0:3] = bytes([op, 1, 6])
    if giaddr_zero:
        fixed[24:28] = bytes(4)
    fixed[28:34] = MAC
    payload = bytes(fixed) + b"\x63\x82\x53\x63" + options
    server = DhcpServer()
    try:
        reply = server.handle(payload, src_mac=MAC, lease=LEASE, now=NOW)
    except BadDhcp:
        return
    if reply is not None:
        assert len(reply.payload) >= 300
        dpkt.dhcp.DHCP(reply.payload)


@dataclass(frozen=True)
class Expected:
    kind: ReplyKind
    yiaddr: IPv4Address
    dst_ip: IPv4Address
    dst_mac: bytes
    lease_options: bool


def expected_reply(
    message_type: int,
    *,
    flags: int,
    ciaddr: IPv4Address,
    requested: IPv4Address | None,
    server_id: IPv4Address | None,
    lease: IPv4Address | None,
) -> Expected | None:
    """The rules of the task, written out once more, independently of the server."""

    def to_client(kind: ReplyKind, yiaddr: IPv4Address, lease_options: bool) -> Expected:
        if ciaddr != ZERO:
            return Expected(kind, yiaddr, ciaddr, MAC, lease_options)
        if flags & 0x8000 or yiaddr == ZERO:
            return Expected(kind, yiaddr, BROADCAST_IP, BROADCAST_MAC, lease_options)
        return Expected(kind, yiaddr, yiaddr, MAC, lease_options)

    nak = Expected(ReplyKind.NAK, ZERO, BROADCAST_IP, BROADCAST_MAC, False)
    if message_type == DISCOVER:
        return None if lease is None else to_client(ReplyKind.OFFER, lease, True)
    if message_type == INFORM:
        return to_client(ReplyKind.ACK, ZERO, False)
    if message_type in (RELEASE, DECLINE):
        return None
    assert message_type == REQUEST
    if server_id is not None:  # SELECTING
        if server_id != SERVER:
            return None
        granted = lease is not None and requested == lease
    elif ciaddr == ZERO:  # INIT-REBOOT
        granted = lease is not None and requested == lease
    else:  # RENEWING, REBINDING
        granted = lease is not None and ciaddr == lease and requested in (None, lease)
    return to_client(ReplyKind.ACK, lease, True) if granted and lease else nak


ADDRESSES = st.sampled_from([LEASE, OTHER_IP, ZERO])
EXTRA_OPTIONS = st.lists(
    st.tuples(
        st.sampled_from([12, 55, 57, 60, 61, 81, 116, 145, 250]), st.binary(min_size=1, max_size=20)
    ),
    max_size=5,
    unique_by=lambda option: option[0],
)


@settings(max_examples=500)  # the rules have many branches; 100 examples miss some
@given(
    message_type=st.sampled_from([DISCOVER, REQUEST, DECLINE, RELEASE, INFORM]),
    xid=st.integers(0, 2**32 - 1),
    flags=st.sampled_from([0, 0x8000]) | st.integers(0, 0xFFFF),
    ciaddr=ADDRESSES,
    requested=st.none() | ADDRESSES,
    server_id=st.none() | st.sampled_from([SERVER, OTHER_SERVER]),
    lease=st.none() | st.sampled_from([LEASE, IPv4Address("10.0.2.200")]),
    extras=EXTRA_OPTIONS,
    data=st.data(),
)
def test_valid_messages_are_answered_by_the_rules(
    message_type: int,
    xid: int,
    flags: int,
    ciaddr: IPv4Address,
    requested: IPv4Address | None,
    server_id: IPv4Address | None,
    lease: IPv4Address | None,
    extras: list[tuple[int, bytes]],
    data: st.DataObject,
) -> None:
    options = [(53, bytes([message_type])), *extras]
    if requested is not None:
        options.append((50, requested.packed))
    if server_id is not None:
        options.append((54, server_id.packed))
    options = data.draw(st.permutations(options), label="options in order")
    payload = client_message(
        None,
        xid=xid,
        flags=flags,
        ciaddr=ciaddr,
        options=options,
        pad_to=data.draw(st.sampled_from([0, 300, 548]), label="pad to"),
    )
    server = DhcpServer()
    reply = server.handle(payload, src_mac=MAC, lease=lease, now=NOW)
    expected = expected_reply(
        message_type,
        flags=flags,
        ciaddr=ciaddr,
        requested=requested,
        server_id=server_id,
        lease=lease,
    )
    if expected is None:
        assert reply is None
        assert not server.stats.keys() & {"offer", "ack", "nak"}
        return
    assert reply is not None
    assert (reply.kind, reply.dst_ip, reply.dst_mac) == (
        expected.kind,
        expected.dst_ip,
        expected.dst_mac,
    )
    parsed = parse_reply(reply, xid=xid, flags=flags)
    assert address(parsed.message.yiaddr) == expected.yiaddr
    assert reply.client_ip == (None if expected.yiaddr == ZERO else expected.yiaddr)
    if expected.kind is ReplyKind.NAK:
        assert set(parsed.options) == {53, 54}
    else:
        assert set(parsed.options) == {53, 54} | set(CONFIG_OPTIONS) | (
            set(LEASE_OPTIONS) if expected.lease_options else set()
        )
    assert server.stats[expected.kind.name.lower()] == 1
