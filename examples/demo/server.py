"""A tiny HTTP service for the demo and the tests: /health and a version page.

Usage: server.py PORT [NAME]. It answers GET /health with 200, or 503 while the
file named by $UNHEALTHY_FILE exists, and GET / with the contents of VERSION
from its working directory.
"""

from __future__ import annotations

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the name http.server calls
        if self.path == "/health":
            sick = os.environ.get("UNHEALTHY_FILE")
            status = 503 if sick and Path(sick).exists() else 200
            body = b"ok\n" if status == 200 else b"unhealthy\n"
        else:
            status = 200
            version = Path("VERSION")
            body = version.read_bytes() if version.exists() else b"unversioned\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}")


def main() -> None:
    port = int(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else "demo"
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"{name} listening on 127.0.0.1:{port}", flush=True)
    sys.stdout.reconfigure(line_buffering=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
