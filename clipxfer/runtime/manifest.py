"""The bundle's manifest: what the folder holds, and the SHA-256 of every file, checked on load.

``manifest.json`` names the bundle format, its kind (classifier or detector), the encoder id, the
precision and every other file with its digest. A missing, extra-named or changed file is refused
in one line before OpenVINO reads anything. (The digests catch damage and tampering with the files;
whoever can rewrite manifest.json too can rewrite anything: keep bundles where only you can write.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ClipxferError

FORMAT = "clipxfer-bundle/1"
MANIFEST = "manifest.json"
KINDS = ("classifier", "detector")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` into ``folder``: ``fields`` plus the format and every file's digest."""
    files = {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file() and path.name != MANIFEST}
    manifest = {"format": FORMAT, **fields, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of the bundle in ``folder``, with every listed file's digest checked (``verify``)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "folder not found" if not folder.exists() else f"not a clipxfer bundle (no {MANIFEST})"
        raise ClipxferError(f"{folder}: {what}; make one with 'clipxfer export ARTIFACT --out {folder}'")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ClipxferError(f"{path}: unreadable manifest ({exc}); export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ClipxferError(f"{path}: bundle format {found!r} is not {FORMAT!r}; export it again with this clipxfer")
    if manifest.get("kind") not in KINDS or not isinstance(manifest.get("files"), dict):
        raise ClipxferError(f"{path}: manifest lacks its kind or file list; export the bundle again")
    for name, digest in manifest["files"].items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ClipxferError(f"{path}: the manifest names a file outside the bundle ({name!r}); refusing it")
        if not (folder / name).is_file():
            raise ClipxferError(f"{folder / name}: missing from the bundle; copy the whole folder again")
        if verify and sha256_file(folder / name) != digest:
            raise ClipxferError(f"{folder / name}: SHA-256 does not match the manifest (changed or damaged); "
                                "copy or export the bundle again")
    return manifest
