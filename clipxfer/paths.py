"""Where clipxfer keeps its files on disk: one place, overridable by environment variables."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def cache_dir() -> Path:
    """Root of clipxfer's caches (text embeddings, dataset features, exported samples).

    ``CLIPXFER_CACHE`` wins, then ``$XDG_CACHE_HOME/clipxfer``, then ``~/.cache/clipxfer``.
    """
    if os.environ.get("CLIPXFER_CACHE"):
        root = Path(os.environ["CLIPXFER_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipxfer"
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_index_path() -> Path:
    """The index used when ``--index`` is not given.

    ``CLIPXFER_INDEX`` wins, then ``$XDG_DATA_HOME/clipxfer/index``, then
    ``~/.local/share/clipxfer/index``.
    """
    if os.environ.get("CLIPXFER_INDEX"):
        return Path(os.environ["CLIPXFER_INDEX"])
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "clipxfer" / "index"


def safe_filename(name: str, default: str = "data") -> str:
    """``name`` made safe as one file-name component: characters other than letters, digits,
    ``-`` and ``_`` become ``-`` (runs of them one ``-``), so ``../../x`` cannot leave the folder it
    is written into (it becomes ``x``). ``default`` when nothing is left."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(name))
    while "--" in cleaned:
        cleaned = cleaned.replace("--", "-")
    return cleaned.strip("-") or default


def path_text(path) -> str:
    """A path as valid UTF-8 text for output files and tables: bytes of a file name that are not
    UTF-8 (Linux allows any) shown as ``\\xff`` instead of failing to encode."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half of it.

    The temporary file's name is unique to this call (not only to the process), so threads of one
    server writing the same file at once each replace it whole instead of sharing one half-written
    temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    # O_EXCL: never write into another writer's file; 0o666 less the umask, as open() would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
