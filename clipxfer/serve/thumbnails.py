"""Thumbnails of indexed images, made once and cached next to the index (``thumbnails/<id>-<key>.jpg``).

The key is a hash of the source file's path, size and modification time (exactly, not "newer
than"), so a re-indexed or edited file gets a new thumbnail even when its modification time went
back. Files are written atomically under unique temporary names: concurrent requests for one
thumbnail are harmless. When the index folder cannot be written (a read-only index), thumbnails
go to a temporary folder instead, removed when the cache is closed (the server's shutdown), garbage
collected or the interpreter exits.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Callable

from ..errors import ImageDecodeError
from ..images import open_image

THUMBNAIL_FOLDER = "thumbnails"
THUMBNAIL_SIZE = 256
#: The large view: big enough to look at, small enough never to ship a 100-megapixel original.
LARGE_SIZE = 1024

log = logging.getLogger(__name__)


def render_jpeg(source: Path, size: int) -> bytes:
    """``source`` decoded safely (see :func:`clipxfer.images.open_image`), shrunk to fit a
    ``size`` square, as JPEG bytes. Raises ImageDecodeError."""
    img = open_image(source, draft_size=size)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def source_key(source: Path) -> str:
    """A short hash of ``source``'s path, size and modification time (ns): it changes whenever the
    file is replaced or edited, whichever way its clock moved. Raises OSError for a missing file."""
    stat = Path(source).stat()
    identity = b"\0".join([os.fsencode(source), str(stat.st_size).encode(), str(stat.st_mtime_ns).encode()])
    return hashlib.sha256(identity).hexdigest()[:16]


class ThumbnailCache:
    """``thumbnail(item_id, source)`` -> path of a cached JPEG for that item."""

    def __init__(self, index_folder: Path, size: int = THUMBNAIL_SIZE):
        self.folder = Path(index_folder) / THUMBNAIL_FOLDER
        self.size = size
        self._fallback_lock = threading.Lock()
        self._temporary = False
        self._remove_temporary: weakref.finalize | None = None

    def thumbnail(self, item_id: int, source: Path, render: Callable[[int], bytes] | None = None) -> Path:
        """The cached thumbnail of ``source`` (made now if missing or made from another version of
        the file). ``render(size)`` makes the JPEG bytes (default: :func:`render_jpeg` of ``source``);
        the server passes one that checks the file still holds the indexed bytes. Raises
        ImageDecodeError, or OSError for a vanished source."""
        from ..paths import atomic_write_bytes

        try:
            key = source_key(source)
        except OSError as exc:
            raise ImageDecodeError(source, exc.strerror or str(exc)) from None
        name = f"{int(item_id)}-{key}.jpg"
        target = self.folder / name
        if target.is_file():
            return target
        data = render(self.size) if render is not None else render_jpeg(source, self.size)
        try:
            atomic_write_bytes(target, data)
        except OSError as exc:
            target = self._use_temporary_folder(exc) / name
            atomic_write_bytes(target, data)
        self._drop_other_versions(item_id, keep=target)
        return target

    def _use_temporary_folder(self, exc: OSError) -> Path:
        """Switch to a private temporary folder (once) when the index folder cannot be written."""
        with self._fallback_lock:
            if not self._temporary:
                log.warning("thumbnails: %s cannot be written (%s); caching them in a temporary folder",
                            self.folder, exc.strerror or exc)
                self.folder = Path(tempfile.mkdtemp(prefix="clipxfer-thumbnails-"))
                self._temporary = True
                # Also at exit or collection: a server stopped without close() leaves nothing in /tmp.
                self._remove_temporary = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
            return self.folder

    def close(self) -> None:
        """Remove the temporary folder, if thumbnails went to one (the index's own folder stays)."""
        with self._fallback_lock:
            if self._remove_temporary is not None:
                self._remove_temporary()

    def _drop_other_versions(self, item_id: int, keep: Path) -> None:
        """Remove thumbnails of earlier versions of the item's file (best effort)."""
        for old in keep.parent.glob(f"{int(item_id)}-*.jpg"):
            if old != keep:
                try:
                    old.unlink()
                except OSError:
                    pass
