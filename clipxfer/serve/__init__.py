"""``clipxfer serve``: an HTTP API and a web page to search, classify and label an index.

``create_app(ServeConfig(index=...))`` builds the FastAPI app; :func:`serve` runs it under uvicorn.
The web dependencies are the optional extra ``clipxfer[serve]``, imported only here.
"""

from __future__ import annotations

import ipaddress
import socket

from ..errors import ClipxferError
from ..extras import import_extra


def require_serve_extra() -> None:
    """Import check for fastapi, uvicorn, python-multipart and prometheus-client: one clear line."""
    for module in ("fastapi", "python_multipart", "prometheus_client", "uvicorn"):
        import_extra(module, "serve", "clipxfer serve")


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


def create_app(config):
    """The FastAPI app for a :class:`~clipxfer.serve.app.ServeConfig`."""
    require_serve_extra()
    from .app import create_app as build

    return build(config)


def serve(config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the app for ``config`` under uvicorn until interrupted."""
    check_host(host, config.token)
    app = create_app(config)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def __getattr__(name: str):
    if name == "ServeConfig":
        from .app import ServeConfig

        return ServeConfig
    if name == "suggest":
        from .active import suggest

        return suggest
    raise AttributeError(f"module 'clipxfer.serve' has no attribute {name!r}")
