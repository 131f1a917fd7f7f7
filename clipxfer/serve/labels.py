"""The labelling loop's state and maths: class names and labels of indexed images kept in one
JSON file (written atomically on every change), a head fitted on them, and its cross-validated
accuracy and confusion matrix.

The label file lives next to the index (``labels.json``) unless another path is given; each
label is stored with its item id and path, so an export needs nothing but the file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..csvcells import safe_cell
from ..errors import ClipxferError
from ..index.lock import LockHeld, release_pid_lock, take_pid_lock
from ..paths import path_text

LABEL_FILE = "labels.json"
FORMAT = "clipxfer-labels/1"
LABEL_METHODS = ("probe", "tip")
#: Undo steps kept in the file.
MAX_HISTORY = 1000


class LabelsNotWritable(ClipxferError):
    """The label file cannot be changed (a read-only folder, or another server writes it); nothing changed."""


class LabelFileLock:
    """Exclusive right to write one label file, held from this process's first change until
    :meth:`release`: a second ``clipxfer serve`` on the same labels gets a clear refusal instead
    of overwriting acknowledged labels. An ``flock`` dies with its process, so a killed server
    never leaves a stale lock."""

    def __init__(self, labels_path: Path):
        self.path = labels_path.with_name(labels_path.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock if not held; True when it was taken just now. Raises LabelsNotWritable."""
        if self.fd is not None:
            return False
        try:
            self.fd = take_pid_lock(self.path)
        except LockHeld as held:
            raise LabelsNotWritable(
                f"{self.path.with_suffix('')} is being written by another clipxfer serve (pid {held.holder}); "
                "label there, stop it, or start this one with another --labels"
            ) from None
        except OSError as exc:
            raise LabelsNotWritable(
                f"{self.path.parent} cannot be written ({exc.strerror or exc}): labels are read-only here; "
                "start clipxfer serve with --labels FILE in a writable folder"
            ) from None
        return True

    def release(self) -> None:
        if self.fd is not None:
            release_pid_lock(self.fd)
            self.fd = None


class LabelStore:
    """Class names, ``{item id: (path, label)}`` and an undo history, persisted to ``path``.

    Every change is written before the call returns (temp file, fsync, rename), and memory changes
    only once the file has: a crash at any moment leaves the previous or the new file, and a write
    that fails (read-only folder) leaves both as they were. One process writes a label file at a
    time (:class:`LabelFileLock`); it re-reads the file when it takes the lock, so labels another
    server wrote before are kept. The undo history holds label changes and class-list changes, so
    undo never brings back a label whose class is gone. Methods are thread-safe.
    """

    def __init__(self, path: str | os.PathLike, read_only: str | None = None):
        self.path = Path(path)
        self.read_only = read_only  # why changes are refused, or None
        self._lock = threading.Lock()
        self._file_lock = LabelFileLock(self.path)
        self.classes: list[str] = []
        self.labels: dict[int, tuple[str, str]] = {}
        self.history: list[dict[str, Any]] = []
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            self.classes = [str(c) for c in data["classes"]]
            self.labels = {int(e["id"]): (str(e["path"]), str(e["label"])) for e in data["labels"]}
            self.history = list(data.get("history", []))
        except (ValueError, KeyError, TypeError) as exc:
            raise ClipxferError(f"{self.path}: not a clipxfer label file ({exc}); move it away or pass another --labels") from None

    def _begin_change(self) -> None:
        """Before any change: hold the file lock; when just taken, start from what is on disk."""
        if self.read_only:
            raise LabelsNotWritable(self.read_only)
        if self._file_lock.acquire() and self.path.is_file():
            self._read()

    def _commit(self, classes: list[str], labels: dict[int, tuple[str, str]], history: list[dict[str, Any]]) -> None:
        """Write the new state, then adopt it (memory is untouched when the write fails)."""
        from ..paths import atomic_write_bytes

        history = history[-MAX_HISTORY:]
        data = {
            "format": FORMAT,
            "classes": classes,
            "labels": [{"id": i, "path": p, "label": lab} for i, (p, lab) in sorted(labels.items())],
            "history": history,
        }
        try:
            atomic_write_bytes(self.path, json.dumps(data, indent=1).encode("utf-8"))
        except OSError as exc:
            raise LabelsNotWritable(
                f"{self.path} cannot be written ({exc.strerror or exc}); the label was not changed: "
                "start clipxfer serve with --labels FILE in a writable folder"
            ) from None
        self.classes, self.labels, self.history = classes, labels, history

    def close(self) -> None:
        """Let another process write the label file."""
        with self._lock:
            self._file_lock.release()

    # -- changes --------------------------------------------------------------------------
    def set_classes(self, classes: list[str]) -> None:
        """Replace the class list; a class that still has labels cannot be dropped. Undoable."""
        cleaned = [c.strip() for c in classes if c.strip()]
        if len(set(cleaned)) != len(cleaned):
            raise ClipxferError("class names repeat; name each class once")
        if any(len(c) > 100 for c in cleaned):
            raise ClipxferError("class names are at most 100 characters")
        with self._lock:
            self._begin_change()
            used = {lab for _, lab in self.labels.values()}
            dropped = sorted(used - set(cleaned))
            if dropped:
                raise ClipxferError(f"class(es) {', '.join(dropped)} still have labels; relabel or undo them first")
            if cleaned == self.classes:
                return
            step = {"classes_before": list(self.classes)}
            self._commit(cleaned, self.labels, [*self.history, step])

    def set_label(self, item_id: int, path: str, label: str | None) -> None:
        """Label an item (``None``: remove its label); recorded for :meth:`undo`."""
        with self._lock:
            self._begin_change()
            if label is not None and label not in self.classes:
                raise ClipxferError(f"unknown class '{label}': name it first (classes: {', '.join(self.classes)})")
            before = self.labels.get(item_id)
            labels = dict(self.labels)
            if label is None:
                labels.pop(item_id, None)
            else:
                labels[item_id] = (str(path), label)
            step = {"id": item_id, "path": str(path), "before": before[1] if before else None}
            self._commit(self.classes, labels, [*self.history, step])

    def undo(self) -> int | str | None:
        """Revert the last change: returns the item id of a label change, ``"classes"`` for a
        class-list change, or None when there is nothing to undo."""
        with self._lock:
            self._begin_change()
            if not self.history:
                return None
            step, history = self.history[-1], self.history[:-1]
            if "classes_before" in step:
                # The class edit is the latest step, so every label now is in the list it replaced.
                self._commit([str(c) for c in step["classes_before"]], self.labels, history)
                return "classes"
            item_id = int(step["id"])
            labels = dict(self.labels)
            if step["before"] is None:
                labels.pop(item_id, None)
            elif step["before"] in self.classes:
                labels[item_id] = (step["path"], step["before"])
            else:  # a history written before class edits were recorded
                raise ClipxferError(f"cannot undo: class '{step['before']}' was removed since; name it again first")
            self._commit(self.classes, labels, history)
            return item_id

    # -- reading --------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[str], dict[int, tuple[str, str]]]:
        """A consistent copy of ``(classes, labels)``."""
        with self._lock:
            return list(self.classes), dict(self.labels)

    def counts(self) -> dict[str, int]:
        classes, labels = self.snapshot()
        counts = {c: 0 for c in classes}
        for _, lab in labels.values():
            counts[lab] = counts.get(lab, 0) + 1
        return counts

    def manifest_csv(self) -> str:
        """The labels as a CSV manifest (``path,label``) that ``clipxfer probe`` and friends read.

        Cells a spreadsheet would run as formulas are marked as text (:mod:`clipxfer.csvcells`);
        file names that are not UTF-8 are shown with ``\\xff`` escapes (:func:`clipxfer.paths.path_text`)."""
        _, labels = self.snapshot()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label"])
        for _, (path, label) in sorted(labels.items()):
            writer.writerow([safe_cell(path_text(path)), safe_cell(path_text(label))])
        return buffer.getvalue()


# ------------------------------------------------------------------------------- fitting


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Mask of a validation hold-out: about ``fraction`` of each class with at least 2 items
    (at least one of them stays in training)."""
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) >= 2:
            take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
            mask[members[:take]] = True
    return mask


def check_trainable(labels: np.ndarray, num_classes: int) -> None:
    """At least two classes, each with a label, or one clear error."""
    if num_classes < 2:
        raise ClipxferError("name at least two classes before fitting a head")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ClipxferError("every class needs at least one labelled image before a head can be fitted")


def fit_labelled_head(method: str, encoder, classnames: list[str], encoding, labels: np.ndarray, seed: int = 0,
                      templates: str = "simple"):
    """Fit a ``probe`` or ``tip`` head on labelled index rows. Its settings (L2 strength, or alpha
    and beta) are chosen on a stratified quarter of the labels held out from the fit; with a single
    image in every class there is nothing to hold out and the training rows stand in."""
    from ..datasets.features import take
    from ..datasets.prompts import load_templates
    from ..heads.base import FewShotData
    from ..heads.fitting import fit_head
    from ..heads.zeroshot import fit_zeroshot

    if method not in LABEL_METHODS:
        raise ClipxferError(f"unknown method '{method}': use one of {', '.join(LABEL_METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    check_trainable(labels, len(classnames))
    rng = np.random.default_rng(seed)
    val_mask = _stratified_holdout(labels, 0.25, rng)
    train_idx = np.flatnonzero(~val_mask)
    val_idx = np.flatnonzero(val_mask) if val_mask.any() else train_idx
    zeroshot = fit_zeroshot(encoder, classnames, load_templates(templates))
    data = FewShotData(
        encoder=encoder,
        classnames=list(classnames),
        train=take(encoding, train_idx),
        train_labels=labels[train_idx],
        val=take(encoding, val_idx),
        val_labels=labels[val_idx],
        zeroshot=zeroshot,
        shots=int(np.bincount(labels).min()),
        seed=seed,
    )
    return fit_head(method, data)


def cross_validate(method: str, encoder, classnames: list[str], encoding, labels: np.ndarray, folds: int = 5,
                   seed: int = 0) -> dict[str, Any]:
    """Stratified k-fold accuracy and confusion matrix (rows: true class, columns: predicted) of
    :func:`fit_labelled_head` on the labels; ``k = min(folds, smallest class count)``, at least 2.
    Returns ``accuracy`` None when some class has fewer than 2 labels (nothing to hold out)."""
    from sklearn.model_selection import StratifiedKFold

    from ..datasets.features import take

    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(classnames)
    counts = np.bincount(labels, minlength=num_classes)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    if num_classes < 2 or counts.min() < 2:
        return {"accuracy": None, "folds": 0, "confusion": confusion.tolist(), "count": int(len(labels))}
    k = int(min(folds, counts.min()))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        head = fit_labelled_head(method, encoder, classnames, take(encoding, train_idx), labels[train_idx], seed + fold)
        predicted = head.predict(take(encoding, test_idx))
        np.add.at(confusion, (labels[test_idx], predicted), 1)
    accuracy = float(np.trace(confusion) / confusion.sum())
    return {"accuracy": accuracy, "folds": k, "confusion": confusion.tolist(), "count": int(len(labels))}
