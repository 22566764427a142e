"""The gateway's DHCP server (RFC 2131), sans-IO.

Every guest on a LAN already holds one address: the relay leases it to the guest's MAC when
the session registers, and keeps it for that MAC. So this server allocates nothing and keeps
no state. It answers each client message against the one address the caller passes as
``lease``:

==========  ==========================================================  ======================
message     condition                                                   answer
==========  ==========================================================  ======================
DISCOVER    a lease exists                                              OFFER of the lease
DISCOVER    no lease                                                    nothing
REQUEST     server id (54) names another server                         nothing (client chose
                                                                        another server)
REQUEST     SELECTING (54 is ours): requested IP (50) is the lease      ACK, else NAK
REQUEST     INIT-REBOOT (no 54, ciaddr 0): requested IP (50) is lease   ACK, else NAK
REQUEST     RENEWING/REBINDING (ciaddr set): ciaddr (and 50, if sent)   ACK (unicast to
            is the lease                                                ciaddr), else NAK
REQUEST     no lease                                                    NAK
INFORM      always                                                      ACK, no lease options
DECLINE     always                                                      nothing (counted)
RELEASE     always                                                      nothing (counted)
==========  ==========================================================  ======================

Replies go where RFC 2131 §4.1 says for a server without relay agents: a NAK to
255.255.255.255; otherwise to ``ciaddr`` if the client filled it in; otherwise broadcast if
the client set the BROADCAST flag; otherwise to the offered address at the client's MAC.

Untrusted bytes have one failure mode: :meth:`DhcpServer.handle` raises :class:`BadDhcp`,
whose ``reason`` is a bounded counter label, and nothing else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address
from typing import Any

import dpkt.dhcp

from relay.errors import RemoteProtocolError

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
BROADCAST_FLAG = 0x8000
BOOTP_MIN_SIZE = 300
"""RFC 951's message size (236 bytes of header and 64 of vendor area); some clients drop
anything shorter."""

DEFAULT_SERVER_IP = IPv4Address("10.0.2.2")
DEFAULT_NETMASK = IPv4Address("255.255.255.0")
DEFAULT_BROADCAST = IPv4Address("10.0.2.255")
DEFAULT_DNS = IPv4Address("10.0.2.3")
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
ZERO = IPv4Address("0.0.0.0")
BROADCAST_MAC = b"\xff" * 6

# Message types (option 53).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

# Option codes.
OPT_NETMASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_DOMAIN = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59

_TYPE_NAMES = {
    DISCOVER: "discover",
    REQUEST: "request",
    DECLINE: "decline",
    RELEASE: "release",
    INFORM: "inform",
}


class BadDhcp(RemoteProtocolError):
    """A message to the DHCP server port that cannot be served; it is counted and dropped.

    ``reason`` is one of: ``malformed`` (dpkt failed, bad magic cookie, an option of the wrong
    length), ``not_request`` (op is not BOOTREQUEST), ``not_ethernet`` (htype/hlen),
    ``chaddr_mismatch`` (chaddr is not the frame's source MAC), ``relayed`` (giaddr set),
    ``no_message_type`` (no option 53, e.g. plain BOOTP), ``unsupported_type`` (option 53 is a
    server's type or unknown).
    """


@dataclass(frozen=True, slots=True)
class DhcpSettings:
    """What the server tells its clients."""

    server_ip: IPv4Address = DEFAULT_SERVER_IP
    """Server identifier (option 54) and ``siaddr`` of OFFER and ACK."""
    router: IPv4Address = DEFAULT_SERVER_IP
    """Option 3."""
    netmask: IPv4Address = DEFAULT_NETMASK
    """Option 1."""
    broadcast: IPv4Address = DEFAULT_BROADCAST
    """Option 28."""
    dns_servers: tuple[IPv4Address, ...] = (DEFAULT_DNS,)
    """Option 6 (1 to 63 addresses)."""
    domain_name: str = "relay.internal"
    """Option 15 (ASCII, 1 to 255 bytes)."""
    lease_time: int = 3600
    """Option 51, in seconds; T1 (option 58) is half of it, T2 (option 59) seven eighths."""
    mtu: int = 936
    """Option 26, the interface MTU: 576 to 9000."""

    def __post_init__(self) -> None:
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"DHCP MTU {self.mtu} is outside 576..9000")
        if not 1 <= self.lease_time <= 0xFFFFFFFF:
            raise ValueError(f"DHCP lease time {self.lease_time} is outside 1..2**32-1 seconds")
        if not 1 <= len(self.dns_servers) <= 63:
            raise ValueError("DHCP needs 1 to 63 DNS servers (one option of at most 255 bytes)")
        if not self.domain_name.isascii() or not 1 <= len(self.domain_name) <= 255:
            raise ValueError(f"DHCP domain name {self.domain_name!r} is not 1 to 255 ASCII bytes")


DEFAULT_SETTINGS = DhcpSettings()


class ReplyKind(Enum):
    """The server's message types; the value is the option 53 code."""

    OFFER = 2
    ACK = 5
    NAK = 6


@dataclass(frozen=True, slots=True)
class DhcpReply:
    """A message for the driver to send from ``server_ip``:67 to ``dst_ip``:68 at ``dst_mac``."""

    kind: ReplyKind
    payload: bytes
    """The BOOTP/DHCP message: the UDP payload."""
    dst_ip: IPv4Address
    """255.255.255.255, or the client's address (RFC 2131 §4.1)."""
    dst_mac: bytes
    """ff:ff:ff:ff:ff:ff with ``dst_ip`` 255.255.255.255, else the client's MAC."""
    client_ip: IPv4Address | None
    """The address offered or acknowledged; None for a NAK and for the ACK of an INFORM."""


@dataclass(frozen=True, slots=True)
class _Request:
    """The fields of a client message the server uses, checked."""

    message_type: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    chaddr: bytes
    requested_ip: IPv4Address | None
    server_id: IPv4Address | None


class DhcpServer:
    """Answers DHCP clients on one LAN; allocation is the caller's (see ``lease``)."""

    def __init__(self, settings: DhcpSettings = DEFAULT_SETTINGS) -> None:
        self.settings = settings
        self.stats: Counter[str] = Counter()
        """Messages handled by type (``discover``, ``request``, ``decline``, ``release``,
        ``inform``) and outcomes (``offer``, ``ack``, ``nak``, ``no_lease``: a DISCOVER with no
        address to offer, ``other_server``: a REQUEST for another server). Messages rejected
        with :class:`BadDhcp` are not counted here; the caller counts their reasons."""
        s = settings
        self._config_options: list[tuple[int, bytes]] = [
            (OPT_NETMASK, s.netmask.packed),
            (OPT_ROUTER, s.router.packed),
            (OPT_DNS, b"".join(a.packed for a in s.dns_servers)),
            (OPT_DOMAIN, s.domain_name.encode("ascii")),
            (OPT_MTU, s.mtu.to_bytes(2, "big")),
            (OPT_BROADCAST, s.broadcast.packed),
        ]
        self._lease_options: list[tuple[int, bytes]] = [
            (OPT_LEASE_TIME, s.lease_time.to_bytes(4, "big")),
            (OPT_RENEWAL_TIME, (s.lease_time // 2).to_bytes(4, "big")),
            (OPT_REBINDING_TIME, (s.lease_time * 7 // 8).to_bytes(4, "big")),
        ]

    def handle(
        self, payload: bytes, *, src_mac: bytes, lease: IPv4Address | None, now: float
    ) -> DhcpReply | None:
        """Answer the UDP payload a client sent to port 67.

        Args:
            payload: the BOOTP/DHCP message.
            src_mac: the Ethernet source MAC of the frame, already checked by port security;
                the message's ``chaddr`` must be the same.
            lease: the one address this MAC may have on the LAN; None if there is none.
            now: the current time (unused: leases are the caller's and never expire here).

        Returns:
            The reply to send, or None when none is due.

        Raises:
            BadDhcp: the message is malformed or not one this server serves.
        """
        request = _parse_untrusted(payload, src_mac)
        self.stats[_TYPE_NAMES[request.message_type]] += 1
        if request.message_type == DISCOVER:
            if lease is None:
                self.stats["no_lease"] += 1
                return None
            return self._reply(request, ReplyKind.OFFER, lease)
        if request.message_type == REQUEST:
            return self._request(request, lease)
        if request.message_type == INFORM:
            return self._reply(request, ReplyKind.ACK, None)
        return None  # DECLINE, RELEASE: leases stay with their MAC whatever the guest says

    def _request(self, request: _Request, lease: IPv4Address | None) -> DhcpReply | None:
        if request.server_id is not None and request.server_id != self.settings.server_ip:
            self.stats["other_server"] += 1
            return None
        if lease is None:
            return self._reply(request, ReplyKind.NAK, None)
        if request.server_id is None and request.ciaddr != ZERO:
            # RENEWING (unicast) or REBINDING (broadcast). Option 50 is not allowed here, but
            # some clients send it; it must then agree.
            ok = request.ciaddr == lease and request.requested_ip in (None, lease)
        else:
            # SELECTING (server id present) or INIT-REBOOT: option 50 is the address.
            ok = request.requested_ip == lease
        if ok:
            return self._reply(request, ReplyKind.ACK, lease)
        return self._reply(request, ReplyKind.NAK, None)

    def _reply(self, request: _Request, kind: ReplyKind, lease: IPv4Address | None) -> DhcpReply:
        """Build OFFER/ACK (of ``lease``, or of configuration only for INFORM) or NAK."""
        s = self.settings
        options: list[tuple[int, bytes]] = [
            (OPT_MESSAGE_TYPE, bytes([kind.value])),
            (OPT_SERVER_ID, s.server_ip.packed),
        ]
        if kind is not ReplyKind.NAK:
            if lease is not None:
                options += self._lease_options
            options += self._config_options
        yiaddr = lease if lease is not None else ZERO
        # RFC 2131 table 3: ciaddr is echoed in an ACK only; siaddr is ours except in a NAK.
        ciaddr = request.ciaddr if kind is ReplyKind.ACK else ZERO
        siaddr = ZERO if kind is ReplyKind.NAK else s.server_ip
        message = dpkt.dhcp.DHCP(
            op=BOOTREPLY,
            hrd=HTYPE_ETHERNET,
            hln=6,
            hops=0,
            xid=request.xid,
            secs=0,
            flags=request.flags,
            ciaddr=int(ciaddr),
            yiaddr=int(yiaddr),
            siaddr=int(siaddr),
            giaddr=0,
            chaddr=request.chaddr.ljust(16, b"\x00"),
            sname=bytes(64),
            file=bytes(128),
            magic=dpkt.dhcp.DHCP_MAGIC,
            opts=options,
        )
        payload = bytes(message).ljust(BOOTP_MIN_SIZE, b"\x00")
        dst_ip, dst_mac = self._destination(request, kind, yiaddr)
        self.stats[kind.name.lower()] += 1
        return DhcpReply(kind, payload, dst_ip, dst_mac, lease)

    def _destination(
        self, request: _Request, kind: ReplyKind, yiaddr: IPv4Address
    ) -> tuple[IPv4Address, bytes]:
        """RFC 2131 §4.1 for a server on the client's own link (giaddr is always 0 here)."""
        if kind is ReplyKind.NAK:
            return LIMITED_BROADCAST, BROADCAST_MAC
        if request.ciaddr != ZERO:
            return request.ciaddr, request.chaddr
        if request.flags & BROADCAST_FLAG or yiaddr == ZERO:
            # yiaddr is 0 only for an INFORM without ciaddr: nowhere to unicast to.
            return LIMITED_BROADCAST, BROADCAST_MAC
        return yiaddr, request.chaddr


def _parse_untrusted(payload: bytes, src_mac: bytes) -> _Request:
    """The checked fields of a client message; raises only :class:`BadDhcp`."""
    try:
        message: Any = dpkt.dhcp.DHCP(payload)
        raw_options: list[tuple[int, bytes]] = [(int(t), bytes(v)) for t, v in message.opts]
    except Exception as exc:  # dpkt: UnpackError, NeedData, struct.error, IndexError, ...
        raise BadDhcp(f"undecodable DHCP message: {exc!r}", reason="malformed") from None
    if message.magic != dpkt.dhcp.DHCP_MAGIC:
        raise BadDhcp("no DHCP magic cookie", reason="malformed")
    if message.op != BOOTREQUEST:
        raise BadDhcp(f"op {message.op} is not BOOTREQUEST", reason="not_request")
    if message.hrd != HTYPE_ETHERNET or message.hln != 6:
        raise BadDhcp("hardware address is not Ethernet", reason="not_ethernet")
    chaddr = bytes(message.chaddr)  # dpkt cut it to hln = 6 bytes
    if chaddr != src_mac:
        raise BadDhcp("chaddr is not the frame's source MAC", reason="chaddr_mismatch")
    if message.giaddr != 0:
        raise BadDhcp("relayed through a relay agent", reason="relayed")

    # RFC 3396: an option that appears more than once is the concatenation of its parts.
    options: dict[int, bytes] = {}
    for code, value in raw_options:
        options[code] = options.get(code, b"") + value
    message_type = options.get(OPT_MESSAGE_TYPE)
    if message_type is None:
        raise BadDhcp("no DHCP message type (option 53)", reason="no_message_type")
    if len(message_type) != 1:
        raise BadDhcp("DHCP message type is not one byte", reason="malformed")
    if message_type[0] not in _TYPE_NAMES:
        raise BadDhcp(f"message type {message_type[0]} from a client", reason="unsupported_type")
    return _Request(
        message_type=message_type[0],
        xid=int(message.xid),
        flags=int(message.flags),
        ciaddr=IPv4Address(int(message.ciaddr)),
        chaddr=chaddr,
        requested_ip=_address_option(options, OPT_REQUESTED_IP),
        server_id=_address_option(options, OPT_SERVER_ID),
    )


def _address_option(options: dict[int, bytes], code: int) -> IPv4Address | None:
    value = options.get(code)
    if value is None:
        return None
    if len(value) != 4:
        raise BadDhcp(f"option {code} is {len(value)} bytes, not an address", reason="malformed")
    return IPv4Address(value)
