"""The web page: ``/`` and its files under ``/static`` (plain HTML/JS/CSS in ``serve/static/``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent.parent / "static"


def add_page_routes(router: APIRouter) -> None:
    """Add ``/`` (the page) and ``/static`` (its scripts and styles) to ``router``."""

    @router.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    router.mount("/static", StaticFiles(directory=STATIC), name="static")
