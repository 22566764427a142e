"""Real headless browsers (Chromium, Firefox) use the relay over WebTransport.

The page (``tests/browser/page.js``) opens two sessions on one LAN path, registers a MAC on
each, sends a broadcast frame and a chunked 1400-byte frame from A to B and a Heartbeat from B,
and POSTs what it saw. The test checks the page's report and the relay's own counters.
"""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import trio
from browser.harness import BROWSERS, run_page
from conftest import StartRelay, require_tool

pytestmark = pytest.mark.browser

LAN = IPv4Network("10.0.2.0/24")
ASSIGNED_PREFIX = '{"type":"Assigned","ip":[10,0,2,'


@pytest.mark.parametrize("browser", ["chromium", "firefox"])
async def test_browser_sessions_share_a_lan(
    browser: str, start_relay: StartRelay, nursery: trio.Nursery, tmp_path: Path
) -> None:
    executable = require_tool(BROWSERS[browser].tool)
    listening = await start_relay()
    host, port = listening.addresses[0]
    assert host == "127.0.0.1"
    path = f"/browser-{secrets.token_hex(6)}"

    run = await run_page(
        nursery,
        browser,
        executable,
        {"port": str(port), "hash": listening.identity.hash_hex, "path": path},
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
    assert result["broadcastOk"] is True, report
    assert result["bigFrameOk"] is True, report
    assert result["bigFrameDatagramSizes"] == [905, 505], report  # the page chunked it
    assert result["bigFrameViaChunks"] is True, report  # the relay re-chunked it
    assert result["chunksSeenByB"] >= 2, report
    assert result["heartbeatAck"] is True, report
    assert result["heartbeatAckText"] == '{"type":"HeartbeatAck"}', report
    assert result["echoesSeenByA"] == 0, report
    assert result["closed"] is True, report

    # The relay's side: one LAN for the path, which forwarded A's frames (each exchange is
    # retried if a datagram is lost, so at most one forward per attempt), dropping none.
    hub = listening.relay.lans.hubs.get(path)
    assert hub is not None, report
    assert 2 <= hub.frames_forwarded <= result["framesSent"], report
    assert not hub.drops, report
