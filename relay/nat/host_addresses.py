"""The relay host's own addresses, which the egress policy denies to guests.

Read from /proc (no netlink library, no root, no AF_NETLINK in the unit's sandbox): IPv4 from
``/proc/net/fib_trie`` (its ``/32 host LOCAL`` leaves are exactly the local addresses), IPv6
from ``/proc/net/if_inet6``. A family whose file cannot be read falls back to resolving the
host name. Loopback addresses are included; they are denied anyway. A container sees only its
own namespace: the host's public or floating IPs must be configured as deny rules.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

PROC_NET = Path("/proc/net")
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_fib_trie(text: str) -> frozenset[IPv4Address]:
    """The local addresses in a ``/proc/net/fib_trie`` dump; malformed lines are skipped."""
    found: set[IPv4Address] = set()
    leaf: IPv4Address | None = None
    for line in text.splitlines():
        item = line.strip()
        if item.startswith("|--"):
            try:
                leaf = IPv4Address(item[3:].strip())
            except ValueError:
                leaf = None
        elif leaf is not None and item.split() == ["/32", "host", "LOCAL"]:
            found.add(leaf)
    return frozenset(found)


def parse_if_inet6(text: str) -> frozenset[IPv6Address]:
    """The addresses in a ``/proc/net/if_inet6`` dump (32 hex digits first on each line)."""
    found: set[IPv6Address] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32 and all(c in _HEX for c in fields[0]):
            found.add(IPv6Address(int(fields[0], 16)))
    return frozenset(found)


def _resolved(family: socket.AddressFamily) -> set[IPv4Address | IPv6Address]:
    """The host name's addresses of ``family``; empty if it does not resolve."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family)
    except (OSError, UnicodeError, ValueError):
        return set()
    found: set[IPv4Address | IPv6Address] = set()
    for info in infos:
        try:
            found.add(ip_address(str(info[4][0]).partition("%")[0]))
        except ValueError:
            continue
    return found


def host_addresses(proc_net: Path = PROC_NET) -> frozenset[IPv4Address | IPv6Address]:
    """Every address of this host's interfaces, loopback included; never raises."""
    found: set[IPv4Address | IPv6Address] = set()
    try:
        found |= parse_fib_trie((proc_net / "fib_trie").read_text())
    except (OSError, ValueError):
        found |= _resolved(socket.AF_INET)
    try:
        found |= parse_if_inet6((proc_net / "if_inet6").read_text())
    except (OSError, ValueError):
        found |= _resolved(socket.AF_INET6)
    return frozenset(found)
