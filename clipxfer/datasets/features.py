"""Encoding a labelled dataset once: features cached on disk per (encoder, dataset items)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ..encoders.base import Encoder, ImageEncoding
from ..encoders.pipeline import Failure
from ..errors import ClipxferError, ImageDecodeError
from ..images import find_images, load_model_input
from ..paths import cache_dir
from .labelled import LabelledImages


def dataset_fingerprint(encoder_id: str, dataset: LabelledImages) -> str:
    """A hash of the encoder id and each item's key (plus size and mtime for files)."""
    digest = hashlib.sha256(encoder_id.encode())
    for key, source in zip(dataset.keys, dataset.sources):
        digest.update(key.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8
        if isinstance(source, (str, os.PathLike)):
            try:
                stat = Path(source).stat()
            except OSError:  # gone or unreadable: decoding it names the file
                digest.update(b"missing")
                continue
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def encode_dataset(encoder: Encoder, dataset: LabelledImages, use_cache: bool = True, progress: bool = False) -> ImageEncoding:
    """Embeddings and probe features of every item of ``dataset``, from the cache when possible."""
    path = cache_dir() / "features" / f"{dataset_fingerprint(encoder.id, dataset)}.safetensors"
    if use_cache and path.is_file():
        try:
            stored = load_file(path)
            return ImageEncoding(stored["embeddings"], stored.get("features", stored["embeddings"]))
        except Exception:  # a damaged cache entry is recomputed
            pass
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc=f"encoding {dataset.name}", unit="img", file=sys.stderr)
    encoding = encoder.embed_images(dataset.sources, progress=bar.update if bar else None)
    if bar:
        bar.close()
    if use_cache:
        arrays = {"embeddings": encoding.embeddings}
        if encoding.features is not encoding.embeddings:
            arrays["features"] = encoding.features
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(arrays, str(tmp))
        os.replace(tmp, path)
    return encoding


def encode_readable(
    encoder: Encoder, dataset: LabelledImages, progress: bool = False, fail_fast: bool = False
) -> tuple[np.ndarray, ImageEncoding, list[Failure]]:
    """:func:`encode_dataset` that skips unreadable items, as ``clipxfer index`` does: returns the
    indices of the items kept, their encoding, and a :class:`Failure` (path, reason) per item skipped.
    ``fail_fast`` raises the first unreadable item's one-line error instead; so does a set with none readable."""
    try:
        return np.arange(len(dataset)), encode_dataset(encoder, dataset, progress=progress), []
    except ImageDecodeError:
        if fail_fast:
            raise
    # Only a set with a bad file pays for this second look, which finds every bad file at once.
    kept, failures = [], []
    for i, source in enumerate(dataset.sources):
        try:
            load_model_input(source, encoder.input_size)
            kept.append(i)
        except ImageDecodeError as exc:
            failures.append(Failure(source, exc.reason))
    if not kept:
        raise ClipxferError(f"{dataset.name}: none of its {len(dataset)} images can be read (first: "
                            f"{failures[0].path}: {failures[0].reason})")
    indices = np.array(kept, dtype=np.int64)
    return indices, encode_dataset(encoder, dataset.subset(indices), progress=progress), failures


def take(encoding: ImageEncoding, indices: np.ndarray) -> ImageEncoding:
    """The rows at ``indices`` of both arrays."""
    embeddings = encoding.embeddings[indices]
    features = embeddings if encoding.features is encoding.embeddings else encoding.features[indices]
    return ImageEncoding(embeddings, features)


def encode_folder(
    encoder: Encoder, folder: str | os.PathLike, progress: bool = False, why: str = "",
    skipped: list[Failure] | None = None,
) -> tuple[list[str], ImageEncoding]:
    """Every image below ``folder`` (no labels), encoded and cached like a labelled set.
    ``why`` ends the error message for an empty folder (what the images were needed for).
    With a ``skipped`` list, unreadable images are left out and a :class:`Failure` for each is
    appended to it; without one, the first unreadable image is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise ClipxferError(f"{root}: not a folder of images")
    paths = [str(p) for p in find_images(root)]
    if not paths:
        raise ClipxferError(f"{root}: no images found{'; ' + why if why else ''}")
    items = LabelledImages(root.name or "unlabelled", ["?"], paths, np.zeros(len(paths)), paths)
    kept, encoding, failures = encode_readable(encoder, items, progress, fail_fast=skipped is None)
    if skipped is not None:
        skipped.extend(failures)
    return [paths[i] for i in kept], encoding
