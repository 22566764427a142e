"""Egress policy: may a VM's new flow reach this destination? Checked before every host socket.

A user-space NAT opens a fresh host socket for the guest, so the guest reaches whatever the
relay can: its loopback, its LAN, the cloud metadata service. Egress is therefore default-deny
for everything that is not globally routable unicast. :meth:`EgressPolicy.check` decides in
this order, the first match winning:

1. operator **deny** rules (``operator_deny``) win over everything;
2. operator **allow** rules (``operator_allow``) open everything below them — the host's own
   addresses, the built-in table and the port deny-list. This is how a lab opens its LAN and
   how tests reach a namespace at 198.18.x or a server on 127.0.0.1;
3. the relay host's own addresses (``host_address``): the guest must not reach the relay's
   own services through its public or floating IPs;
4. IPv6 forms that embed an IPv4 address are unwrapped and the inner address is checked by
   3, 5 and 6 again (``embedded_v4:<inner reason>``): IPv4-mapped ``::ffff:0:0/96``,
   IPv4-compatible ``::/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48`` (every RFC 6052
   layout a prefix inside it may use, /96 to /48), 6to4 ``2002::/16`` and Teredo
   ``2001::/32`` (server and client);
5. the built-in table :data:`DEFAULT_DENY`, the project's own copy of the IANA special-purpose
   registries (Python's ``ipaddress`` flags are wrong or version-dependent for several of
   them). The longest prefix wins, so 169.254.169.254 is ``metadata``, not ``link_local``.
   IPv6 outside 2000::/3 is ``reserved`` except the embedded forms whose outer address routes
   (IPv4-mapped, the well-known NAT64 prefix, and 6to4, as the inner address decides);
6. a safety net: an address the table lets through but ``ipaddress`` says is not global is
   denied as ``not_global`` (not applied to embedded forms, whose inner address decides);
7. the port deny-list (default :data:`DEFAULT_DENIED_PORTS`: TCP 25 anywhere, the port every
   provider blocks) as ``port_denied``;

and then the flow is ``allowed``.

**Rule syntax** (:func:`parse_rule`)::

    [tcp/|udp/|icmp/] NETWORK [:PORTS]

``NETWORK`` is a CIDR or a bare address (a /32 or /128); an IPv6 network takes ports only in
brackets, ``[2001:db8::/32]:443`` (unbracketed, every colon belongs to the address, so
``2001:db8::1`` has no ports). ``PORTS`` is a comma list of ports and inclusive ranges,
``80,443,1000-2000``, each within 1-65535. Host bits set (``10.1.2.3/24``) are refused rather
than guessed. The least surprising reading of what is left out:

* no protocol prefix: the rule covers every protocol;
* no ports: every port, and ICMP too;
* ports given: only flows with a port in range, so never ICMP (``8.8.8.8:53`` in the deny
  list leaves ping alone); ``icmp/`` with ports is refused.

Operator rules match the destination as given; an IPv4-mapped address (the same destination
to a dual-stack socket) is matched as its IPv4 address too, and deny rules also match the IPv4
address inside any other embedded form, since a translator delivers to it. An allow rule for
``64:ff9b::/96`` therefore opens the whole NAT64 prefix, inner addresses included.

Cost: one dict probe per distinct prefix length per family (about a dozen), so a check is a
few microseconds; operator rules are indexed the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Generic, TypeAlias, TypeVar

from relay.errors import ConfigError

Address: TypeAlias = IPv4Address | IPv6Address
Network: TypeAlias = IPv4Network | IPv6Network


class Proto(Enum):
    """A NAT flow's protocol; the value is the counter label and the rule prefix."""

    ICMP = "icmp"
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Rule:
    """One operator rule: a network, optionally narrowed to ports and a protocol."""

    network: Network
    ports: tuple[tuple[int, int], ...] | None = None
    """Inclusive port ranges, sorted and merged; None: every port, and ICMP."""
    proto: Proto | None = None
    """None: every protocol."""

    def __post_init__(self) -> None:
        if self.ports is None:
            return
        if not self.ports:
            raise ConfigError(f"egress rule for {self.network}: empty port list (use None)")
        if self.proto is Proto.ICMP:
            raise ConfigError(f"egress rule for {self.network}: ICMP has no ports")
        for low, high in self.ports:
            if not 1 <= low <= high <= 65535:
                raise ConfigError(f"egress rule for {self.network}: bad port range {low}-{high}")

    def matches(self, proto: Proto, address: Address, port: int | None) -> bool:
        """True if a flow of ``proto`` to ``address``:``port`` falls under this rule."""
        return address in self.network and self._matches_rest(proto, port)

    def _matches_rest(self, proto: Proto, port: int | None) -> bool:
        if self.proto is not None and self.proto is not proto:
            return False
        if self.ports is None:
            return True
        if port is None:
            return False
        return any(low <= port <= high for low, high in self.ports)

    def __str__(self) -> str:
        text = str(self.network)
        if self.ports is not None:
            if self.network.version == 6:
                text = f"[{text}]"
            text += ":" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports)
        return text if self.proto is None else f"{self.proto.value}/{text}"


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _parse_port(text: str, rule: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        raise ConfigError(f"bad egress rule {_show(rule)}: {text!r} is not a port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"bad egress rule {_show(rule)}: port {port} is not within 1-65535")
    return port


def _parse_ports(text: str, rule: str) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for item in text.split(","):
        low_text, dash, high_text = item.strip().partition("-")
        low = _parse_port(low_text, rule)
        high = _parse_port(high_text, rule) if dash else low
        if high < low:
            raise ConfigError(f"bad egress rule {_show(rule)}: reversed port range {item.strip()}")
        ranges.append((low, high))
    ranges.sort()
    merged = [ranges[0]]
    for low, high in ranges[1:]:
        last_low, last_high = merged[-1]
        if low <= last_high + 1:
            merged[-1] = (last_low, max(last_high, high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _parse_network(text: str, rule: str, *, bracketed: bool) -> Network:
    if not text or "%" in text or not text.isascii():
        raise ConfigError(f"bad egress rule {_show(rule)}: {text!r} is not a network")
    try:
        network = ip_network(text)
    except ValueError as exc:
        try:
            hint = f" (did you mean {ip_network(text, strict=False)}?)"
        except ValueError:
            hint = ""
        reason = "has host bits set" if hint else f"is not a network ({exc})"
        raise ConfigError(f"bad egress rule {_show(rule)}: {text!r} {reason}{hint}") from None
    if bracketed and network.version != 6:
        raise ConfigError(f"bad egress rule {_show(rule)}: brackets are for IPv6 only")
    return network


def parse_rule(text: str) -> Rule:
    """The rule ``text`` spells (syntax in the module docstring); ConfigError names bad text."""
    body = text.strip()
    proto: Proto | None = None
    head, slash, rest = body.partition("/")
    if slash and head.lower() in {p.value for p in Proto}:
        proto, body = Proto(head.lower()), rest
    if body.startswith("["):
        inside, bracket, after = body[1:].partition("]")
        if not bracket:
            raise ConfigError(f"bad egress rule {_show(text)}: missing ']'")
        network = _parse_network(inside, text, bracketed=True)
        if after and not after.startswith(":"):
            raise ConfigError(f"bad egress rule {_show(text)}: junk after ']'")
        ports_text: str | None = after[1:] if after else None
    elif body.count(":") >= 2:
        network, ports_text = _parse_network(body, text, bracketed=False), None
    else:
        net_text, colon, port_part = body.partition(":")
        network = _parse_network(net_text, text, bracketed=False)
        ports_text = port_part if colon else None
    ports = None if ports_text is None else _parse_ports(ports_text, text)
    if proto is Proto.ICMP and ports is not None:
        raise ConfigError(f"bad egress rule {_show(text)}: ICMP has no ports")
    return Rule(network, ports, proto)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one new flow; ``reason`` is a short, bounded counter and log label."""

    allowed: bool
    reason: str


ALLOWED = Decision(True, "allowed")
OPERATOR_ALLOW = Decision(True, "operator_allow")

_V4 = IPv4Network
_V6 = IPv6Network

DEFAULT_DENY: tuple[tuple[Network, str], ...] = (
    # IPv4, from the IANA IPv4 special-purpose address registry
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "cgnat"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link_local"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "ietf"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("192.88.99.0/24"), "reserved"),  # deprecated 6to4 relay anycast (RFC 7526)
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "documentation"),  # benchmarking (RFC 2544)
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved"),
    (_V4("255.255.255.255/32"), "broadcast"),
    # cloud metadata and provider services, some inside the ranges above
    (_V4("100.100.100.200/32"), "metadata"),  # Alibaba
    (_V4("168.63.129.16/32"), "metadata"),  # Azure wireserver, a public address
    (_V4("169.254.0.23/32"), "metadata"),  # Tencent
    (_V4("169.254.169.254/32"), "metadata"),  # AWS, GCP, Azure, Oracle, ...
    (_V4("169.254.170.2/32"), "metadata"),  # AWS ECS task metadata
    (_V4("192.0.0.192/32"), "metadata"),  # Oracle
    # IPv6: everything outside 2000::/3 is unassigned or special (IANA address space)
    (_V6("::/8"), "reserved"),
    (_V6("100::/8"), "reserved"),
    (_V6("200::/7"), "reserved"),
    (_V6("400::/6"), "reserved"),
    (_V6("800::/5"), "reserved"),
    (_V6("1000::/4"), "reserved"),
    (_V6("4000::/3"), "reserved"),
    (_V6("6000::/3"), "reserved"),
    (_V6("8000::/3"), "reserved"),
    (_V6("a000::/3"), "reserved"),
    (_V6("c000::/3"), "reserved"),
    (_V6("e000::/4"), "reserved"),
    (_V6("f000::/5"), "reserved"),
    (_V6("f800::/6"), "reserved"),
    (_V6("fe00::/9"), "reserved"),
    (_V6("fec0::/10"), "reserved"),  # deprecated site-local
    # IPv6, from the IANA IPv6 special-purpose address registry
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("64:ff9b:1::/48"), "not_global"),  # local-use NAT64 (RFC 8215): the host's own site
    (_V6("100::/64"), "reserved"),  # discard-only
    (_V6("2001::/23"), "ietf"),  # includes Teredo 2001::/32
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("fc00::/7"), "private"),
    (_V6("fe80::/10"), "link_local"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("fd00:ec2::254/128"), "metadata"),  # AWS IMDS over IPv6
)
"""The built-in default-deny table: (network, reason), the longest matching prefix wins."""

EMBEDDED_V4: tuple[IPv6Network, ...] = (
    _V6("::ffff:0:0/96"),
    _V6("::/96"),
    _V6("64:ff9b::/96"),
    _V6("64:ff9b:1::/48"),
    _V6("2002::/16"),
    _V6("2001::/32"),
)
"""IPv6 networks whose addresses carry an IPv4 address, which is unwrapped and checked."""

_ROUTED_EMBEDDINGS: tuple[IPv6Network, ...] = (
    _V6("::ffff:0:0/96"),
    _V6("64:ff9b::/96"),
    _V6("2002::/16"),
)
"""Holes in the table: the outer address routes and the inner address alone decides."""

DEFAULT_DENIED_PORTS: tuple[Rule, ...] = (
    Rule(_V4("0.0.0.0/0"), ((25, 25),), Proto.TCP),
    Rule(_V6("::/0"), ((25, 25),), Proto.TCP),
)
"""SMTP: mail from a relay's address gets it blocklisted, and providers block it anyway."""

T = TypeVar("T")


class _PrefixIndex(Generic[T]):
    """Values keyed by network: one dict per prefix length, probed longest prefix first."""

    __slots__ = ("levels",)

    def __init__(self, bits: int, entries: Iterable[tuple[Network, T]]) -> None:
        by_length: dict[int, dict[int, list[T]]] = {}
        for network, value in entries:
            shift = bits - network.prefixlen
            key = int(network.network_address) >> shift
            by_length.setdefault(shift, {}).setdefault(key, []).append(value)
        self.levels = tuple(
            (shift, {key: tuple(values) for key, values in table.items()})
            for shift, table in sorted(by_length.items())
        )

    def longest(self, value: int) -> T | None:
        """The value of the most specific network containing ``value``, or None."""
        for shift, table in self.levels:
            hit = table.get(value >> shift)
            if hit is not None:
                return hit[0]
        return None


class _RuleSet:
    """Rules indexed by network, per family."""

    __slots__ = ("_v4", "_v6", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._v4 = _PrefixIndex(32, ((r.network, r) for r in self.rules if r.network.version == 4))
        self._v6 = _PrefixIndex(128, ((r.network, r) for r in self.rules if r.network.version == 6))

    def match(self, proto: Proto, version: int, value: int, port: int | None) -> bool:
        if not self.rules:
            return False
        index = self._v4 if version == 4 else self._v6
        for shift, table in index.levels:
            rules = table.get(value >> shift)
            if rules is not None:
                for rule in rules:
                    if rule._matches_rest(proto, port):
                        return True
        return False


_TABLE_V4: _PrefixIndex[str] = _PrefixIndex(32, ((n, r) for n, r in DEFAULT_DENY if n.version == 4))
_TABLE_V6: _PrefixIndex[str] = _PrefixIndex(
    128,
    [*((n, r) for n, r in DEFAULT_DENY if n.version == 6), *((n, "") for n in _ROUTED_EMBEDDINGS)],
)

_MASK32 = 0xFFFF_FFFF
_NAT64_WKP = int(IPv6Address("64:ff9b::")) >> 32
_NAT64_LOCAL = int(IPv6Address("64:ff9b:1::")) >> 80


def _nat64_inner(value: int, prefixlen: int) -> int:
    """The IPv4 address in an RFC 6052 address with a /``prefixlen`` prefix (bits 64-71 = u)."""
    if prefixlen == 96:
        return value & _MASK32
    head = 64 - prefixlen  # IPv4 bits before the u octet
    high = (value >> 64) & ((1 << head) - 1)
    low = (value >> (56 - (32 - head))) & ((1 << (32 - head)) - 1)
    return (high << (32 - head)) | low


def embedded_v4(address: IPv6Address) -> tuple[IPv4Address, ...]:
    """The IPv4 addresses ``address`` carries (see :data:`EMBEDDED_V4`); usually none."""
    return tuple(IPv4Address(v) for v in _embedded(int(address)))


def _embedded(value: int) -> tuple[int, ...]:
    top = value >> 112
    if top == 0:
        upper = value >> 32
        if upper == 0xFFFF or (upper == 0 and value > 1):  # mapped, or compatible (not :: ::1)
            return (value & _MASK32,)
    elif top == 0x64:
        if value >> 32 == _NAT64_WKP:
            return (value & _MASK32,)
        if value >> 80 == _NAT64_LOCAL:
            return tuple(
                dict.fromkeys(_nat64_inner(value, n) for n in (96, 64, 56, 48))
            )  # /96 first: the usual layout
    elif top == 0x2002:
        return ((value >> 80) & _MASK32,)
    elif top == 0x2001 and (value >> 96) & 0xFFFF == 0:
        return ((value >> 64) & _MASK32, ~value & _MASK32)  # Teredo server, client
    return ()


_DENIALS: dict[str, Decision] = {}


def _deny(reason: str) -> Decision:
    decision = _DENIALS.get(reason)
    if decision is None:
        decision = _DENIALS[reason] = Decision(False, reason)
    return decision


class EgressPolicy:
    """The egress decision for new flows; immutable, so one instance is shared by all LANs."""

    __slots__ = ("_allow", "_deny", "_host4", "_host6", "_ports", "host_addresses")

    def __init__(
        self,
        allow: Sequence[Rule] = (),
        deny: Sequence[Rule] = (),
        host_addresses: Iterable[Address] = (),
        denied_ports: Sequence[Rule] = DEFAULT_DENIED_PORTS,
    ) -> None:
        self._allow = _RuleSet(allow)
        self._deny = _RuleSet(deny)
        self._ports = _RuleSet(denied_ports)
        self.host_addresses = frozenset(host_addresses)
        # by integer, so a scope id (fe80::1%eth0) cannot make a host address look foreign
        self._host4 = frozenset(int(a) for a in self.host_addresses if a.version == 4)
        self._host6 = frozenset(int(a) for a in self.host_addresses if a.version == 6)

    @property
    def allow(self) -> tuple[Rule, ...]:
        return self._allow.rules

    @property
    def deny(self) -> tuple[Rule, ...]:
        return self._deny.rules

    @property
    def denied_ports(self) -> tuple[Rule, ...]:
        return self._ports.rules

    def with_host_addresses(self, host_addresses: Iterable[Address]) -> EgressPolicy:
        """The same policy for a host whose addresses changed."""
        return EgressPolicy(self.allow, self.deny, host_addresses, self.denied_ports)

    def check(self, proto: Proto, address: Address, port: int | None) -> Decision:
        """The verdict on a new ``proto`` flow to ``address``:``port`` (None for ICMP)."""
        value = int(address)
        if address.version == 4:
            return self._check_v4(proto, value, port)
        inner = _embedded(value)
        if self._deny.match(proto, 6, value, port) or any(
            self._deny.match(proto, 4, v, port) for v in inner
        ):
            return _deny("operator_deny")
        if self._allow.match(proto, 6, value, port) or (
            value >> 32 == 0xFFFF and self._allow.match(proto, 4, value & _MASK32, port)
        ):
            return OPERATOR_ALLOW
        if value in self._host6:
            return _deny("host_address")
        for v in inner:
            reason = self._v4_reason(v)
            if reason is not None:
                return _deny("embedded_v4:" + reason)
        reason = _TABLE_V6.longest(value)
        if reason:
            return _deny(reason)
        if reason is None and not IPv6Address(value).is_global:
            return _deny("not_global")
        if self._ports.match(proto, 6, value, port) or any(
            self._ports.match(proto, 4, v, port) for v in inner
        ):
            return _deny("port_denied")
        return ALLOWED

    def _check_v4(self, proto: Proto, value: int, port: int | None) -> Decision:
        if self._deny.match(proto, 4, value, port):
            return _deny("operator_deny")
        if self._allow.match(proto, 4, value, port):
            return OPERATOR_ALLOW
        reason = self._v4_reason(value)
        if reason is not None:
            return _deny(reason)
        if self._ports.match(proto, 4, value, port):
            return _deny("port_denied")
        return ALLOWED

    def _v4_reason(self, value: int) -> str | None:
        """Why an IPv4 address is off limits (host, table, safety net), or None."""
        if value in self._host4:
            return "host_address"
        reason = _TABLE_V4.longest(value)
        if reason is not None:
            return reason
        if not IPv4Address(value).is_global:
            return "not_global"
        return None
