"""Real headless browsers (Chromium, Firefox) use the relay over WebTransport.

The page (``tests/browser/page.js``) opens two sessions on one LAN (``/lan/<name>``),
registers a MAC on each and, with IPv4 and ARP frames it builds in JS from each session's own
MAC and assigned address, sends a UDP broadcast and a chunked 1400-byte UDP frame from A to B,
resolves the gateway with ARP from A and pings it from B, sends a Heartbeat from B, and POSTs
what it saw. The test checks the page's report, the checksums of the frames the page built, and
the relay's own counters (port security dropped nothing).
"""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import dpkt
import pytest
import trio
from browser.harness import BROWSERS, run_page
from conftest import StartRelay, require_tool

pytestmark = pytest.mark.browser

LAN = IPv4Network("10.0.2.0/24")
ASSIGNED_PREFIX = '{"type":"Assigned","ip":[10,0,2,'
MAC_A = "52:54:00:aa:00:01"
MAC_B = "52:54:00:aa:00:02"
GATEWAY_MAC = "52:54:00:12:34:56"
GATEWAY_IP = "10.0.2.2"
PING_ID = 0x1234
PORT_SECURITY_DROPS = (
    "spoofed_source_mac",
    "spoofed_source_ip",
    "arp_spoof",
    "unsupported_ethertype",
)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def check_sent_ipv4(frame_hex: Any, mac: str, ip: IPv4Address, proto: int, report: str) -> None:
    """A frame the page built is IPv4 from its own binding, with a header checksum that an
    independent implementation (dpkt's) accepts, and an ICMP checksum if it is ICMP."""
    frame = bytes.fromhex(str(frame_hex))
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == dpkt.ethernet.ETH_TYPE_IP, report
    assert mac_text(eth.src) == mac, report
    packet = eth.data
    assert isinstance(packet, dpkt.ip.IP), report
    assert IPv4Address(packet.src) == ip, report
    assert packet.p == proto, report
    assert 14 + packet.len == len(frame), report
    assert dpkt.in_cksum(frame[14:34]) == 0, report
    if proto == dpkt.ip.IP_PROTO_ICMP:
        assert dpkt.in_cksum(frame[34:]) == 0, report


@pytest.mark.parametrize("browser", ["chromium", "firefox"])
async def test_browser_sessions_share_a_lan(
    browser: str, start_relay: StartRelay, nursery: trio.Nursery, tmp_path: Path
) -> None:
    executable = require_tool(BROWSERS[browser].tool)
    listening = await start_relay()
    host, port = listening.addresses[0]
    assert host == "127.0.0.1"
    lan = f"browser-{secrets.token_hex(6)}"

    run = await run_page(
        nursery,
        browser,
        executable,
        {"port": str(port), "hash": listening.identity.hash_hex, "path": f"/lan/{lan}"},
        tmp_path,
        patience=45,
    )
    result = run.result
    report = run.report()
    print(report)

    assert result.get("ok") is True, report
    assert result.get("error") is None, report
    ip_a, ip_b = IPv4Address(result["ipA"]), IPv4Address(result["ipB"])
    assert ip_a in LAN, report
    assert ip_b in LAN, report
    assert ip_a != ip_b, report
    assert str(result["assignedText"]).startswith(ASSIGNED_PREFIX), report
    assert str(result["assignedTextB"]).startswith(ASSIGNED_PREFIX), report

    # Between the sessions.
    assert result["broadcastOk"] is True, report
    assert result["bigFrameOk"] is True, report
    assert result["bigFrameDatagramSizes"] == [905, 505], report  # the page chunked it
    assert result["bigFrameViaChunks"] is True, report  # the relay re-chunked it
    assert result["chunksSeenByB"] >= 2, report
    sent = result["sentFrames"]
    check_sent_ipv4(sent["broadcast"], MAC_A, ip_a, dpkt.ip.IP_PROTO_UDP, report)
    check_sent_ipv4(sent["big"], MAC_A, ip_a, dpkt.ip.IP_PROTO_UDP, report)
    assert len(bytes.fromhex(sent["big"])) == 1400, report

    # ARP with the gateway: A's request, built in JS, and the gateway's reply to A alone.
    arp_request = dpkt.ethernet.Ethernet(bytes.fromhex(sent["arpRequest"]))
    assert isinstance(arp_request.data, dpkt.arp.ARP), report
    assert mac_text(arp_request.data.sha) == MAC_A, report
    assert IPv4Address(arp_request.data.spa) == ip_a, report
    assert IPv4Address(arp_request.data.tpa) == IPv4Address(GATEWAY_IP), report
    assert result["arpOk"] is True, report
    assert result["arpReply"] == {
        "ethDst": MAC_A,
        "ethSrc": GATEWAY_MAC,
        "op": 2,
        "senderMac": GATEWAY_MAC,
        "senderIp": GATEWAY_IP,
        "targetMac": MAC_A,
        "targetIp": str(ip_a),
    }, report
    assert result["gatewayMac"] == GATEWAY_MAC, report

    # ICMP echo from B to the gateway's MAC as ARP gave it; checksums verified both ways.
    check_sent_ipv4(sent["pingRequest"], MAC_B, ip_b, dpkt.ip.IP_PROTO_ICMP, report)
    ping_request = dpkt.ethernet.Ethernet(bytes.fromhex(sent["pingRequest"]))
    assert mac_text(ping_request.dst) == GATEWAY_MAC, report
    assert IPv4Address(ping_request.data.dst) == IPv4Address(GATEWAY_IP), report
    assert result["pingOk"] is True, report
    reply = result["pingReply"]
    assert reply["ethDst"] == MAC_B, report
    assert reply["ethSrc"] == GATEWAY_MAC, report
    assert reply["ipSrc"] == GATEWAY_IP, report
    assert reply["ipDst"] == str(ip_b), report
    assert reply["ipChecksumOk"] is True, report
    assert reply["icmpChecksumOk"] is True, report
    assert (reply["type"], reply["code"], reply["id"]) == (0, 0, PING_ID), report
    assert 1 <= reply["seq"] <= result["pingAttempts"], report
    assert reply["payloadTagged"] is True, report
    assert reply["payloadLength"] == len("RISCV_PING") + 16, report

    assert result["heartbeatAck"] is True, report
    assert result["heartbeatAckText"] == '{"type":"HeartbeatAck"}', report
    assert result["echoesSeenByA"] == 0, report
    assert result["echoesSeenByB"] == 0, report
    assert result["closed"] is True, report

    # The relay's side. Each exchange is retried if a datagram is lost, so every page frame
    # is switched at most once per attempt, plus one gateway answer per ARP/ping it got; the
    # four exchanges that succeeded took at least four page frames and two answers.
    network = listening.relay.lans.networks.get(lan)
    assert network is not None, report
    answered = network.gateway.stats.answered
    assert 1 <= answered["arp"] <= result["arpAttempts"], report
    assert 1 <= answered["icmp_echo"] <= result["pingAttempts"], report
    upper = result["framesSent"] + answered["arp"] + answered["icmp_echo"]
    assert 6 <= network.switch.frames_switched <= upper, report
    drops = network.switch.drops
    assert not any(reason in drops for reason in PORT_SECURITY_DROPS), f"{drops}\n{report}"
    assert not drops, f"{drops}\n{report}"
    assert not network.drops, f"{network.drops}\n{report}"
    assert not network.gateway.stats.drops, f"{network.gateway.stats.drops}\n{report}"
