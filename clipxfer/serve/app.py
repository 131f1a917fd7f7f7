"""The FastAPI app: search, classify, anomaly scores, index info, the labelling loop, metrics,
and the web page (``static/``), over the Python API only. :func:`create_app` wires the parts:
:class:`~.state.ServeState` (what the routes share), :class:`~.middleware.GuardMiddleware` (see
:mod:`.security`) and the routes, one module per area (:mod:`.routes`).

Threads: an :class:`~clipxfer.index.Index` holds a SQLite connection that belongs to the thread
that opened it, so index calls (FAISS search, info) run in the event-loop thread, where they take
about a millisecond; decoding, encoding and fitting run in the thread pool.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request

from .. import __version__
from ..errors import ClipxferError
from .config import ServeConfig
from .middleware import GuardMiddleware
from .responses import SafeJSONResponse
from .routes import (
    add_classify_routes,
    add_labelling_routes,
    add_metrics_route,
    add_page_routes,
    add_search_routes,
    add_system_routes,
)
from .security import check_token
from .state import NotFound, ServeState


async def not_found(request: Request, exc: NotFound):
    return SafeJSONResponse({"detail": str(exc)}, status_code=404)


async def bad_input(request: Request, exc: ClipxferError):
    return SafeJSONResponse({"detail": str(exc)}, status_code=400)


def create_app(config: ServeConfig) -> FastAPI:
    """The app for ``config`` (the index, heads and detector are loaded now; errors are ClipxferError)."""
    check_token(config.token)
    state = ServeState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.index().search_vectors(np.zeros((1, state.encoder.dim), np.float32), 1)  # load FAISS now
        yield
        state.close()

    app = FastAPI(title="clipxfer", version=__version__, lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="Search, classify and label an image index made by clipxfer.")
    app.state.clipxfer = state
    app.add_middleware(GuardMiddleware, config=config, requests_total=state.requests_total, latency=state.latency)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(ClipxferError, bad_input)
    # This order is the OpenAPI schema's; no two paths overlap across areas.
    for add_routes in (add_system_routes, add_search_routes, add_classify_routes, add_labelling_routes,
                       add_metrics_route):
        add_routes(app.router, state)
    add_page_routes(app.router)
    return app
