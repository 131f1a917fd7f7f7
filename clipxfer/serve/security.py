"""Who may reach the server and what it accepts: where it may listen without a token, the token
check (header, cookie, or ``/?token=``), the Host and Origin checks, the body types and size cap,
and the security headers.

No web imports: ``check_host`` runs in the CLI before the ``serve`` extra is checked.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import ClipxferError
from ..runtime.server import is_loopback  # the one check, shared with the bundle server

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
#: Methods that change something (or take an upload): these need a same-site Origin and a body type.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The routes that take an image upload (multipart/form-data); every other body is JSON.
#: tests/test_serve_hardening2.py checks this against the app's routes.
UPLOAD_PATHS = frozenset({"/api/search/image", "/api/classify", "/api/anomaly"})
#: Host names that always mean this machine (loopback IP literals are accepted too).
LOCAL_NAMES = frozenset({"localhost"})


def check_token(token: str | None) -> None:
    """Refuse a token that cannot travel unchanged in a header, a cookie and a URL."""
    if token is None:
        return
    if len(token) < 8:
        raise ClipxferError("--token must be at least 8 characters")
    # HTTP headers carry Latin-1 at best and browsers refuse anything else in fetch(): a token of
    # other characters could never log in, so it is refused here rather than at every request.
    if not all("!" <= c <= "~" for c in token):
        raise ClipxferError("--token must be printable ASCII without spaces (letters, digits, punctuation), "
                            "e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")


def check_host(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token, and a token that cannot be sent."""
    if not is_loopback(host) and not token:
        raise ClipxferError(
            f"--host {host} makes the server reachable from other machines: also give --token SECRET "
            "(or keep the default --host 127.0.0.1)"
        )
    check_token(token)


def security_headers(path: str) -> dict[str, str]:
    """The security headers a response to ``path`` carries (unless it sets them itself)."""
    if path in NO_CSP_PATHS:
        return {key: value for key, value in SECURITY_HEADERS.items() if key != "Content-Security-Policy"}
    return SECURITY_HEADERS


def host_name(host: str) -> str:
    """The name or address of a ``Host`` value or URL authority, port and IPv6 brackets removed, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() and ":" not in name else host


def is_local_name(name: str, allowed: list[str]) -> bool:
    """True for ``localhost``, a loopback address, or a name the server was configured to answer."""
    if name in LOCAL_NAMES or name in {a.lower() for a in allowed}:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # never resolved here: a name resolving to this machine is what DNS rebinding fakes


def host_refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """Without a token the server answers only requests addressed to this machine, so a web page
    whose name an attacker re-points at 127.0.0.1 (DNS rebinding) gets nothing. With a token the
    name does not matter: such a page never holds the token."""
    if config.token:
        return None
    host = request.headers.get("host", "")
    if is_local_name(host_name(host), config.allowed_hosts):
        return None
    return 400, (f"Host '{host}' is not this server: open it as http://127.0.0.1 or http://localhost, "
                 "or start clipxfer serve with --allow-host NAME")


def origin_refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """A browser sends ``Origin`` with every cross-site POST or PUT, including the "simple" ones
    that need no CORS preflight: refuse those from another site (``Origin: null`` included).
    Clients that send no Origin (curl, scripts) are not browsers riding on a user's session."""
    origin = request.headers.get("origin")
    if request.method not in UNSAFE_METHODS or origin is None:
        return None
    authority = urlsplit(origin).netloc.lower() if origin != "null" else ""
    if authority and (authority == request.headers.get("host", "").lower()
                      or host_name(authority) in {a.lower() for a in config.allowed_hosts}):
        return None
    return 403, f"cross-site request refused: Origin '{origin}' is not this server"


def body_type_refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """415 for a body that is not what the route reads: JSON, or multipart/form-data on upload
    routes. An HTML form can send neither across sites without Origin, nor JSON at all."""
    if request.method not in UNSAFE_METHODS:
        return None
    headers = request.headers
    content_type = headers.get("content-type")
    if content_type is None and "transfer-encoding" not in headers and headers.get("content-length", "0") == "0":
        return None  # no body at all (POST /api/labels/undo)
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if request.url.path in UPLOAD_PATHS:
        if media_type != "multipart/form-data":
            return 415, "send the image as multipart/form-data (a form field named 'file')"
    elif media_type != "application/json":
        return 415, "send a JSON body (Content-Type: application/json)"
    return None


def size_refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """413 for a declared ``Content-Length`` over the cap (a body without one is counted as it
    arrives, in :class:`~.middleware.GuardMiddleware`)."""
    length = request.headers.get("content-length")
    if length is None:
        return None
    try:
        too_big = int(length) > body_limit(config)
    except ValueError:
        return 400, "bad Content-Length"
    return (413, too_large_detail(config)) if too_big else None


def body_limit(config: ServeConfig) -> int:
    """The most bytes a request body may hold: the upload cap plus multipart framing."""
    return config.max_upload_bytes + MULTIPART_FRAMING_BYTES


def too_large_detail(config: ServeConfig) -> str:
    return f"request body is over the {config.max_upload_bytes:,}-byte upload limit"


def token_refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """401 without the token (header, cookie, or ``/?token=`` on the page); ``/api/health`` is open."""
    if not config.token or request.url.path == "/api/health":
        return None
    given = (
        request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        or request.cookies.get(TOKEN_COOKIE, "")
        or (request.query_params.get("token", "") if request.url.path == "/" else "")
    )
    if not hmac.compare_digest(given.encode(), config.token.encode()):
        return 401, "missing or wrong token: open /?token=TOKEN or send 'Authorization: Bearer TOKEN'"
    return None


def refusal(request: Request, config: ServeConfig) -> tuple[int, str] | None:
    """``(status, detail)`` refusing a request (foreign Host, bad token, cross-site Origin, wrong
    body type, body over the upload cap), or None to let it through."""
    for check in (host_refusal, token_refusal, origin_refusal, size_refusal, body_type_refusal):
        refused = check(request, config)
        if refused is not None:
            return refused
    return None
