"""The one reader and writer of clipxfer's artifact files: heads, fine-tuning adapters and anomaly
detectors are each one ``.safetensors`` file of named float arrays whose header carries JSON
metadata (a format tag, the id of the encoder that made it, its config) under one key. Never a pickle.

Every artifact records the encoder id it was made with and refuses another (:func:`check_model_id`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from ..errors import ClipxferError
from ..paths import atomic_write_bytes
from .ids import switch_hint

#: The format tag of heads (and of fine-tuning adapters, which are heads).
HEAD_FORMAT = "clipxfer-head/1"
#: The format tag of anomaly detectors (:mod:`clipxfer.anomaly.detector`).
DETECTOR_FORMAT = "clipxfer-anomaly/1"
#: The safetensors header key that holds an artifact's JSON metadata.
METADATA_KEY = "clipxfer"
SUFFIX = ".safetensors"


def artifact_path(path: str | os.PathLike) -> Path:
    """``path`` with ``.safetensors`` added when it has another suffix or none."""
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def claim_output(path: str | os.PathLike, force: bool = False, what: str = "head") -> Path:
    """``path`` (``.safetensors`` added when missing) if nothing is there yet, or with ``force``; else
    one line saying the file exists. Every command that writes a head, adapter or detector asks here
    before any work, so none overwrites a file silently."""
    path = artifact_path(path)
    if path.exists() and not force:
        raise ClipxferError(
            f"{path}: a file of that name exists; pass --force to overwrite it, or choose another --out"
        )
    return path


def write_artifact(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, Any], what: str) -> Path:
    """Write ``tensors`` with ``metadata`` to ``path`` (``.safetensors`` added if missing), atomically and
    with the umask's permissions; an unwritable place is one line naming the file."""
    path = artifact_path(path)
    try:
        atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(metadata)}))
    except OSError as exc:
        raise ClipxferError(f"{path}: cannot write the {what} ({exc.strerror or exc}); "
                            "choose --out in a writable folder") from None
    return path


def read_artifact_metadata(path: str | os.PathLike, what: str, how_to_make: str = "") -> dict[str, Any]:
    """The JSON metadata of the artifact at ``path``, without loading its arrays; a missing, damaged or
    foreign file is one line naming it (``how_to_make`` is added to the not-found line)."""
    path = Path(path)
    if not path.is_file():
        raise ClipxferError(f"{path}: {what} file not found{f' ({how_to_make})' if how_to_make else ''}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ClipxferError(f"{path}: not a clipxfer {what} file ({exc})") from None
    if raw is None:
        raise ClipxferError(f"{path}: a safetensors file but not a clipxfer {what} (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ClipxferError(f"{path}: {what} metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ClipxferError(f"{path}: {what} metadata must be a JSON object, not {type(meta).__name__}")
    return meta


def read_artifact_tensors(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Every array of the artifact at ``path`` (whose metadata was read first)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # a header that lies about its tensors
        raise ClipxferError(f"{path}: damaged {what} file ({exc})") from None


def check_model_id(made_with: str, used: str, what: str) -> None:
    """Refuse features made by encoder ``used`` for an artifact made with ``made_with``, naming the
    ``--model`` that rebuilds the right encoder (``--precision`` when only the precision differs).
    ``what`` starts the line: ``this probe head was made``."""
    if used != made_with:
        raise ClipxferError(
            f"{what} with model '{made_with}' but the images were encoded "
            f"with '{used}': use {switch_hint(made_with, used)}"
        )
