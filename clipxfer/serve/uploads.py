"""Reading an uploaded image: the per-file size cap, then the indexer's safe decoder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import HTTPException, UploadFile

from ..errors import ImageDecodeError


async def read_upload(file: UploadFile, limit: int) -> bytes:
    """The uploaded bytes: 413 over ``limit`` bytes, 400 when empty."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload is over the {limit:,}-byte limit")
    if not data:
        raise HTTPException(400, "empty upload: send an image file")
    return data


def decode_upload(data: bytes):
    """Uploaded bytes -> RGB PIL image through the indexer's safe decoder (size, bombs, corrupt
    files). Raises ImageDecodeError naming 'upload', never the temporary file."""
    from ..images import open_image

    with tempfile.TemporaryDirectory(prefix="clipxfer-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            return open_image(path)
        except ImageDecodeError as exc:
            raise ImageDecodeError("upload", exc.reason) from None
