"""The labelling API: classes, labels by item id, the head method, undo, suggestions of what to
label next, and the exports (a CSV manifest, the fitted head)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from fastapi import APIRouter, Body, HTTPException
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ...errors import ClipxferError
from ..active import MAX_DIVERSITY
from ..labels import LabelsNotWritable
from ..state import ServeState


async def change_labels(change, *args):
    """Run a label-file change in the thread pool; a label file that cannot be written (read-only
    folder, another server writing it) is a 409 with the reason, and nothing changed."""
    try:
        return await run_in_threadpool(change, *args)
    except LabelsNotWritable as exc:
        raise HTTPException(409, str(exc)) from None


def add_labelling_routes(router: APIRouter, state: ServeState) -> None:
    """Add ``/api/labels`` and below to ``router``."""
    @router.get("/api/labels")
    async def labels_state():
        """Classes, labels by item id, method, and the latest cross-validated evaluation."""
        return state.session.state()

    @router.put("/api/labels/classes")
    async def set_classes(classes: list[str] = Body(..., embed=True)):
        """Name the classes (in order: key 1 is the first)."""
        await change_labels(state.session.set_classes, classes)
        return state.session.state()

    @router.put("/api/labels/method")
    async def set_method(method: str = Body(..., embed=True)):
        """``probe`` or ``tip``: the head the loop refits."""
        state.session.set_method(method)
        return state.session.state()

    # After /classes and /method: the first route that matches a path answers it.
    @router.put("/api/labels/{item_id}")
    async def set_label(item_id: int, label: str | None = Body(..., embed=True)):
        """Label indexed image ``item_id`` (``null`` removes its label); written before the reply."""
        state.item_path(item_id)
        await change_labels(state.session.label, item_id, label)
        return state.session.state()

    @router.post("/api/labels/undo")
    async def undo():
        """Revert the last label change."""
        item_id = await change_labels(state.session.undo)
        return {"undone": item_id, **state.session.state()}

    @router.get("/api/labels/suggest")
    async def suggest(n: int = 12, strategy: str = "margin", diversity: float = 0.5):
        """The next images to label: least certain under the current head, diversified."""
        if not 1 <= n <= 200:
            raise ClipxferError(f"n must be between 1 and 200, not {n}")
        if not (math.isfinite(diversity) and 0 <= diversity <= MAX_DIVERSITY):
            raise HTTPException(422, f"diversity must be a number from 0 to {MAX_DIVERSITY:g}, not {diversity}")
        return await run_in_threadpool(state.session.suggest, n, strategy, diversity)

    @router.get("/api/labels/manifest.csv")
    async def export_manifest():
        """The labels as a CSV manifest (``path,label``) for ``clipxfer probe`` and friends."""
        return PlainTextResponse(state.session.store.manifest_csv(), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="labels.csv"'})

    @router.get("/api/labels/head.safetensors")
    async def export_head():
        """The latest fitted head as a file ``clipxfer predict`` loads."""
        chosen = state.session.head_for_export()
        with tempfile.TemporaryDirectory(prefix="clipxfer-head-") as folder:
            data = chosen.save(Path(folder) / "head.safetensors").read_bytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{chosen.method}-labels.safetensors"'})
