"""Thumbnails of indexed images, made once and cached next to the index (``thumbnails/<id>.jpg``).

A cached thumbnail older than its source file is made again, so an edited image shows its new
content. Files are written atomically: concurrent requests for one thumbnail are harmless.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..images import open_image

THUMBNAIL_FOLDER = "thumbnails"
THUMBNAIL_SIZE = 256
#: The large view: big enough to look at, small enough never to ship a 100-megapixel original.
LARGE_SIZE = 1024


def render_jpeg(source: Path, size: int) -> bytes:
    """``source`` decoded safely (see :func:`clipxfer.images.open_image`), shrunk to fit a
    ``size`` square, as JPEG bytes. Raises ImageDecodeError."""
    img = open_image(source, draft_size=size)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class ThumbnailCache:
    """``thumbnail(item_id, source)`` -> path of a cached JPEG for that item."""

    def __init__(self, index_folder: Path, size: int = THUMBNAIL_SIZE):
        self.folder = Path(index_folder) / THUMBNAIL_FOLDER
        self.size = size

    def thumbnail(self, item_id: int, source: Path) -> Path:
        """The cached thumbnail of ``source`` (made now if missing or stale). Raises ImageDecodeError."""
        from ..paths import atomic_write_bytes

        target = self.folder / f"{int(item_id)}.jpg"
        try:
            if target.stat().st_mtime_ns >= Path(source).stat().st_mtime_ns:
                return target
        except FileNotFoundError:
            pass
        atomic_write_bytes(target, render_jpeg(source, self.size))
        return target
