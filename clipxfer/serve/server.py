"""Running the app: the ``serve`` extra check, :func:`create_app` (which imports the web
dependencies only after that check) and :func:`serve` under uvicorn."""

from __future__ import annotations

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


def serve(config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the app for ``config`` under uvicorn until interrupted."""
    check_host(host, config.token)
    app = create_app(config)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
