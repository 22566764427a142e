"""Control messages (datagram type 0x00): compact JSON exactly as the BAVY clients expect.

The clients do not parse JSON: they search for the substrings ``"type":"Assigned"`` and
``"ip":[``. So the encoder must emit compact separators, ``type`` first and fields in the
Rust relay's declaration order. The decoder is lenient the way serde is: key order does
not matter and extra keys are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from relay.errors import BadDatagram

MAX_CONTROL_SIZE = 4096
"""Control datagrams are 20-110 bytes; anything much larger is junk."""


def format_mac(mac: bytes) -> str:
    """``52:54:ab:cd:ef:01`` — for logs and status output."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """``52:54:ab:cd:ef:01`` (or with dashes) → 6 bytes; ValueError if it is not one."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


@dataclass(frozen=True, slots=True)
class Register:
    """client → relay: register this MAC on the LAN."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class Assigned:
    """relay → client: the address the relay gives the registered MAC."""

    ip: IPv4Address
    gateway: IPv4Address
    netmask: IPv4Address
    dns: IPv4Address


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """client → relay: liveness, every 15 s."""


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """relay → client: answer to a Heartbeat (clients ignore it)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """client → relay: leave; the relay closes the session."""


@dataclass(frozen=True, slots=True)
class Error:
    """relay → client: a fatal condition, e.g. ``IP pool exhausted``; the session closes."""

    message: str


@dataclass(frozen=True, slots=True)
class PeerList:
    """relay → client: defined by the protocol, never sent by any relay so far."""

    peers: tuple[tuple[IPv4Address, bytes], ...]


ControlMessage = Register | Assigned | Heartbeat | HeartbeatAck | Disconnect | Error | PeerList


def _ip(addr: IPv4Address) -> list[int]:
    return list(addr.packed)


def control_to_json(msg: ControlMessage) -> str:
    """Compact JSON with ``type`` first and fields in the BAVY relay's order."""
    obj: dict[str, Any]
    match msg:
        case Register(mac=mac):
            obj = {"type": "Register", "mac": list(mac)}
        case Assigned(ip=ip, gateway=gw, netmask=mask, dns=dns):
            obj = {
                "type": "Assigned",
                "ip": _ip(ip),
                "gateway": _ip(gw),
                "netmask": _ip(mask),
                "dns": _ip(dns),
            }
        case Heartbeat():
            obj = {"type": "Heartbeat"}
        case HeartbeatAck():
            obj = {"type": "HeartbeatAck"}
        case Disconnect():
            obj = {"type": "Disconnect"}
        case Error(message=message):
            obj = {"type": "Error", "message": message}
        case PeerList(peers=peers):
            obj = {
                "type": "PeerList",
                "peers": [{"ip": _ip(ip), "mac": list(mac)} for ip, mac in peers],
            }
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _octets_untrusted(value: object, count: int, field: str) -> bytes:
    if (
        not isinstance(value, list)
        or len(value) != count
        or not all(type(v) is int and 0 <= v <= 255 for v in value)
    ):
        raise BadDatagram(
            f"{field} must be an array of {count} integers 0-255", reason="bad_control"
        )
    return bytes(value)


def decode_control_untrusted(text: bytes) -> ControlMessage:
    """Parse the JSON body of a 0x00 datagram. Raises only :class:`BadDatagram`."""
    if len(text) > MAX_CONTROL_SIZE:
        raise BadDatagram("control message too large", reason="bad_control")
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadDatagram(f"control message is not JSON: {exc}", reason="bad_control") from None
    if not isinstance(obj, dict):
        raise BadDatagram("control message is not a JSON object", reason="bad_control")
    kind = obj.get("type")
    if kind == "Register":
        return Register(mac=_octets_untrusted(obj.get("mac"), 6, "mac"))
    if kind == "Heartbeat":
        return Heartbeat()
    if kind == "Disconnect":
        return Disconnect()
    if kind == "HeartbeatAck":
        return HeartbeatAck()
    if kind == "Assigned":
        ip, gw, mask, dns = (
            IPv4Address(_octets_untrusted(obj.get(k), 4, k))
            for k in ("ip", "gateway", "netmask", "dns")
        )
        return Assigned(ip=ip, gateway=gw, netmask=mask, dns=dns)
    if kind == "Error":
        message = obj.get("message")
        if not isinstance(message, str):
            raise BadDatagram("Error.message must be a string", reason="bad_control")
        return Error(message=message)
    if kind == "PeerList":
        peers = obj.get("peers")
        if not isinstance(peers, list):
            raise BadDatagram("PeerList.peers must be an array", reason="bad_control")
        parsed: list[tuple[IPv4Address, bytes]] = []
        for peer in peers:
            if not isinstance(peer, dict):
                raise BadDatagram("PeerList entry must be an object", reason="bad_control")
            parsed.append(
                (
                    IPv4Address(_octets_untrusted(peer.get("ip"), 4, "ip")),
                    _octets_untrusted(peer.get("mac"), 6, "mac"),
                )
            )
        return PeerList(peers=tuple(parsed))
    raise BadDatagram(f"unknown control type {str(kind)[:40]!r}", reason="unknown_control")
