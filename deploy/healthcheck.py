"""Container health check: exit 0 when the relay's ``/healthz`` answers 200, else 1.

The HTTP side is plain HTTP with a self-signed certificate and HTTPS with a CA-signed one, so
both are tried (the name is ``localhost``, not the certificate's, hence no verification). Port:
``$RELAY_HTTP_PORT``, else ``$RELAY_PORT``, else 4433. Standard library only.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def healthy(url: str) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            return bool(response.status == 200)
    except (OSError, ValueError, urllib.error.URLError):
        return False


def main() -> int:
    port = os.environ.get("RELAY_HTTP_PORT") or os.environ.get("RELAY_PORT") or "4433"
    for scheme in ("http", "https"):
        if healthy(f"{scheme}://localhost:{port}/healthz"):
            return 0
    print(f"relay: /healthz on port {port} did not answer 200", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
