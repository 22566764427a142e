"""Headless Chromium drives the relay's dashboard page over the Chrome DevTools Protocol.

With one Python client registered, the page (served by the relay's HTTP side) must show the
certificate hash and one peer; its "Test connection" button opens a WebTransport session from
the browser, registers, and shows the assigned address and the median heartbeat RTT; while that
session is up the page lists two peers, and once it is closed, one again. A screenshot is kept
under ``test-artifacts/`` (gitignored) and ``tmp_path``.
"""

from __future__ import annotations

import json
import time
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio
from cdp import CdpError, Page, chromium
from conftest import StartRelay, relay_url, require_tool

from relay import __version__
from relay.client import connect, random_mac
from relay.ops.api import HttpApp
from relay.ops.http import serve_http
from relay.server import Listening

pytestmark = pytest.mark.browser

LAN = IPv4Network("10.0.2.0/24")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

# Records every value #peer-count takes, with the peer tables' text at that moment.
WATCH_PEER_COUNT = """
(() => {
  window.__peerCounts = [];
  const count = document.getElementById("peer-count");
  const record = () => window.__peerCounts.push({
    count: count.textContent, lans: document.getElementById("lans").textContent,
  });
  const watch = {childList: true, characterData: true, subtree: true};
  new MutationObserver(record).observe(count, watch);
  return true;
})()
"""

TEST_FINISHED = """
(() => {
  const state = document.getElementById("test-state").textContent;
  return state.startsWith("done") || state === "failed" ? state : null;
})()
"""


def text_of(element_id: str) -> str:
    return f"document.getElementById({json.dumps(element_id)}).textContent"


async def start_http(nursery: trio.Nursery, listening: Listening) -> int:
    """The relay's HTTP side on an ephemeral 127.0.0.1 port: plain HTTP, as the relay serves
    it with a self-signed certificate (``ssl_context()`` is then None)."""
    relay = listening.relay
    app = HttpApp(relay, relay.certs, started=time.time(), version=__version__)
    bound: list[tuple[str, int]] = await nursery.start(
        partial(serve_http, app, [("127.0.0.1", 0)], ssl_context=relay.certs.ssl_context)
    )
    return bound[0][1]


async def failure_report(page: Page, what: str) -> str:
    """What the page showed, for an assertion message."""
    try:
        shown = await page.evaluate(
            "JSON.stringify(Object.fromEntries(['test-state','test-error','test-ip','rtt-ms',"
            "'rtt-samples','peer-count','poll-state','cert-error'].map(id => "
            "[id, document.getElementById(id).textContent])))"
        )
    except CdpError as exc:
        shown = f"<{exc}>"
    return f"{what}\npage: {shown}\n--- chromium output (tail) ---\n{page.log_tail()}"


async def shown(page: Page, expression: str, what: str, patience: float = 10) -> Any:
    """Wait (bounded) until the page shows what ``expression`` tests; fail with a report."""
    try:
        return await page.wait_for(expression, patience=patience, what=what)
    except CdpError as exc:
        raise AssertionError(await failure_report(page, str(exc))) from None


async def save_screenshot(page: Page, tmp_path: Path) -> bytes:
    """The whole page as PNG, kept under tmp_path and test-artifacts/ (also on failure)."""
    png = await page.screenshot()
    (tmp_path / "dashboard.png").write_bytes(png)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard.png").write_bytes(png)
    return png


async def test_dashboard_shows_peers_and_measures_rtt(
    start_relay: StartRelay, nursery: trio.Nursery, tmp_path: Path
) -> None:
    executable = require_tool("chromium")
    listening = await start_relay()
    quic_host, quic_port = listening.addresses[0]
    assert quic_host == "127.0.0.1"
    http_port = await start_http(nursery, listening)

    client = await connect(nursery, relay_url(listening), cert_hash=listening.identity.hash_hex)
    await client.register(random_mac())
    assert client.assigned is not None and client.mac is not None

    url = f"http://127.0.0.1:{http_port}/?quic_port={quic_port}"
    async with chromium(executable, tmp_path) as browser, browser.new_page() as page:
        png = b""
        try:
            await page.navigate(url)
            await shown(page, f"{text_of('peer-count')} === '1'", "one peer")
            await shown(
                page,
                f"{text_of('cert-hashes')}.includes({json.dumps(listening.identity.hash_hex)})",
                "the certificate hash",
            )
            await shown(page, f"{text_of('poll-state')}.startsWith('updated')", "a status poll")

            await page.evaluate(WATCH_PEER_COUNT)
            await page.click("#test-connection")
            state = await shown(page, TEST_FINISHED, "the connection test's end", patience=30)
            report = await failure_report(page, f"test state {state!r}")
            assert state.startswith("done"), report
            assert await page.evaluate(text_of("test-error")) == "", report

            rtt = float(await page.evaluate(text_of("rtt-ms")))
            assert 0 < rtt < 1000, report
            samples = [float(s) for s in (await page.evaluate(text_of("rtt-samples"))).split(",")]
            assert len(samples) == 5, report
            assert min(samples) <= rtt <= max(samples), report
            test_ip = IPv4Address(await page.evaluate(text_of("test-ip")))
            assert test_ip in LAN, report
            assert test_ip != client.assigned.ip, report

            # While the browser's session was up, /status (as the page showed it) listed it
            # as a second peer, with its MAC and the address it was given.
            test_mac = await page.evaluate(
                "JSON.parse(localStorage.getItem('relay-dashboard-test-mac'))"
                ".map(b => b.toString(16).padStart(2, '0')).join(':')"
            )
            seen = await page.evaluate("window.__peerCounts")
            assert any(
                s["count"] == "2" and test_mac in s["lans"] and str(test_ip) in s["lans"]
                for s in seen
            ), (seen, report)

            # The session was closed cleanly: the relay dropped its port, the page shows one
            # peer again.
            await shown(page, f"{text_of('peer-count')} === '1'", "one peer after the test")
            ports = [p for n in listening.relay.lans.networks.values() for p in n.ports.values()]
            assert [p.mac for p in ports] == [client.mac], report
        finally:
            with trio.CancelScope(shield=True):
                png = await save_screenshot(page, tmp_path)

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    await client.aclose()
