"""Search and browse the index: text and image search, similar images, item paths, thumbnails
and large views (images by id only, never by path)."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from ...errors import ClipxferError, ImageDecodeError
from ...images import open_image_bytes
from ...paths import path_text
from ..state import NotFound, ServeState
from ..thumbnails import LARGE_SIZE
from ..uploads import decode_upload, read_upload

MAX_K = 1000
# Larger files are not read whole into memory to be shown (a 16k x 16k PNG is well below this).
MAX_IMAGE_BYTES = 512 << 20


def check_k(k: int) -> int:
    """``k`` (results wanted), refused outside 1..MAX_K."""
    if not 1 <= k <= MAX_K:
        raise ClipxferError(f"k must be between 1 and {MAX_K}, not {k}")
    return k


def hits_json(hits) -> list[dict]:
    """``search --json`` rows plus the item ``id`` (for thumbnails and similar-image links)."""
    return [{**hit.to_dict(), "id": hit.id, "name": hit.path.name} for hit in hits]


def unreadable_is_404(make, item_id_or_path, *args):
    """``make(...)``, with an indexed file that no longer decodes (moved, deleted, damaged since
    indexing) reported as 404 rather than as a bad request."""
    try:
        return make(item_id_or_path, *args)
    except ImageDecodeError as exc:
        raise NotFound(f"indexed image can no longer be read: {exc.reason}") from None


def add_search_routes(router: APIRouter, state: ServeState) -> None:
    """Add ``/api/search``, ``/api/search/image``, ``/api/similar``, ``/api/items``, ``/api/thumb``, ``/api/image`` to ``router``."""
    @router.get("/api/search")
    async def search(q: str = Query(..., min_length=1, max_length=1000), k: int = 20, min_score: float | None = None):
        """Images matching a text query: ``search --json`` rows plus ``id`` and ``name``."""
        check_k(k)
        vector = state.remembered_text_vector(q)
        if vector is None:
            vector = await run_in_threadpool(state.text_vector, q)
        return hits_json(state.index().search_vectors(vector, k, min_score)[0])

    @router.post("/api/search/image")
    async def search_image(file: UploadFile = File(...), k: int = 20, min_score: float | None = None):
        """Images similar to an uploaded image."""
        check_k(k)
        data = await read_upload(file, state.config.max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data)
        encoding = await run_in_threadpool(state.encoder.embed_images, [image])
        return hits_json(state.index().search_vectors(encoding.embeddings, k, min_score)[0])

    @router.get("/api/similar/{item_id}")
    async def similar(item_id: int, k: int = 20):
        """Indexed images nearest to indexed image ``item_id`` (itself left out)."""
        check_k(k)
        state.item_path(item_id)
        vector = state.catalog.encoding.embeddings[state.catalog.row(item_id)]
        hits = [h for h in state.index().search_vectors(vector, k + 1)[0] if h.id != item_id][:k]
        rows = hits_json(hits)
        for rank, row in enumerate(rows, 1):
            row["rank"] = rank
        return rows

    @router.get("/api/items/{item_id}")
    async def item(item_id: int):
        """Path and name of an indexed image."""
        path = state.item_path(item_id)
        return {"id": item_id, "path": str(path), "name": path.name}

    @router.get("/api/thumb/{item_id}")
    async def thumbnail(item_id: int):
        """A cached JPEG thumbnail of indexed image ``item_id``."""
        path = state.item_path(item_id)
        index = state.index()
        # Made from the bytes the index was built from (as /api/image), never from whatever file the name reaches.
        render = functools.partial(indexed_image_jpeg, path, index.root, index.sha256_of(item_id))
        thumb = await run_in_threadpool(unreadable_is_404, state.thumbnails.thumbnail, item_id, path, render)
        return FileResponse(thumb, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @router.get("/api/image/{item_id}")
    async def image(item_id: int):
        """Indexed image ``item_id`` as a JPEG at most 1024 pixels on a side: only the bytes the
        index was built from (same SHA-256, below the index's root), never another file."""
        path = state.item_path(item_id)
        index = state.index()
        expected = index.sha256_of(item_id)
        data = await run_in_threadpool(indexed_image_jpeg, path, index.root, expected, LARGE_SIZE)
        return Response(data, media_type="image/jpeg")


def indexed_image_jpeg(path: Path, root: Path, sha256: str | None, size: int) -> bytes:
    """The file at ``path`` as JPEG if it lies below ``root`` and still holds the indexed bytes;
    NotFound otherwise. An index built from shards (tar, parquet) records names, not files: its
    items are refused here, as is a key that pointed elsewhere or a file changed since."""
    inside = os.path.normpath(path)
    if not inside.startswith(os.path.join(os.path.normpath(root), "")):
        raise NotFound("indexed image can no longer be read: its name is not a file below the index's root")
    try:
        with open(inside, "rb") as handle:
            data = handle.read(MAX_IMAGE_BYTES + 1)
    except OSError:
        raise NotFound("indexed image can no longer be read: no such file (moved, deleted, or indexed from shards)") from None
    if len(data) > MAX_IMAGE_BYTES or hashlib.sha256(data).hexdigest() != sha256:
        raise NotFound("indexed image can no longer be read: the file changed since indexing; index again")
    try:
        img = open_image_bytes(data, path_text(path.name), draft_size=size)
    except ImageDecodeError as exc:
        raise NotFound(f"indexed image can no longer be read: {exc.reason}") from None
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
