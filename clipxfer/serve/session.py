"""The labelling session behind the web page: the index snapshot, the label store, a head refitted
in a background thread every few labels, and the active-learning proposals of the current head.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipxferError
from .active import STRATEGIES, suggestions
from .labels import LABEL_METHODS, LabelStore, cross_validate, fit_labelled_head

#: A refit starts after this many label changes since the last one.
REFIT_EVERY = 3


class Catalog:
    """A snapshot of an index's items: ids, absolute paths and vectors, looked up by id."""

    def __init__(self, ids: np.ndarray, paths: list[Path], encoding):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.paths = list(paths)
        self.encoding = encoding
        self.row_of = {int(item_id): row for row, item_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, item_id: int) -> int:
        """The row of ``item_id``, or ClipxferError (unknown ids are never guessed at)."""
        try:
            return self.row_of[int(item_id)]
        except KeyError:
            raise ClipxferError(f"no indexed image with id {item_id}") from None

    def path(self, item_id: int) -> Path:
        return self.paths[self.row(item_id)]


class LabellingSession:
    """Labels, the head fitted on them and its cross-validated score, for one index."""

    def __init__(self, catalog: Catalog, encoder, store: LabelStore, method: str = "probe",
                 refit_every: int = REFIT_EVERY):
        self.catalog = catalog
        self.encoder = encoder
        self.store = store
        self.method = method
        self.refit_every = refit_every
        self.head = None
        self.head_classes: list[str] = []
        self.evaluation: dict[str, Any] = {"accuracy": None, "folds": 0, "confusion": [], "count": 0}
        self.fit_error: str | None = None
        self.version = 0  # bumped by every finished refit
        self._changes_since_fit = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._fitting = False
        self._thread = threading.Thread(target=self._refit_loop, name="clipxfer-refit", daemon=True)
        self._thread.start()
        if self._trainable():
            self.request_refit()

    # -- changes --------------------------------------------------------------------------
    def set_classes(self, classes: list[str]) -> None:
        self.store.set_classes(classes)
        self.request_refit()

    def set_method(self, method: str) -> None:
        if method not in LABEL_METHODS:
            raise ClipxferError(f"unknown method '{method}': use one of {', '.join(LABEL_METHODS)}")
        self.method = method
        self.request_refit()

    def label(self, item_id: int, label: str | None) -> None:
        """Label (or, with None, unlabel) an indexed image; every few changes start a refit."""
        path = self.catalog.path(item_id)
        self.store.set_label(int(item_id), str(path), label)
        self._changed()

    def undo(self) -> int | str | None:
        """Revert the last label or class-list change (see :meth:`LabelStore.undo`)."""
        undone = self.store.undo()
        if undone is not None:
            self._changed()
        return undone

    def _changed(self) -> None:
        with self._lock:
            self._changes_since_fit += 1
            due = self._changes_since_fit >= self.refit_every or self.head is None
        if due:
            self.request_refit()

    def request_refit(self) -> None:
        """Ask the background thread to fit again (coalesced: one fit runs at a time)."""
        with self._lock:
            self._changes_since_fit = 0
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.store.close()

    # -- the background fit ---------------------------------------------------------------
    def _training_set(self):
        classes, labels = self.store.snapshot()
        index = {name: i for i, name in enumerate(classes)}
        rows, targets = [], []
        for item_id, (_, label) in sorted(labels.items()):
            if item_id in self.catalog.row_of and label in index:
                rows.append(self.catalog.row_of[item_id])
                targets.append(index[label])
        from ..datasets.features import take

        return classes, take(self.catalog.encoding, np.asarray(rows, dtype=np.int64)), np.asarray(targets, np.int64)

    def _trainable(self) -> bool:
        classes, _, targets = self._training_set()
        return len(classes) >= 2 and len(targets) and np.bincount(targets, minlength=len(classes)).min() >= 1

    def _refit_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            self._fitting = True
            try:
                self.refit()
            finally:
                self._fitting = False

    def refit(self) -> None:
        """Fit the head and its cross-validation on the current labels (in the calling thread)."""
        classes, encoding, targets = self._training_set()
        method = self.method
        try:
            if not (len(classes) >= 2 and len(targets) and np.bincount(targets, minlength=len(classes)).min() >= 1):
                head, evaluation = None, {"accuracy": None, "folds": 0, "confusion": [], "count": int(len(targets))}
            else:
                head = fit_labelled_head(method, self.encoder, classes, encoding, targets)
                evaluation = cross_validate(method, self.encoder, classes, encoding, targets)
            error = None
        except ClipxferError as exc:
            head, evaluation, error = None, {"accuracy": None, "folds": 0, "confusion": [], "count": 0}, str(exc)
        with self._lock:
            self.head, self.head_classes = head, classes
            self.evaluation = {**evaluation, "method": method, "classes": classes, "fitted_at": time.time()}
            self.fit_error = error
            self.version += 1

    # -- reading --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Classes, label counts, labels, the method and the latest evaluation (JSON-able)."""
        classes, labels = self.store.snapshot()
        with self._lock:
            evaluation = dict(self.evaluation)
            version, error, has_head = self.version, self.fit_error, self.head is not None
        return {
            "classes": classes,
            "counts": self.store.counts(),
            "labels": {str(i): label for i, (_, label) in sorted(labels.items())},
            "method": self.method,
            "methods": list(LABEL_METHODS),
            "refit_every": self.refit_every,
            "head_version": version,
            "has_head": has_head,
            "fitting": self._fitting or self._wake.is_set(),
            "fit_error": error,
            "evaluation": evaluation,
        }

    def current_head(self):
        """The latest fitted head, else the zero-shot head of the named classes, else None."""
        with self._lock:
            head = self.head
        if head is not None:
            return head
        classes, _ = self.store.snapshot()
        if len(classes) < 2:
            return None
        from ..datasets.prompts import load_templates
        from ..heads.zeroshot import fit_zeroshot

        return fit_zeroshot(self.encoder, classes, load_templates("simple"))

    def suggest(self, n: int, strategy: str = "margin", diversity: float = 0.5) -> list[dict]:
        """The next ``n`` unlabelled images to label (see :mod:`clipxfer.serve.active`)."""
        if strategy not in STRATEGIES:
            raise ClipxferError(f"unknown strategy '{strategy}': use one of {', '.join(STRATEGIES)}")
        head = self.current_head()
        if head is None:
            raise ClipxferError("name at least two classes first")
        _, labels = self.store.snapshot()
        exclude = np.array([int(i) in labels for i in self.catalog.ids], dtype=bool)
        picks = suggestions(head, self.catalog.ids, self.catalog.paths, self.catalog.encoding, n, exclude,
                            strategy, diversity)
        return [p.to_dict() for p in picks]

    def head_for_export(self):
        """The latest fitted head, or ClipxferError when none is fitted yet."""
        with self._lock:
            head = self.head
        if head is None:
            raise ClipxferError("no head fitted yet: name two classes and label at least one image of each")
        return head
