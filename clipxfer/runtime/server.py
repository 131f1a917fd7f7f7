"""``clipxfer-run serve DIR``: one bundle behind ``POST /predict``, on the standard library alone.

The image is the request body (``curl --data-binary @part.png``); the answer is one JSON object.
The same defaults as ``clipxfer serve``: loopback only unless a token is set (then every request
needs ``Authorization: Bearer TOKEN``), a cap on the upload size, no-sniff headers, and every error
a one-line JSON ``{"error": ...}`` with its status, never a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import ClipxferError
from .bundle import Bundle

DEFAULT_MAX_UPLOAD_MB = 20.0
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "X-Frame-Options": "DENY"}


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except socket.gaierror:
            raise ClipxferError(f"--host {host}: not an address or a name this machine can resolve") from None
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_host(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (at least 8 characters)."""
    if not is_loopback(host) and not token:
        raise ClipxferError(f"--host {host} makes the server reachable from other machines: also give --token "
                            "SECRET (or keep the default --host 127.0.0.1)")
    if token is not None and len(token) < 8:
        raise ClipxferError("--token must be at least 8 characters")


def make_server(bundle: Bundle, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> ThreadingHTTPServer:
    """A server for ``bundle`` bound to ``host:port`` (port 0: a free one), not yet serving."""
    check_host(host, token)
    if max_upload_mb <= 0:
        raise ClipxferError("--max-upload-mb must be positive")
    cap = int(max_upload_mb * 1024 * 1024)

    class Handler(BaseHTTPRequestHandler):
        server_version = "clipxfer-run"
        sys_version = ""

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _allowed(self) -> bool:
            if token is None:
                return True
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if hmac.compare_digest(given.encode(), token.encode()):
                return True
            self._send(401, {"error": "missing or wrong token: send 'Authorization: Bearer TOKEN'"})
            return False

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._allowed():
                return
            if self.path.split("?")[0] == "/health":
                self._send(200, {"status": "ok", **bundle.describe()})
            else:
                self._send(404, {"error": f"no such page {self.path.split('?')[0]!r}: use POST /predict or GET /health"})

        def do_POST(self):  # noqa: N802
            if not self._allowed():
                return
            if self.path.split("?")[0] != "/predict":
                self._send(404, {"error": f"no such endpoint {self.path.split('?')[0]!r}: POST the image to /predict"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._send(411, {"error": "send the image as the request body with a Content-Length"})
                return
            if int(length) > cap:
                self.close_connection = True  # the body is not read: the connection cannot be reused
                self._send(413, {"error": f"upload of {int(length)} bytes is over the {max_upload_mb:g} MB cap "
                                          "(--max-upload-mb)"})  # fmt: skip
                return
            data = self.rfile.read(int(length))
            started = time.perf_counter()
            try:
                answer = bundle.predict([data])
            except ClipxferError as exc:
                self._send(400, {"error": str(exc)})
                return
            except Exception as exc:  # never a traceback to the client; one line on the server's stderr
                print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
                self._send(500, {"error": "the bundle failed on this image; see the server log"})
                return
            row = answer.rows()[0]
            if bundle.kind == "classifier":
                row["probabilities"] = {name: round(float(p), 6) for name, p in zip(bundle.classes, answer.probs[0])}
            row["latency_ms"] = round(1000 * (time.perf_counter() - started), 2)
            self._send(200, row)

        def log_message(self, format, *args):  # one short line per request on stderr
            print(f"{self.address_string()} {format % args}", file=sys.stderr)

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ClipxferError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None
