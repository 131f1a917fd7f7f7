"""Running the app: the ``serve`` extra check, :func:`create_app` (which imports the web
dependencies only after that check) and :func:`serve` under uvicorn, in one process or several
(``workers``): each worker loads the index itself from the config handed down in the environment."""

from __future__ import annotations

import os
from dataclasses import replace

from ..errors import ClipxferError
from ..extras import import_extra
from .security import check_host

#: The environment variable through which ``--workers`` processes receive the config.
CONFIG_ENV = "CLIPXFER_SERVE_CONFIG"


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


def create_app_from_environment():
    """The app for the config in ``$CLIPXFER_SERVE_CONFIG`` (uvicorn's factory for ``--workers``)."""
    from .config import ServeConfig

    return create_app(ServeConfig.from_json(os.environ[CONFIG_ENV]))


def check_workers(workers: int) -> None:
    """Refuse a worker count below 1."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ClipxferError(f"--workers {workers}: give 1 or more worker processes")


def serve(config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", workers: int = 1) -> None:
    """Run the app for ``config`` under uvicorn until interrupted; ``workers`` above 1 runs that many
    processes on the port (labels are then read-only: each process would hold its own copy)."""
    check_host(host, config.token)
    check_port(port)
    check_workers(workers)
    # Requests addressed to the name it listens on are this server's too (--host myname).
    config = replace(config, allowed_hosts=[*config.allowed_hosts, host])
    require_serve_extra()
    import uvicorn

    options = dict(host=host, port=port, log_level=log_level, access_log=False, loop="auto", http="auto")
    if workers == 1:
        uvicorn.run(create_app(config), **options)
        return
    # Built once here first, so a bad index or head is one clear line rather than N worker tracebacks.
    create_app(replace(config, labels_read_only=True))
    os.environ[CONFIG_ENV] = replace(config, labels_read_only=True).to_json()
    uvicorn.run("clipxfer.serve.server:create_app_from_environment", factory=True, workers=workers, **options)
