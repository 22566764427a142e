"""An HTTP server for the "internet" namespace of the NAT tests (standard library only).

``GET /<name>`` sends a file from the served directory; ``PUT /upload`` reads the body and
answers ``<sha256 hex> <byte count>``, so an upload is checked on the server's side.
Run: ``python3 nat_http_server.py ADDRESS PORT DIRECTORY``; it prints ``ready`` when bound.
"""

from __future__ import annotations

import hashlib
import http.server
import sys
from functools import partial


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        digest, seen = hashlib.sha256(), 0
        while seen < length:
            chunk = self.rfile.read(min(1 << 16, length - seen))
            if not chunk:
                break
            digest.update(chunk)
            seen += len(chunk)
        body = f"{digest.hexdigest()} {seen}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    address, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    handler = partial(Handler, directory=directory)
    server = http.server.ThreadingHTTPServer((address, port), handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
