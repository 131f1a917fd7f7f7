"""Running the app: the ``serve`` extra check, :func:`create_app` (which imports the web
dependencies only after that check) and :func:`serve` under uvicorn."""

from __future__ import annotations

from dataclasses import replace

from ..errors import ClipxferError
from ..extras import import_extra
from .security import check_host


def require_serve_extra() -> None:
    """Import check for fastapi, uvicorn, python-multipart and prometheus-client: one clear line."""
    for module in ("fastapi", "python_multipart", "prometheus_client", "uvicorn"):
        import_extra(module, "serve", "clipxfer serve")


def create_app(config):
    """The FastAPI app for a :class:`~clipxfer.serve.config.ServeConfig`."""
    require_serve_extra()
    from .app import create_app as build

    return build(config)


def check_port(port: int) -> None:
    """Refuse a TCP port outside 1..65535 (before the index is loaded, not from the socket)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ClipxferError(f"--port {port}: give a TCP port between 1 and 65535")


def serve(config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the app for ``config`` under uvicorn until interrupted."""
    check_host(host, config.token)
    check_port(port)
    # Requests addressed to the name it listens on are this server's too (--host myname).
    app = create_app(replace(config, allowed_hosts=[*config.allowed_hosts, host]))
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
