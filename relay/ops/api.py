"""The relay's HTTP routes: /cert-hash, /status, /metrics, /healthz, /readyz, the dashboard.

Read-only JSON for web pages on other origins (CORS ``*``: nothing here is a secret, and the
page that connects to the relay must learn the certificate hash before ``new WebTransport``).
Static files are the dashboard's, read once at start-up from a fixed directory: a name not in
that listing is a 404, so no request path can reach another file.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from relay.ops import status as documents
from relay.ops.http import HttpStats, Request, Response, text_response
from relay.ops.metrics import RelayCollector, Totals
from relay.tls import TlsIdentity

if TYPE_CHECKING:
    from relay.server import Relay

log = logging.getLogger("relay.http")

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
MAX_STATIC_FILE = 4 * 1024 * 1024
_STATIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

CORS = (("access-control-allow-origin", "*"),)
PREFLIGHT = (
    *CORS,
    ("access-control-allow-methods", "GET, HEAD, OPTIONS"),
    ("access-control-allow-headers", "*"),
    ("access-control-max-age", "86400"),
)
NO_STORE = (("cache-control", "no-store"),)
JSON_TYPE = "application/json"
HEALTH_TYPE = "application/health+json"


class CertificateSource(Protocol):
    """What the API needs of ``relay.certs.CertificateStore``."""

    @property
    def current(self) -> TlsIdentity: ...

    def published(self) -> list[TlsIdentity]: ...


def load_static(directory: Path) -> dict[str, tuple[bytes, str]]:
    """Name → (content, content type) of the regular files in ``directory`` we can serve."""
    files: dict[str, tuple[bytes, str]] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        log.warning("no dashboard: cannot list %s: %s", directory, exc.strerror)
        return files
    for path in entries:
        content_type = CONTENT_TYPES.get(path.suffix.lower())
        if content_type is None or not _STATIC_NAME.fullmatch(path.name):
            continue
        try:
            if not path.is_file() or path.stat().st_size > MAX_STATIC_FILE:
                continue
            files[path.name] = (path.read_bytes(), content_type)
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror)
    return files


def _json(
    document: Any, status_code: int = 200, content_type: str = JSON_TYPE, cors: bool = True
) -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = (*CORS, *NO_STORE) if cors else NO_STORE
    return Response(status_code, body, content_type, headers)


class HttpApp:
    """Routes requests to the relay's documents; one per running relay."""

    def __init__(
        self,
        relay: Relay,
        store: CertificateSource,
        *,
        started: float,
        version: str,
        totals: Totals | None = None,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self.relay = relay
        self.store = store
        self.started = started
        self.version = version
        self.http_stats = HttpStats()
        self.draining = False
        """Set at shutdown: /readyz answers 503 while sessions drain."""
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.registry.register(
            RelayCollector(
                relay,
                lambda: store.current,
                version=version,
                started=started,
                totals=totals,
                http=self.http_stats,
            )
        )
        self.static = load_static(static_dir)
        self._cors_routes: dict[str, Callable[[], Response]] = {
            "/cert-hash": self.cert_hash,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        self._routes: dict[str, Callable[[Request], Response]] = {
            "/metrics": self.metrics,
            # Same-origin only (no CORS): it lists the VMs' MACs and addresses.
            "/status": lambda _request: self.status(),
            "/": lambda _request: self._static_file("index.html"),
        }

    def handle(self, request: Request) -> Response:
        path = request.path
        cors_route = self._cors_routes.get(path)
        if cors_route is not None:
            if request.method == "OPTIONS":
                return Response(204, headers=PREFLIGHT)
            return cors_route()
        route = self._routes.get(path)
        name = path.removeprefix("/static/")
        if route is None and (name == path or name not in self.static):
            return text_response(404)
        if request.method == "OPTIONS":
            return Response(204, headers=(("allow", "GET, HEAD, OPTIONS"),))
        return self._static_file(name) if route is None else route(request)

    # -- routes -----------------------------------------------------------------------------

    def cert_hash(self) -> Response:
        return _json(documents.cert_hash_document(self.store.published()))

    def status(self) -> Response:
        clocks = documents.Clocks(wall=time.time(), trio=trio.current_time())
        document = documents.relay_status(
            self.relay,
            self.store.current,
            version=self.version,
            started=self.started,
            clocks=clocks,
            http_addresses=self.http_stats.addresses,
        )
        return _json(document, cors=False)

    def healthz(self) -> Response:
        # Answering at all proves the event loop runs: that is what liveness means here.
        return _json({"status": "pass"}, content_type=HEALTH_TYPE)

    def readyz(self) -> Response:
        now = datetime.datetime.now(datetime.UTC)
        ready, document = documents.readiness(
            self.relay, self.store.current, now, draining=self.draining
        )
        return _json(document, 200 if ready else 503, content_type=HEALTH_TYPE)

    def metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.header("accept") or "")
        return Response(200, encoder(self.registry), content_type, NO_STORE)

    def _static_file(self, name: str) -> Response:
        found = self.static.get(name)
        if found is None:
            return text_response(404, "no dashboard installed")
        content, content_type = found
        return Response(200, content, content_type, (("cache-control", "no-cache"),))
