"""Few-shot splits: K training images per class, a validation set from the rest of the training
pool, and a held-out test set, all drawn from explicit seeds and written out as a manifest."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..csvcells import safe_cell
from ..errors import ClipxferError
from ..paths import atomic_write_bytes
from .labelled import LabelledImages

#: Seed of the train/test partition of datasets without a fixed split: the same for every
#: few-shot seed, so all seeds and methods are scored on one test set.
PARTITION_SEED = 0
TEST_FRACTION = 0.3


@dataclass(frozen=True)
class FewShotSplit:
    """Indices into a dataset; ``shots`` and ``seed`` record how they were drawn."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    shots: int
    seed: int

    def manifest(self, dataset: LabelledImages) -> pd.DataFrame:
        """One row per used item: ``key,label,split`` (split = train, val or test)."""
        rows = [
            (dataset.keys[i], dataset.classnames[dataset.labels[i]], role)
            for role, indices in (("train", self.train), ("val", self.val), ("test", self.test))
            for i in indices
        ]
        return pd.DataFrame(rows, columns=["path", "label", "split"])

    def manifest_hash(self, dataset: LabelledImages) -> str:
        """A short hash identifying exactly which items were drawn for what."""
        text = self.manifest(dataset).to_csv(index=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def write_manifest(self, dataset: LabelledImages, path: str | Path) -> Path:
        """Write the drawn manifest as CSV (atomically), so the run can be repeated exactly. Files are
        written relative to the manifest's own folder, as every manifest reader resolves them
        (:func:`~clipxfer.datasets.labelled.manifest_source`); built-in items keep their keys."""
        path = Path(path)
        table = self.manifest(dataset)
        where = os.path.abspath(path.parent)
        table["path"] = [
            _path_from(dataset.sources[i], where) if isinstance(dataset.sources[i], (str, os.PathLike)) else key
            for i, key in zip(np.concatenate([self.train, self.val, self.test]), table["path"])
        ]
        buffer = io.StringIO()
        for column in ("path", "label"):  # read back by datasets.labelled.from_csv, which undoes this
            table[column] = table[column].map(safe_cell)
        table.to_csv(buffer, index=False)
        try:
            atomic_write_bytes(path, buffer.getvalue().encode())
        except OSError as exc:
            raise ClipxferError(f"{path}: cannot write the manifest ({exc.strerror or exc}); "
                                "choose --out in a writable folder") from None
        return path


def _path_from(source, folder: str) -> str:
    """``source`` relative to ``folder`` (absolute when no relative path exists, e.g. another drive)."""
    absolute = os.path.abspath(source)
    try:
        return os.path.relpath(absolute, folder)
    except ValueError:
        return absolute


def partition_train_test(dataset: LabelledImages) -> tuple[np.ndarray, np.ndarray]:
    """Train pool and test indices: the dataset's own split where it has one, else a stratified
    30% test hold-out drawn with :data:`PARTITION_SEED` (``val`` items stay in the pool)."""
    splits = dataset.splits
    if (splits == "test").any():
        return np.flatnonzero(splits != "test"), np.flatnonzero(splits == "test")
    rng = np.random.default_rng(PARTITION_SEED)
    train, test = list(np.flatnonzero(splits == "val")), []  # given validation items never become test
    for label in range(len(dataset.classnames)):
        members = rng.permutation(np.flatnonzero((dataset.labels == label) & (splits != "val")))
        cut = int(round(len(members) * TEST_FRACTION)) if len(members) > 1 else 0
        test.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def held_out_test(dataset: LabelledImages, max_test: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train pool and test indices as :func:`partition_train_test`, the test set capped at
    ``max_test`` items drawn with :data:`PARTITION_SEED` (the same for every seed and shot count)."""
    pool, test = partition_train_test(dataset)
    if max_test is not None and len(test) > max_test:
        test = np.sort(np.random.default_rng(PARTITION_SEED).choice(test, size=max_test, replace=False))
    return pool, test


def default_val_shots(shots: int) -> int:
    """Validation images per class: as many as the training shots, between 2 and 4 (CoOp's
    recipe caps validation at 4 per class so tuning does not cost more labels than training)."""
    return min(max(shots, 2), 4)


def draw_few_shot(
    dataset: LabelledImages,
    shots: int,
    seed: int,
    val_shots: int | None = None,
    max_test: int | None = None,
) -> FewShotSplit:
    """Draw ``shots`` training and ``val_shots`` validation images per class from the training
    pool with ``seed``; the test set is the held-out partition (optionally capped at ``max_test``
    items, drawn with :data:`PARTITION_SEED` so it stays the same across seeds).

    Validation comes from the dataset's own ``val`` items when it has them. Otherwise a class
    with no more than ``shots`` images keeps one back for validation (training gets the rest,
    with one warning): choosing settings on an empty validation set would compare NaNs.
    """
    if shots < 1:
        raise ClipxferError(f"--shots {shots}: the number of training images per class must be at least 1")
    val_shots = default_val_shots(shots) if val_shots is None else val_shots
    pool, test = held_out_test(dataset, max_test)
    given_val = pool[dataset.splits[pool] == "val"]
    if len(given_val):
        pool = pool[dataset.splits[pool] != "val"]
    rng = np.random.default_rng(seed)
    train, val, short = [], [], []
    for label, name in enumerate(dataset.classnames):
        members = rng.permutation(pool[dataset.labels[pool] == label])
        if len(given_val):
            take_train = min(shots, len(members))
            val.extend(rng.permutation(given_val[dataset.labels[given_val] == label])[:val_shots])
        else:
            # At least one validation image per class whenever the class has two or more.
            take_train = min(shots, max(len(members) - 1, 1) if val_shots > 0 else len(members))
            val.extend(members[take_train : take_train + val_shots])
        if take_train < shots:
            short.append(f"'{name}' ({len(members)})")
        train.extend(members[:take_train])
    if short:
        keep = "" if len(given_val) else ", one image per class kept back for validation"
        warn_once(
            f"warning: class(es) {', '.join(short[:5])}{' and more' if len(short) > 5 else ''} have no more than "
            f"--shots {shots} training image(s): training on fewer{keep}"
        )
    return FewShotSplit(np.array(train, np.int64), np.array(val, np.int64), test, shots, seed)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``message`` on stderr the first time it comes up in this process (a benchmark
    draws the same shortage for every seed)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)
