"""Who may reach the server and what it accepts: where it may listen without a token, the token
check (header, cookie, or ``/?token=``), the request size cap and the security headers.

No web imports: ``check_host`` runs in the CLI before the ``serve`` extra is checked.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import TYPE_CHECKING

from ..errors import ClipxferError

if TYPE_CHECKING:
    from starlette.requests import Request

    from .config import ServeConfig

TOKEN_COOKIE = "clipxfer_token"
#: Room for the multipart framing around an upload of the largest accepted size.
MULTIPART_FRAMING_BYTES = 64 * 1024
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; frame-ancestors 'none'",
}
#: FastAPI's /docs page loads Swagger UI from a CDN with inline script: no CSP there.
NO_CSP_PATHS = ("/docs", "/redoc")


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
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ClipxferError(
            f"--host {host} makes the server reachable from other machines: also give --token SECRET "
            "(or keep the default --host 127.0.0.1)"
        )
    if token is not None and len(token) < 8:
        raise ClipxferError("--token must be at least 8 characters")


def security_headers(path: str) -> dict[str, str]:
    """The security headers a response to ``path`` carries (unless it sets them itself)."""
    if path in NO_CSP_PATHS:
        return {key: value for key, value in SECURITY_HEADERS.items() if key != "Content-Security-Policy"}
    return SECURITY_HEADERS


def refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """``(status, detail)`` refusing a request (bad token, body over the upload cap), or None to
    let it through."""
    if config.token and request.url.path != "/api/health":
        given = (
            request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            or request.cookies.get(TOKEN_COOKIE, "")
            or (request.query_params.get("token", "") if request.url.path == "/" else "")
        )
        if not hmac.compare_digest(given.encode(), config.token.encode()):
            return 401, "missing or wrong token: open /?token=TOKEN or send 'Authorization: Bearer TOKEN'"
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > config.max_upload_bytes + MULTIPART_FRAMING_BYTES
        except ValueError:
            return 400, "bad Content-Length"
        if too_big:
            return 413, f"request body is over the {config.max_upload_bytes:,}-byte upload limit"
    return None
