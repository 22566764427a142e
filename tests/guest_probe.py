"""Hand-made packets from inside a VM namespace, and what the relay answers to each.

A Linux guest will not route 127.0.0.1 out of its interface, and its stack hides the ICMP
error behind a socket error; this sends IPv4 packets straight onto the TAP device (AF_PACKET,
to the gateway's MAC), from the VM's own MAC and address so port security lets them through,
and reads the answer off the same device. Prints one word per probe:

  synack | rst | admin_prohibited | host_unreachable | port_unreachable | udp_reply |
  echo_reply | timeout

Run in the namespace: ``python guest_probe.py DEV VM_IP {tcp,udp,icmp} DST PORT [COUNT]``
(COUNT probes from consecutive source ports or echo ids).
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time

from relay.nat.tcp_segment import ACK, RST, SYN, Segment, build_segment, parse_segment
from relay.packets import build
from relay.packets.headers import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP

GATEWAY_MAC = bytes.fromhex("525400123456")
ETH_P_IP = 0x0800
WAIT = 3.0


def probe_packet(proto: str, src: bytes, dst: bytes, port: int, n: int) -> bytes:
    sport = 40000 + n
    if proto == "tcp":
        segment = Segment(sport, port, 1000, 0, SYN, 64240, mss=896)
        return build.ipv4(src, dst, IPPROTO_TCP, build_segment(src, dst, segment))
    if proto == "udp":
        return build.ipv4(src, dst, IPPROTO_UDP, build.udp(src, dst, sport, port, b"probe"))
    rest = struct.pack("!HH", 0x4000 + n, 1)
    return build.ipv4(src, dst, IPPROTO_ICMP, build.icmp(8, 0, rest, b"probe"))


def classify(packet: bytes, proto: str, dst: bytes, n: int) -> str | None:
    """The answer ``packet`` is to probe ``n``, or None if it is something else."""
    header_len = (packet[0] & 0x0F) * 4
    body = packet[header_len:]
    if packet[9] == IPPROTO_ICMP and len(body) >= 8:
        kind, code = body[0], body[1]
        if kind == 3 and len(body) >= 8 + 20 + 4:
            quoted = body[8:]
            qlen = (quoted[0] & 0x0F) * 4
            if quoted[16:20] != dst:
                return None
            if proto in ("tcp", "udp") and struct.unpack("!H", quoted[qlen : qlen + 2])[0] != (
                40000 + n
            ):
                return None
            return {13: "admin_prohibited", 1: "host_unreachable", 3: "port_unreachable"}.get(
                code, f"unreachable_{code}"
            )
        if kind == 0 and proto == "icmp" and struct.unpack("!H", body[4:6])[0] == 0x4000 + n:
            return "echo_reply"
        return None
    if packet[12:16] != dst:
        return None
    if packet[9] == IPPROTO_TCP and proto == "tcp":
        segment = parse_segment(packet[12:16], packet[16:20], body)
        if segment.dport != 40000 + n:
            return None
        if segment.flags & RST:
            return "rst"
        if segment.flags & SYN and segment.flags & ACK:
            return "synack"
    if (
        packet[9] == IPPROTO_UDP
        and proto == "udp"
        and struct.unpack("!H", body[2:4])[0] == (40000 + n)
    ):
        return "udp_reply"
    return None


def main() -> None:
    dev, vm_ip, proto, dst_text, port = sys.argv[1:6]
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    src, dst = socket.inet_aton(vm_ip), socket.inet_aton(dst_text)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((dev, 0))
    mac = sock.getsockname()[4]
    for n in range(count):
        packet = probe_packet(proto, src, dst, int(port), n)
        sock.send(build.ethernet(GATEWAY_MAC, mac, ETH_P_IP, packet))
        answer, deadline = "timeout", time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            frame = sock.recv(65536)
            if frame[6:12] != GATEWAY_MAC or len(frame) < 34:
                continue
            found = classify(frame[14:], proto, dst, n)
            if found is not None:
                answer = found
                break
        print(answer, flush=True)


if __name__ == "__main__":
    main()
