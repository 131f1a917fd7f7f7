"""Multi-label images made from real single-label ones: a seeded grid of tiles (2x2 by default) whose
labels are the set of classes present. The tests and the multi-label benchmark share this helper,
so both see the same kind of data."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..csvcells import safe_cell
from ..errors import ClipxferError
from ..paths import atomic_write_bytes
from .labelled import LABEL_SEPARATOR, LabelledImages


@dataclass
class MultiLabelImages:
    """Images with a set of labels each: ``targets[i, c]`` is 1 when class ``c`` is in image ``i``."""

    name: str
    classnames: list[str]
    images: list[np.ndarray]
    targets: np.ndarray
    #: Which items of the source dataset fill each image's tiles (row-major), for provenance.
    tiles: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def label_sets(self) -> list[list[str]]:
        """The class names present in each image."""
        return [[self.classnames[c] for c in np.flatnonzero(row)] for row in self.targets]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A ``uint8`` array as ``(H, W, 3)``."""
    image = np.asarray(image, dtype=np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def make_mosaics(
    dataset: LabelledImages, count: int, seed: int, pool: np.ndarray | None = None, grid: int = 2,
    max_classes: int = 3,
) -> MultiLabelImages:
    """``count`` mosaics of ``grid x grid`` tiles drawn with ``seed`` from ``pool`` (indices into
    ``dataset``, default all; its images must be arrays of one size). Each mosaic holds 1 to
    ``max_classes`` distinct classes (uniformly), every chosen class in at least one tile, tiles
    shuffled; its targets are the classes present."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(dataset)) if pool is None else np.asarray(pool, dtype=np.int64)
    num_classes = len(dataset.classnames)
    by_class = [pool[dataset.labels[pool] == c] for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(by_class[c])]
    cells = grid * grid
    max_classes = min(max_classes, cells, len(present))
    images, targets, tiles = [], np.zeros((count, num_classes), np.uint8), np.zeros((count, cells), np.int64)
    for i in range(count):
        k = int(rng.integers(1, max_classes + 1))
        classes = rng.choice(present, size=k, replace=False)
        tile_classes = np.r_[classes, rng.choice(classes, size=cells - k)]
        rng.shuffle(tile_classes)
        items = np.array([rng.choice(by_class[c]) for c in tile_classes])
        rows = [np.concatenate([as_rgb(dataset.sources[j]) for j in items[r * grid:(r + 1) * grid]], axis=1)
                for r in range(grid)]
        images.append(np.concatenate(rows, axis=0))
        targets[i, classes] = 1
        tiles[i] = items
    return MultiLabelImages(f"{dataset.name}-mosaic{grid}x{grid}", list(dataset.classnames), images, targets, tiles)


def write_mosaics(parts: dict[str, MultiLabelImages], folder: str | os.PathLike) -> Path:
    """Write mosaics as PNG files under ``folder/<split>/`` and a multi-label manifest
    ``folder/manifest.csv`` (``path,label,split``; labels ``a|b``) that ``--multi-label`` commands read.
    ``parts`` maps a split (``train``, ``val``, ``test``) to its mosaics. Returns the manifest's path."""
    from PIL import Image

    folder = Path(folder)
    rows = []
    try:
        for split, mosaics in parts.items():
            (folder / split).mkdir(parents=True, exist_ok=True)
            for i, (image, labels) in enumerate(zip(mosaics.images, mosaics.label_sets())):
                name = f"{split}/{i:05d}.png"
                Image.fromarray(image).save(folder / name)
                rows.append((name, LABEL_SEPARATOR.join(labels), split))
    except OSError as exc:
        raise ClipxferError(f"{folder}: cannot write the mosaics ({exc.strerror or exc}); choose a writable folder")
    import pandas as pd

    table = pd.DataFrame(rows, columns=["path", "label", "split"])
    table["label"] = table["label"].map(safe_cell)  # read back by datasets.labelled.from_csv, which undoes this
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    manifest = folder / "manifest.csv"
    atomic_write_bytes(manifest, buffer.getvalue().encode())
    return manifest
