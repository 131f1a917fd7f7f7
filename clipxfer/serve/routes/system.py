"""The server itself: liveness (``/api/health``, open even with a token), index info and the
Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ... import __version__
from ..responses import SafeJSONResponse
from ..state import ServeState


def add_system_routes(router: APIRouter, state: ServeState) -> None:
    """Add ``/api/health`` and ``/api/info`` to ``router``."""

    @router.get("/api/health")
    async def health():
        """Liveness: the model and the number of indexed images."""
        return SafeJSONResponse({"status": "ok", "model": state.model_id, "count": len(state.catalog),
                                 "version": __version__})

    @router.get("/api/info")
    async def info():
        """The same object as ``clipxfer info --json``."""
        return state.index().info()


def add_metrics_route(router: APIRouter, state: ServeState) -> None:
    """Add ``/metrics`` to ``router`` (separate from the others to keep it last in the OpenAPI schema)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @router.get("/metrics")
    async def metrics():
        """Prometheus metrics: request counts and latencies by route and status."""
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
