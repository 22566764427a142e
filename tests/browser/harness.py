"""Drive a real headless browser against the relay and collect what its page reports.

:class:`PageServer` is a minimal HTTP/1.1 server on 127.0.0.1 (ephemeral port) that serves
``page.html`` and ``page.js`` and accepts ``POST /log`` (progress lines) and ``POST /result``
(the page's JSON verdict). :func:`run_page` starts it, launches Chromium or Firefox on the page
in a fresh profile and its own process group, waits (bounded) for the result and kills the
whole group, also on failure.

Network rule: the browsers are confined to loopback. Chromium maps every host name but
``localhost`` and ``127.0.0.1`` to ``~NOTFOUND``; Firefox resolves every name to 127.0.0.1 and
has its update, telemetry, safe-browsing and connectivity services switched off.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio

PAGE_DIR = Path(__file__).resolve().parent
PAGES: dict[str, tuple[str, str]] = {
    "/": ("page.html", "text/html; charset=utf-8"),
    "/page.html": ("page.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 10.0
"""A connection that does not deliver a whole request in this time is dropped."""
KILL_WAIT = 10.0
LOG_TAIL = 4000

JsonObject = dict[str, Any]


class BadRequest(Exception):
    """The peer sent something this server does not understand."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class PageResult:
    """The page POSTed its result."""

    result: JsonObject


@dataclass(frozen=True, slots=True)
class BrowserExited:
    """The browser's first process ended."""

    returncode: int


Event = PageResult | BrowserExited


class PageServer:
    """Serves the test page and hands what it POSTs to the test."""

    def __init__(self) -> None:
        self.port = 0
        self.page_log: list[str] = []
        """``POST /log`` bodies, in arrival order."""
        self.requests: list[str] = []
        """``METHOD path`` of every request, for failure reports."""
        self._events_tx, self.events = trio.open_memory_channel[Event](16)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 and serve until cancelled; ``started`` gets the port."""
        listeners: list[trio.SocketListener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    def notify(self, event: Event) -> None:
        """Queue an event for :func:`run_page` (dropped if nobody is listening)."""
        with suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._events_tx.send_nowait(event)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _read_request(stream)
                if request is None:
                    return
                self.requests.append(f"{request.method} {request.path}")
                status, content_type, body = self._respond(request)
                await stream.send_all(_response(status, content_type, body))
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except BadRequest as exc:
            self.requests.append(f"bad request: {exc}")
            try:
                await stream.send_all(_response(400, "text/plain", str(exc).encode()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _respond(self, request: Request) -> tuple[int, str, bytes]:
        if request.method == "GET" and request.path in PAGES:
            name, content_type = PAGES[request.path]
            return 200, content_type, (PAGE_DIR / name).read_bytes()
        if request.method == "POST" and request.path == "/log":
            self.page_log.append(request.body.decode("utf-8", "replace"))
            return 204, "", b""
        if request.method == "POST" and request.path == "/result":
            try:
                result = json.loads(request.body)
            except ValueError as exc:
                raise BadRequest(f"result is not JSON: {exc}") from None
            if not isinstance(result, dict):
                raise BadRequest("result is not a JSON object")
            self.notify(PageResult(result))
            return 204, "", b""
        return 404, "text/plain", b"not found"


async def _read_request(stream: trio.SocketStream) -> Request | None:
    """One HTTP/1.1 request with an optional Content-Length body; None if the peer sent none."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise BadRequest("request head too large")
        data = await stream.receive_some(65536)
        if not data:
            if buffer:
                raise BadRequest("connection closed inside the request head")
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0]!r}")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise BadRequest("chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest("bad Content-Length") from None
    if not 0 <= length <= MAX_BODY:
        raise BadRequest(f"Content-Length {length} out of range")
    body = bytearray(rest)
    while len(body) < length:
        data = await stream.receive_some(65536)
        if not data:
            raise BadRequest("connection closed inside the request body")
        body += data
    return Request(method, urlsplit(target).path, headers, bytes(body[:length]))


_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found"}


def _response(status: int, content_type: str, body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", "Cache-Control: no-store", "Connection: close"]
    if status != 204:
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


# -- browsers -------------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # Mandatory: no name lookups leave the machine. EXCLUDE 127.0.0.1 too, or MAP * captures
    # the literal address and WebTransport to https://127.0.0.1 fails.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
    "--enable-logging=stderr",
    "--v=0",
)

FIREFOX_PREFS: dict[str, str | int | bool] = {
    # Keep Firefox on loopback.
    "network.dns.forceResolve": "127.0.0.1",
    "network.trr.mode": 5,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.http.speculative-parallel-limit": 0,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.startup.page": 0,
    "browser.startup.homepage_override.mstone": "ignore",
    "startup.homepage_welcome_url": "",
    "startup.homepage_welcome_url.additional": "",
    "browser.newtabpage.enabled": False,
    "browser.aboutwelcome.enabled": False,
    "browser.search.update": False,
    "browser.region.update.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "browser.shell.checkDefaultBrowser": False,
    # Quiet, fast shutdown-free runs.
    "browser.sessionstore.resume_from_crash": False,
    "toolkit.startup.max_resumed_crashes": -1,
    # Page console messages on stdout, for failure reports.
    "devtools.console.stdout.content": True,
}


def _firefox_pref(name: str, value: str | int | bool) -> str:
    return f"user_pref({json.dumps(name)}, {json.dumps(value)});\n"


def chromium_command(executable: str, profile: Path, url: str) -> list[str]:
    return [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url]


def firefox_command(executable: str, profile: Path, url: str) -> list[str]:
    profile.mkdir(parents=True, exist_ok=True)
    prefs = "".join(_firefox_pref(name, value) for name, value in FIREFOX_PREFS.items())
    (profile / "user.js").write_text(prefs)
    return [executable, "--headless", "--no-remote", "--profile", str(profile), url]


@dataclass(frozen=True)
class BrowserKind:
    """How to run one browser."""

    name: str
    tool: str
    """Executable name looked up on PATH."""
    command: Callable[[str, Path, str], list[str]]
    env: Mapping[str, str] = field(default_factory=dict)
    exit_is_fatal: bool = True
    """False if the first process may hand off to a child and exit (Firefox)."""


BROWSERS: dict[str, BrowserKind] = {
    "chromium": BrowserKind("chromium", "chromium", chromium_command),
    "firefox": BrowserKind(
        "firefox",
        "firefox-esr",
        firefox_command,
        env={"MOZ_HEADLESS": "1", "MOZ_CRASHREPORTER_DISABLE": "1"},
        exit_is_fatal=False,
    ),
}


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@asynccontextmanager
async def launched(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path
) -> AsyncIterator[trio.Process]:
    """Run ``argv`` as the leader of a new process group; SIGKILL the group on exit."""
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    try:
        yield process
    finally:
        # The group id is the leader's pid; the group outlives the leader while any member
        # (Firefox's hand-off child, Chromium's helpers) is alive.
        _kill_group(process.pid)
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT):
            await process.wait()


NOISE = ("dbus", "Floss manager", "ScreenSaver", "UPower")
"""Harmless browser log lines (no D-Bus in the test environment), left out of reports."""


def tail(path: Path, limit: int = LOG_TAIL) -> str:
    """The end of a browser's output, without known noise."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        return f"<{exc}>"
    lines = [line for line in text.splitlines() if not any(n in line for n in NOISE)]
    kept = "\n".join(lines)
    return kept if len(kept) <= limit else "…" + kept[-limit:]


@dataclass
class PageRun:
    """What a browser run produced."""

    browser: str
    url: str
    result: JsonObject
    seconds: float
    page_log: list[str]
    requests: list[str]
    browser_log: Path

    def report(self) -> str:
        """Everything useful for a failure message."""
        page_log = self.result.get("log") or self.page_log
        return "\n".join(
            [
                f"{self.browser} on {self.url} after {self.seconds:.1f} s",
                f"error: {self.result.get('error')}",
                *([f"stack: {self.result['stack']}"] if self.result.get("stack") else []),
                "--- page log ---",
                *(str(line) for line in page_log),
                f"--- HTTP requests: {', '.join(self.requests)}",
                f"--- browser output ({self.browser_log}, tail) ---",
                tail(self.browser_log),
            ]
        )


class PageFailed(AssertionError):
    """The browser produced no result."""


async def run_page(
    nursery: trio.Nursery,
    browser: str,
    executable: str,
    query: Mapping[str, str],
    workdir: Path,
    *,
    patience: float = 45.0,
) -> PageRun:
    """Serve the page, open it in ``browser`` and return its result (or raise PageFailed).

    ``nursery`` hosts the page server for the rest of the test; the browser is gone when this
    returns.
    """
    kind = BROWSERS[browser]
    server = PageServer()
    port: int = await nursery.start(server.serve)
    url = f"http://127.0.0.1:{port}/?{urlencode(query)}"
    home = workdir / f"{browser}-home"
    home.mkdir(parents=True)
    argv = kind.command(executable, workdir / f"{browser}-profile", url)
    env = {**os.environ, "HOME": str(home), **kind.env}
    log_path = workdir / f"{browser}.log"
    started = time.monotonic()

    def failed(why: str) -> PageFailed:
        run = PageRun(
            browser, url, {}, time.monotonic() - started, server.page_log, server.requests, log_path
        )
        return PageFailed(f"{why}\n{run.report()}")

    async with launched(argv, env, log_path) as process:
        watch_scope = trio.CancelScope()

        async def watch() -> None:
            with watch_scope:
                server.notify(BrowserExited(await process.wait()))

        nursery.start_soon(watch)
        try:
            with trio.fail_after(patience):
                async for event in server.events:
                    if isinstance(event, PageResult):
                        result = event.result
                        break
                    if kind.exit_is_fatal:
                        raise failed(f"{browser} exited with status {event.returncode}")
                else:
                    raise AssertionError("unreachable: the event channel never closes")
        except trio.TooSlowError:
            raise failed(f"{browser}: the page posted no result within {patience:g} s") from None
        finally:
            watch_scope.cancel()
    return PageRun(
        browser,
        url,
        result,
        time.monotonic() - started,
        server.page_log,
        server.requests,
        log_path,
    )
