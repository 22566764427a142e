"""Egress policy (the default-deny table, operator rules, port deny-list), host addresses."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.errors import ConfigError
from relay.nat.host_addresses import host_addresses, parse_fib_trie, parse_if_inet6
from relay.nat.policy import (
    DEFAULT_DENY,
    EMBEDDED_V4,
    Decision,
    EgressPolicy,
    Proto,
    Rule,
    embedded_v4,
    parse_rule,
)

POLICY = EgressPolicy()


def reason(text: str, proto: Proto = Proto.UDP, port: int | None = 443) -> str:
    decision = POLICY.check(proto, ip_address(text), port)
    assert decision.allowed == (decision.reason == "allowed")
    return decision.reason


# --- the built-in table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # unspecified
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        # loopback
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        # private / ULA
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        # shared / CGNAT
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        # link-local
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        # IETF assignments
        ("192.0.0.1", "ietf"),
        ("192.0.0.9", "ietf"),
        ("2001:2::1", "ietf"),  # benchmarking
        ("2001:10::1", "ietf"),  # ORCHID
        ("2001:1::1", "ietf"),
        ("2001:1ff:ffff::1", "ietf"),
        # documentation / benchmark
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("198.18.0.1", "documentation"),
        ("198.19.255.255", "documentation"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        # multicast
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        # reserved, broadcast, discard
        ("240.0.0.1", "reserved"),
        ("255.255.255.254", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("100::1", "reserved"),
        ("192.88.99.1", "reserved"),
        ("fec0::1", "reserved"),
        ("4000::1", "reserved"),
        ("5f00::1", "reserved"),
        ("fe00::1", "reserved"),
        # provider specials
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("169.254.0.23", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),
        ("192.0.0.192", "metadata"),
        ("fd00:ec2::254", "metadata"),
        # embedded IPv4, unwrapped and re-checked
        ("::ffff:127.0.0.1", "embedded_v4:loopback"),
        ("::ffff:169.254.169.254", "embedded_v4:metadata"),
        ("::ffff:10.0.0.1", "embedded_v4:private"),
        ("::127.0.0.1", "embedded_v4:loopback"),
        ("64:ff9b::a9fe:a9fe", "embedded_v4:metadata"),
        ("64:ff9b::7f00:1", "embedded_v4:loopback"),
        ("64:ff9b::c0a8:101", "embedded_v4:private"),
        ("64:ff9b:1::a9fe:a9fe", "embedded_v4:metadata"),  # local-use NAT64, /96 layout
        ("64:ff9b:1:808:8:808:808:808", "not_global"),  # 8.8.8.8 in every layout
        ("2002:7f00:1::", "embedded_v4:loopback"),
        ("2002:a9fe:a9fe::1", "embedded_v4:metadata"),
        ("2002:e000:1::", "embedded_v4:multicast"),
        ("2001:0:7f00:1::", "embedded_v4:loopback"),  # Teredo server
        ("2001:0:808:808:0:0:80ff:fffe", "embedded_v4:loopback"),  # Teredo client 127.0.0.1
    ],
)
def test_default_table_denies_with_the_right_reason(address: str, expected: str) -> None:
    assert reason(address) == expected
    assert reason(address, Proto.TCP, 80) == expected
    assert reason(address, Proto.ICMP, None) == expected


def test_the_python_pitfalls_from_the_doc_are_caught() -> None:
    # the cases ipaddress gets wrong or where is_global alone is not enough
    assert not ip_address("100.100.100.200").is_private
    assert ip_address("224.0.0.1").is_global
    assert not ip_address("::ffff:127.0.0.1").is_loopback
    for text in ("100.100.100.200", "224.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::"):
        assert not POLICY.check(Proto.TCP, ip_address(text), 443).allowed
    assert reason("::ffff:127.0.0.1") == "embedded_v4:loopback"


@pytest.mark.parametrize(
    "address",
    [
        "1.1.1.1",
        "8.8.8.8",
        "9.9.9.9",
        "100.63.255.255",
        "100.128.0.0",
        "168.63.129.15",
        "169.253.255.255",
        "172.32.0.1",
        "192.0.1.1",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.254",
        "2620:fe::fe",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "2001:200::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_destinations_are_allowed(address: str) -> None:
    assert POLICY.check(Proto.TCP, ip_address(address), 443) == Decision(True, "allowed")
    assert POLICY.check(Proto.ICMP, ip_address(address), None).allowed


def test_unwrapping_covers_the_embedded_forms() -> None:
    assert embedded_v4(IPv6Address("::ffff:1.2.3.4")) == (IPv4Address("1.2.3.4"),)
    assert embedded_v4(IPv6Address("64:ff9b::102:304")) == (IPv4Address("1.2.3.4"),)
    assert embedded_v4(IPv6Address("2002:102:304::")) == (IPv4Address("1.2.3.4"),)
    assert IPv4Address("1.2.3.4") in embedded_v4(IPv6Address("64:ff9b:1:102:3:400::"))  # /48
    assert IPv4Address("127.0.1.0") in embedded_v4(IPv6Address("64:ff9b:1:7f00:1::"))
    assert not POLICY.check(Proto.TCP, IPv6Address("64:ff9b:1:7f00:1::"), 80).allowed
    teredo = IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    assert teredo.teredo is not None
    assert embedded_v4(teredo) == teredo.teredo
    assert embedded_v4(IPv6Address("::1")) == ()
    assert embedded_v4(IPv6Address("2620:fe::fe")) == ()
    assert len(EMBEDDED_V4) == 6


# --- ports ----------------------------------------------------------------------------------


def test_tcp_25_is_denied_by_default_but_not_udp_25() -> None:
    for text in ("8.8.8.8", "2620:fe::fe", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        address = ip_address(text)
        assert POLICY.check(Proto.TCP, address, 25) == Decision(False, "port_denied")
        assert POLICY.check(Proto.UDP, address, 25).allowed
        assert POLICY.check(Proto.TCP, address, 587).allowed


def test_the_port_deny_list_is_replaceable() -> None:
    address = ip_address("8.8.8.8")
    assert EgressPolicy(denied_ports=()).check(Proto.TCP, address, 25).allowed
    netbios = EgressPolicy(denied_ports=[parse_rule("0.0.0.0/0:137-139,445")])
    assert netbios.check(Proto.UDP, address, 138).reason == "port_denied"
    assert netbios.check(Proto.TCP, address, 445).reason == "port_denied"
    assert netbios.check(Proto.TCP, address, 25).allowed
    assert netbios.check(Proto.ICMP, address, None).allowed


# --- operator rules -------------------------------------------------------------------------


def test_operator_allow_opens_the_test_namespace_range() -> None:
    policy = EgressPolicy(allow=[parse_rule("198.18.0.0/15")])
    for text in ("198.18.0.1", "198.19.255.254"):
        assert policy.check(Proto.TCP, ip_address(text), 80) == Decision(True, "operator_allow")
        assert policy.check(Proto.ICMP, ip_address(text), None).allowed
        assert policy.check(Proto.TCP, ip_address(text), 25).allowed  # opens the port list too
    assert policy.check(Proto.TCP, ip_address("::ffff:198.18.0.1"), 80).allowed  # same host
    assert not policy.check(Proto.TCP, ip_address("198.51.100.1"), 80).allowed
    assert not policy.check(Proto.TCP, ip_address("10.0.0.1"), 80).allowed


def test_operator_allow_of_one_port_opens_only_that_port() -> None:
    policy = EgressPolicy(allow=[parse_rule("127.0.0.1:8080")])
    loopback = ip_address("127.0.0.1")
    assert policy.check(Proto.TCP, loopback, 8080).reason == "operator_allow"
    assert policy.check(Proto.UDP, loopback, 8080).reason == "operator_allow"
    assert policy.check(Proto.TCP, loopback, 8081).reason == "loopback"
    assert policy.check(Proto.ICMP, loopback, None).reason == "loopback"
    assert policy.check(Proto.TCP, ip_address("127.0.0.2"), 8080).reason == "loopback"


def test_operator_allow_with_a_protocol() -> None:
    policy = EgressPolicy(allow=[parse_rule("tcp/127.0.0.1:8080")])
    loopback = ip_address("127.0.0.1")
    assert policy.check(Proto.TCP, loopback, 8080).allowed
    assert not policy.check(Proto.UDP, loopback, 8080).allowed


def test_operator_deny_closes_one_port_only() -> None:
    policy = EgressPolicy(deny=[parse_rule("8.8.8.8:53")])
    google = ip_address("8.8.8.8")
    assert policy.check(Proto.UDP, google, 53) == Decision(False, "operator_deny")
    assert policy.check(Proto.TCP, google, 53).reason == "operator_deny"
    assert policy.check(Proto.TCP, google, 443).allowed
    assert policy.check(Proto.ICMP, google, None).allowed
    assert policy.check(Proto.UDP, ip_address("8.8.4.4"), 53).allowed


def test_operator_deny_sees_through_embedded_forms() -> None:
    policy = EgressPolicy(deny=[parse_rule("8.8.8.8")])
    for text in ("8.8.8.8", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"):
        assert policy.check(Proto.TCP, ip_address(text), 443).reason == "operator_deny"
    assert policy.check(Proto.TCP, ip_address("8.8.4.4"), 443).allowed


def test_deny_beats_allow() -> None:
    policy = EgressPolicy(
        allow=[parse_rule("198.18.0.0/15")], deny=[parse_rule("tcp/198.18.5.0/24:22")]
    )
    assert policy.check(Proto.TCP, ip_address("198.18.5.1"), 22).reason == "operator_deny"
    assert policy.check(Proto.TCP, ip_address("198.18.5.1"), 80).reason == "operator_allow"
    assert policy.check(Proto.UDP, ip_address("198.18.5.1"), 22).reason == "operator_allow"
    everything = EgressPolicy(allow=[parse_rule("0.0.0.0/0")], deny=[parse_rule("0.0.0.0/0")])
    assert everything.check(Proto.ICMP, ip_address("1.1.1.1"), None).reason == "operator_deny"


def test_ipv6_operator_rules() -> None:
    policy = EgressPolicy(
        allow=[parse_rule("[2001:db8::/32]:443")], deny=[parse_rule("udp/[2620:fe::/48]:53")]
    )
    assert policy.check(Proto.TCP, ip_address("2001:db8::5"), 443).reason == "operator_allow"
    assert policy.check(Proto.TCP, ip_address("2001:db8::5"), 80).reason == "documentation"
    assert policy.check(Proto.UDP, ip_address("2620:fe::fe"), 53).reason == "operator_deny"
    assert policy.check(Proto.TCP, ip_address("2620:fe::fe"), 53).allowed


def test_host_addresses_are_denied_unless_allowed() -> None:
    public4, public6 = ip_address("203.0.114.7"), ip_address("2a01:4f8::7")
    policy = EgressPolicy(host_addresses=[public4, public6, ip_address("127.0.0.1")])
    assert policy.check(Proto.TCP, public4, 443) == Decision(False, "host_address")
    assert policy.check(Proto.ICMP, public6, None) == Decision(False, "host_address")
    assert policy.check(Proto.TCP, ip_address("::ffff:203.0.114.7"), 443).reason == (
        "embedded_v4:host_address"
    )
    assert policy.check(Proto.TCP, ip_address("203.0.114.8"), 443).allowed
    opened = EgressPolicy(allow=[parse_rule("203.0.114.7:443")], host_addresses=[public4])
    assert opened.check(Proto.TCP, public4, 443).reason == "operator_allow"
    assert opened.check(Proto.TCP, public4, 22).reason == "host_address"
    moved = policy.with_host_addresses([ip_address("203.0.114.8")])
    assert moved.check(Proto.TCP, public4, 443).allowed
    assert moved.check(Proto.TCP, ip_address("203.0.114.8"), 443).reason == "host_address"


def test_scoped_host_address_still_matches() -> None:
    policy = EgressPolicy(host_addresses=[IPv6Address("2a01:4f8::7%eth0")])
    assert policy.check(Proto.TCP, IPv6Address("2a01:4f8::7"), 443).reason == "host_address"


# --- rule parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network", "ports", "proto"),
    [
        ("198.18.0.0/15", "198.18.0.0/15", None, None),
        ("10.1.2.3:80,443", "10.1.2.3/32", ((80, 80), (443, 443)), None),
        ("192.168.0.0/16:1000-2000", "192.168.0.0/16", ((1000, 2000),), None),
        ("[2001:db8::/32]:443", "2001:db8::/32", ((443, 443),), None),
        ("[2001:db8::1]", "2001:db8::1/128", None, None),
        ("2001:db8::1", "2001:db8::1/128", None, None),
        ("2001:db8::/32", "2001:db8::/32", None, None),
        ("tcp/0.0.0.0/0:25", "0.0.0.0/0", ((25, 25),), Proto.TCP),
        ("UDP/[::/0]:53", "::/0", ((53, 53),), Proto.UDP),
        ("icmp/8.8.8.8", "8.8.8.8/32", None, Proto.ICMP),
        ("  10.0.0.0/8 ", "10.0.0.0/8", None, None),
        ("1.2.3.4:443, 80, 81-90, 85", "1.2.3.4/32", ((80, 90), (443, 443)), None),
        ("1.2.3.4:1-65535", "1.2.3.4/32", ((1, 65535),), None),
    ],
)
def test_parse_rule_accepts_the_documented_forms(
    text: str, network: str, ports: tuple[tuple[int, int], ...] | None, proto: Proto | None
) -> None:
    rule = parse_rule(text)
    expected = IPv4Network(network) if "." in network else IPv6Network(network)
    assert rule == Rule(expected, ports, proto)
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    "text",
    [
        "",
        "junk",
        "tcp/",
        "10.0.0.0/33",
        "10.1.2.3/24",  # host bits set: refused, not guessed
        "300.1.2.3",
        "010.1.2.3",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:2000-1000",
        "1.2.3.4:",
        "1.2.3.4:80,",
        "1.2.3.4:http",
        "1.2.3.4:+80",
        "1.2.3.4:8_0",
        "1.2.3.4:-5",
        "1.2.3.4:80-",
        "1.2.3.4:١٢",
        "[10.0.0.1]:80",
        "[2001:db8::1",
        "[2001:db8::1]443",
        "[2001:db8::1]:0",
        "fe80::1%eth0",
        "icmp/8.8.8.8:80",
        "sctp/1.2.3.4",
        "2001:db8::zz",
    ],
)
def test_parse_rule_refuses_bad_text_with_a_one_line_message(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rule(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message


def test_parse_rule_names_the_bad_text() -> None:
    with pytest.raises(ConfigError, match=r"'10\.1\.2\.3/24'.*did you mean 10\.1\.2\.0/24"):
        parse_rule("10.1.2.3/24")
    with pytest.raises(ConfigError, match="65536"):
        parse_rule("1.2.3.4:65536")


def test_rule_validates_itself() -> None:
    with pytest.raises(ConfigError):
        Rule(IPv4Network("1.2.3.4/32"), ((0, 10),))
    with pytest.raises(ConfigError):
        Rule(IPv4Network("1.2.3.4/32"), ((20, 10),))
    with pytest.raises(ConfigError):
        Rule(IPv4Network("1.2.3.4/32"), ())
    with pytest.raises(ConfigError):
        Rule(IPv4Network("1.2.3.4/32"), ((1, 1),), Proto.ICMP)
    rule = Rule(IPv4Network("10.0.0.0/8"), ((80, 80),), Proto.TCP)
    assert rule.matches(Proto.TCP, IPv4Address("10.9.9.9"), 80)
    assert not rule.matches(Proto.TCP, IPv4Address("10.9.9.9"), 81)
    assert not rule.matches(Proto.UDP, IPv4Address("10.9.9.9"), 80)
    assert not rule.matches(Proto.TCP, IPv6Address("::a09:909"), 80)


# --- properties -----------------------------------------------------------------------------

ADDRESSES = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)
)
PORTS = st.none() | st.integers(0, 65535)
RULES = st.sampled_from(
    [parse_rule(t) for t in ("10.0.0.0/8", "tcp/[::/0]:22", "1.0.0.0/8:53,443", "udp/::/1")]
)


@given(
    ADDRESSES,
    PORTS,
    st.sampled_from(Proto),
    st.lists(RULES, max_size=3),
    st.lists(RULES, max_size=3),
    st.lists(ADDRESSES, max_size=3),
)
def test_check_never_raises(
    address: IPv4Address | IPv6Address,
    port: int | None,
    proto: Proto,
    allow: list[Rule],
    deny: list[Rule],
    hosts: list[IPv4Address | IPv6Address],
) -> None:
    decision = EgressPolicy(allow, deny, hosts).check(proto, address, port)
    assert isinstance(decision.reason, str) and len(decision.reason) <= 40


TABLE = [(network, label) for network, label in DEFAULT_DENY]
ROUTED_HOLES = [IPv6Network("::ffff:0:0/96"), IPv6Network("64:ff9b::/96")]


@given(st.sampled_from(TABLE), st.integers(0, 2**128 - 1), PORTS, st.sampled_from(Proto))
def test_every_address_in_a_denied_network_is_denied(
    entry: tuple[IPv4Network | IPv6Network, str], offset: int, port: int | None, proto: Proto
) -> None:
    network, _ = entry
    address = network[offset % network.num_addresses]
    # ::/8 is reserved but holds the mapped and NAT64 forms, where the inner address decides
    assume(not any(address in hole for hole in ROUTED_HOLES))
    assert not POLICY.check(proto, address, port).allowed


@given(st.sampled_from(TABLE))
def test_the_ends_of_every_denied_network_are_denied(
    entry: tuple[IPv4Network | IPv6Network, str],
) -> None:
    network, _ = entry
    for address in (network.network_address, network.broadcast_address):
        if not any(address in hole for hole in ROUTED_HOLES):
            assert not POLICY.check(Proto.UDP, address, 53).allowed


@given(st.integers(0, 2**32 - 1).map(IPv4Address), st.sampled_from(Proto))
def test_embedded_forms_decide_as_their_inner_address(inner: IPv4Address, proto: Proto) -> None:
    port = None if proto is Proto.ICMP else 443
    direct = POLICY.check(proto, inner, port)
    value = int(inner)
    for outer in (
        IPv6Address((0xFFFF << 32) | value),
        IPv6Address(int(IPv6Address("64:ff9b::")) | value),
        IPv6Address(int(IPv6Address("2002::")) | (value << 80)),
    ):
        wrapped = POLICY.check(proto, outer, port)
        assert wrapped.allowed == direct.allowed
        if not direct.allowed:
            assert wrapped.reason == "embedded_v4:" + direct.reason


def test_check_is_fast() -> None:
    policy = EgressPolicy(
        allow=[parse_rule("198.18.0.0/15"), parse_rule("127.0.0.1:8080")],
        deny=[parse_rule("8.8.8.8:53")],
        host_addresses=[ip_address("192.0.2.2"), ip_address("::1")],
    )
    targets = [ip_address(t) for t in ("8.8.8.8", "1.1.1.1", "2620:fe::fe", "64:ff9b::808:808")]
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        for target in targets:
            policy.check(Proto.TCP, target, 443)
    per_check = (time.perf_counter() - start) / (rounds * len(targets))
    assert per_check < 100e-6  # ~5 us measured; generous for a loaded CI machine


@pytest.mark.parametrize("module", ["relay.nat.policy", "relay.nat.limits"])
def test_sans_io_modules_import_no_io(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(','.join(m for m in ('trio', 'socket', 'aioquic') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


# --- host addresses -------------------------------------------------------------------------

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
           |-- 198.51.100.9
              /24 link UNICAST
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
     |-- 127.0.0.1
        /32 host LOCAL
     |-- not-an-address
        /32 host LOCAL
"""

IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
garbage
0000000000000000000000000000zz01 01 80 10 80       lo
"""


def test_fib_trie_parser() -> None:
    assert parse_fib_trie(FIB_TRIE) == {
        IPv4Address("127.0.0.1"),
        IPv4Address("192.0.2.2"),
        IPv4Address("198.51.100.9"),
    }
    assert parse_fib_trie("") == frozenset()


def test_if_inet6_parser() -> None:
    assert parse_if_inet6(IF_INET6) == {
        IPv6Address("fe80::fc:ff:fe00:1"),
        IPv6Address("fd00::2"),
        IPv6Address("::1"),
    }


def _bindable(family: socket.AddressFamily, address: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def test_host_addresses_of_this_machine() -> None:
    found = host_addresses()
    assert isinstance(found, frozenset)
    if _bindable(socket.AF_INET, "127.0.0.1"):
        assert IPv4Address("127.0.0.1") in found
    if socket.has_ipv6 and _bindable(socket.AF_INET6, "::1"):
        assert IPv6Address("::1") in found


def test_host_addresses_never_raises_without_proc(tmp_path: Path) -> None:
    found = host_addresses(tmp_path / "missing")
    assert isinstance(found, frozenset)
    (tmp_path / "fib_trie").write_bytes(b"\xff\xfe garbage")
    (tmp_path / "if_inet6").write_text(IF_INET6)
    found = host_addresses(tmp_path)
    assert IPv6Address("::1") in found
