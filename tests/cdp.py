"""A small Chrome DevTools Protocol client: headless Chromium, one page, driven from trio.

Only what a page test needs: ``Runtime.evaluate`` (awaiting promises), polling an expression
until it holds, ``Page.navigate``, a mouse click (``Input.dispatchMouseEvent``) and
``Page.captureScreenshot``. Chromium runs with
``browser/harness.py``'s flags (host names resolve only to loopback), a fresh profile,
``--remote-debugging-port=0`` (the port it picks is read from the ``DevToolsActivePort`` file
it writes into the profile) and in its own process group, which is killed on exit.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from browser.harness import CHROMIUM_FLAGS, launched, tail
from trio_websocket import WebSocketConnection, open_websocket_url

STARTUP_TIMEOUT = 20.0
"""Seconds for Chromium to open its DevTools port."""
CALL_TIMEOUT = 30.0
MAX_MESSAGE = 64 * 1024 * 1024
"""Screenshots arrive base64-encoded in one message."""
WINDOW_SIZE = (1280, 1100)
POLL_INTERVAL = 0.05

JsonObject = dict[str, Any]


class CdpError(AssertionError):
    """The browser refused a command, a script threw, or a wait ran out."""


class Page:
    """One page target's DevTools websocket. Commands are sent one at a time."""

    def __init__(self, ws: WebSocketConnection, browser: Chromium) -> None:
        self._ws = ws
        self._browser = browser
        self._next_id = 0
        self._lock = trio.Lock()

    async def call(self, method: str, params: JsonObject | None = None) -> JsonObject:
        """Send one command and return its result; events that arrive meanwhile are dropped."""
        async with self._lock:
            self._next_id += 1
            call_id = self._next_id
            await self._ws.send_message(
                json.dumps({"id": call_id, "method": method, "params": params or {}})
            )
            with trio.fail_after(CALL_TIMEOUT):
                while True:
                    message = json.loads(await self._ws.get_message())
                    if message.get("id") == call_id:
                        break
        if "error" in message:
            raise CdpError(f"{method}: {message['error']}")
        result: JsonObject = message.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` (a promise is awaited); a throw raises CdpError."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        details = result.get("exceptionDetails")
        if details is not None:
            thrown = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression!r} threw: {thrown}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, patience: float, what: str = "") -> Any:
        """Evaluate ``expression`` until its value is truthy and return that value.

        Polling is the only way to watch a page's DOM from outside; it gives up, raising
        CdpError, after ``patience`` seconds.
        """
        last: Any = None
        try:
            with trio.fail_after(patience):
                while True:
                    last = await self.evaluate(expression)
                    if last:
                        return last
                    await trio.sleep(POLL_INTERVAL)
        except trio.TooSlowError:
            raise CdpError(
                f"{what or expression} did not hold within {patience:g} s (last value {last!r})"
            ) from None

    async def navigate(self, url: str, *, patience: float = 15.0) -> None:
        """Load ``url`` and wait until its document has loaded."""
        result = await self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            patience=patience,
            what=f"loading {url}",
        )

    async def click(self, selector: str) -> None:
        """Click the middle of the element ``selector`` matches, as a user's mouse would
        (so a hidden, covered or disabled button is not clicked)."""
        box = await self.evaluate(
            f"""(() => {{
              const node = document.querySelector({json.dumps(selector)});
              if (node === null) return null;
              node.scrollIntoView({{block: "center"}});
              const r = node.getBoundingClientRect();
              return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()"""
        )
        if box is None:
            raise CdpError(f"no element matches {selector!r}")
        for event in ("mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent",
                {"type": event, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def screenshot(self) -> bytes:
        """A PNG of the whole page, not just the viewport."""
        result = await self.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        return base64.b64decode(result["data"])

    def log_tail(self) -> str:
        """The end of the browser's output, for failure messages."""
        return self._browser.log_tail()


@dataclass(frozen=True, slots=True)
class Chromium:
    """A running headless Chromium with its DevTools endpoint."""

    port: int
    browser_path: str
    """The browser-wide websocket path, from DevToolsActivePort."""
    log_path: Path

    def log_tail(self) -> str:
        return tail(self.log_path)

    @asynccontextmanager
    async def new_page(self) -> AsyncIterator[Page]:
        """A fresh page target (about:blank), connected through its own websocket."""
        browser_url = f"ws://127.0.0.1:{self.port}{self.browser_path}"
        async with open_websocket_url(browser_url, max_message_size=MAX_MESSAGE) as ws:
            await ws.send_message(
                json.dumps(
                    {"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}
                )
            )
            with trio.fail_after(CALL_TIMEOUT):
                while True:
                    message = json.loads(await ws.get_message())
                    if message.get("id") == 1:
                        break
        if "error" in message:
            raise CdpError(f"Target.createTarget: {message['error']}")
        target_id = message["result"]["targetId"]
        page_url = f"ws://127.0.0.1:{self.port}/devtools/page/{target_id}"
        async with open_websocket_url(page_url, max_message_size=MAX_MESSAGE) as ws:
            yield Page(ws, self)


async def _devtools_endpoint(
    profile: Path, process: trio.Process, log_path: Path
) -> tuple[int, str]:
    """Port and browser websocket path from ``DevToolsActivePort`` (Chromium writes it once
    the port is open; there is no event to wait on, so the file is polled, bounded)."""
    port_file = profile / "DevToolsActivePort"
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                if process.poll() is not None:
                    raise CdpError(
                        f"chromium exited with status {process.returncode}\n{tail(log_path)}"
                    )
                try:
                    lines = port_file.read_text().splitlines()
                except FileNotFoundError:
                    lines = []
                if len(lines) >= 2 and lines[0].isdigit():
                    return int(lines[0]), lines[1]
                await trio.sleep(POLL_INTERVAL)
    except trio.TooSlowError:
        raise CdpError(
            f"chromium wrote no DevToolsActivePort within {STARTUP_TIMEOUT:g} s\n{tail(log_path)}"
        ) from None


def chromium_argv(executable: str, profile: Path) -> list[str]:
    """harness.py's Chromium flags plus a DevTools port of Chromium's choosing."""
    width, height = WINDOW_SIZE
    return [
        executable,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "about:blank",
    ]


@asynccontextmanager
async def chromium(executable: str, workdir: Path) -> AsyncIterator[Chromium]:
    """Run headless Chromium with a fresh profile under ``workdir`` until the block ends."""
    profile = workdir / "chromium-profile"
    home = workdir / "chromium-home"
    home.mkdir(parents=True)
    log_path = workdir / "chromium.log"
    env = {**os.environ, "HOME": str(home)}
    async with launched(chromium_argv(executable, profile), env, log_path) as process:
        port, browser_path = await _devtools_endpoint(profile, process, log_path)
        yield Chromium(port, browser_path, log_path)
