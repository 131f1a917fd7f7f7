"""Zero-shot classification of a folder or an index: the Python API behind ``clipxfer classify``.

A labelled folder (ImageFolder: one subfolder per class) or an index whose images lie in class
subfolders gets metrics; any other folder of images gets predictions only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..calibrate.conformal import ClassifierCalibration, check_alpha
from ..calibrate.sets import ConformalSets, calibrate_on_dataset, conformal_sets, split_for_calibration
from ..datasets.features import encode_folder, encode_readable
from ..datasets.labelled import from_image_folder, match_classes
from ..datasets.prompts import check_classes, check_template, classes_from_folder, load_descriptions, load_templates
from ..encoders.base import Encoder, ImageEncoding
from ..encoders.pipeline import Failure
from ..errors import ClipxferError
from ..heads.zeroshot import ZeroShotHead, fit_zeroshot
from ..images import find_images, is_image_path
from ..metrics import classification_report
from ..paths import path_text

SPLIT_FOLDERS = ("train", "test")


@dataclass
class Classification:
    """The outcome of classifying a set of images with a zero-shot head.

    ``paths`` name the images in order, ``probs`` is ``(n, num_classes)``; ``labels`` holds the true
    class index per image when the source was labelled (else None) and ``report`` its metrics
    (:func:`clipxfer.metrics.classification_report`).
    """

    source: str
    paths: list[str]
    probs: np.ndarray
    head: ZeroShotHead
    labels: np.ndarray | None = None
    report: dict | None = None
    templates: str = ""
    #: Prediction sets, once :func:`conformalize` has run.
    conformal: ConformalSets | None = None
    #: Unreadable images left out (path and reason), as ``clipxfer index`` skips them.
    skipped: list[Failure] = field(default_factory=list)

    @property
    def classnames(self) -> list[str]:
        return self.head.classnames

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, probabilities)`` of the ``k`` most probable classes per image, best first."""
        k = max(1, min(k, self.probs.shape[1]))
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.probs, order, axis=1)

    def table(self, k: int = 3) -> pd.DataFrame:
        """One row per image: ``path``, ``label`` (labelled sources only), then ``pred_1, prob_1, ...,
        pred_k, prob_k``."""
        order, values = self.top_k(k)
        names = np.asarray(self.classnames, dtype=object)
        columns: dict[str, object] = {"path": [path_text(p) for p in self.paths]}  # any file name
        if self.labels is not None:
            columns["label"] = names[self.labels]
        for rank in range(order.shape[1]):
            columns[f"pred_{rank + 1}"] = names[order[:, rank]]
            columns[f"prob_{rank + 1}"] = values[:, rank].round(6)
        if self.conformal is not None:
            columns["set"] = ["|".join(names) for names in self.conformal.set_names(self.classnames)]
            if self.conformal.reject:
                columns["decision"] = self.conformal.decisions(self.classnames)
        return pd.DataFrame(columns)

    def predicted_counts(self) -> dict[str, int]:
        """How many images went to each class (top-1)."""
        counts = np.bincount(self.probs.argmax(axis=1), minlength=len(self.classnames))
        return {name: int(c) for name, c in zip(self.classnames, counts)}

    def summary(self, k: int = 3, include_predictions: bool | None = None) -> dict:
        """The JSON object ``clipxfer classify --json`` prints (keys documented there).

        Per-image predictions are included for unlabelled sources unless ``include_predictions``
        says otherwise."""
        report = self.report or {}
        summary = {
            "source": self.source,
            "model": self.head.model_id,
            "classes": self.classnames,
            "templates": self.templates,
            "num_templates": len(self.head.config["templates"]),
            "num_descriptions": sum(len(v) for v in self.head.config.get("descriptions", {}).values()),
            "n": len(self.paths),
            "labelled": self.labelled,
            "skipped": [{"path": path_text(f.path), "reason": f.reason} for f in self.skipped],
        }
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "ece", "mean_confidence",
                    "per_class_recall", "support", "confusion_matrix"):  # fmt: skip
            summary[key] = report.get(key)
        summary["predicted_counts"] = self.predicted_counts()
        summary["conformal"] = self.conformal.summary() if self.conformal is not None else None
        if include_predictions if include_predictions is not None else not self.labelled:
            order, values = self.top_k(k)
            summary["predictions"] = [
                {"path": path, "top": [[self.classnames[i], round(float(p), 6)] for i, p in zip(row, probs)]}
                for path, row, probs in zip(self.paths, order, values)
            ]
            if self.conformal is not None:
                names = self.conformal.set_names(self.classnames)
                decisions = self.conformal.decisions(self.classnames)
                for item, names_i, decision in zip(summary["predictions"], names, decisions):
                    item["set"] = names_i
                    if self.conformal.reject:
                        item["decision"] = decision
        return summary

    def save_table(self, path: str | os.PathLike, k: int = 3) -> Path:
        """Write :meth:`table` as CSV."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.table(k).to_csv(path, index=False)
        except OSError as exc:
            raise ClipxferError(f"{path}: cannot write the predictions ({exc.strerror})") from None
        return path

    def plot_confusion(self, path: str | os.PathLike) -> Path:
        """Write the confusion-matrix figure; only labelled sources have one."""
        from ..plots import plot_confusion_matrix

        if self.report is None:
            raise ClipxferError(
                f"{self.source}: the images have no labels, so there is no confusion matrix to plot; "
                "put them in one subfolder per class"
            )
        title = f"{Path(self.source).name}: accuracy {self.report['accuracy']:.3f}"
        return plot_confusion_matrix(np.asarray(self.report["confusion_matrix"]), self.classnames, path, title)


def build_head(
    encoder: Encoder,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "simple",
    descriptions: str | os.PathLike | dict | None = None,
    progress: bool = False,
) -> ZeroShotHead:
    """The zero-shot head for ``classnames``; ``templates`` is a set name, a file or a list, and
    ``descriptions`` a CSV/JSON file or a ``class -> sentences`` dict."""
    check_classes(list(classnames), "classes")
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    for template in template_list:
        check_template(template, "templates")
    if isinstance(descriptions, (str, os.PathLike)):
        descriptions = load_descriptions(descriptions, list(classnames))
    return fit_zeroshot(encoder, list(classnames), template_list, descriptions, progress=progress)


def _finish(source, paths, encoding: ImageEncoding, head: ZeroShotHead, labels, templates,
            transductive: bool = False) -> Classification:
    if transductive:  # TransCLIP over this batch, starting from the zero-shot probabilities
        from ..heads.transclip import TransCLIPHead

        probs = TransCLIPHead.wrap(head).predict_proba(encoding)
    else:
        probs = head.predict_proba(encoding)
    report = classification_report(labels, probs, head.classnames) if labels is not None else None
    name = templates if isinstance(templates, str) else f"{len(head.config['templates'])} templates"
    return Classification(str(source), [str(p) for p in paths], probs, head, labels, report, name)


def _is_class_layout(folder: Path) -> bool:
    """True when ``folder`` has subfolders and no images directly in it (an ImageFolder)."""
    subfolders = [p for p in folder.iterdir() if p.is_dir()]
    loose = [p for p in folder.iterdir() if p.is_file() and is_image_path(p)]
    return bool(subfolders) and not loose


def layout_classes(folder: Path) -> list[str]:
    """Class folder names, looking through a train/test level, exactly as :func:`from_image_folder`
    reads them (so a labelled folder's classes always map onto the given ones)."""
    top = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if any(name in SPLIT_FOLDERS for name in top):
        return sorted({p.name for s in top if s in SPLIT_FOLDERS for p in (folder / s).iterdir() if p.is_dir()})
    return top


def classify_folder(
    encoder: Encoder,
    folder: str | os.PathLike,
    classes: Sequence[str] | None = None,
    templates: str | Sequence[str] = "simple",
    descriptions: str | os.PathLike | dict | None = None,
    progress: bool = False,
    transductive: bool = False,
    fail_fast: bool = False,
) -> Classification:
    """Classify every image below ``folder`` (with ``transductive``: TransCLIP over all of them).
    Unreadable images are left out and listed in ``skipped`` (``fail_fast``: the first one is an error).

    Without ``classes`` the folder must be an ImageFolder and its subfolder names are the classes.
    With ``classes``, a folder whose class subfolders are all among them is evaluated as labelled;
    any other folder is classified without metrics. Encodings are cached (``encode_dataset``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipxferError(f"{folder}: not a folder; give a folder of images or --index PATH")
    if classes is not None:
        check_classes(list(classes), "--classes")
    labelled = _is_class_layout(folder) and (classes is None or not match_classes(layout_classes(folder), classes)[1])
    if classes is None and not labelled:
        if next(find_images(folder), None) is None:
            raise ClipxferError(f"{folder}: no images found (looked for .jpg, .png, .webp, ... recursively)")
        classes_from_folder(folder)  # raises when there are no class subfolders at all
        raise ClipxferError(
            f"{folder}: images lie directly in the folder next to class subfolders; give --classes, "
            "or move every image into its class's subfolder"
        )
    if labelled:
        dataset = from_image_folder(folder)
        classnames = list(classes) if classes is not None else dataset.classnames
        index, _ = match_classes(dataset.classnames, classnames)  # 'ankle_boot' is the class 'ankle boot'
        kept, encoding, skipped = encode_readable(encoder, dataset, progress, fail_fast)
        labels = np.array([index[dataset.classnames[label]] for label in dataset.labels[kept]], dtype=np.int64)
        paths = [str(dataset.sources[i]) for i in kept]
    else:
        skipped = None if fail_fast else []
        paths, encoding = encode_folder(encoder, folder, progress, why="looked for .jpg, .png, .webp, ... recursively",
                                        skipped=skipped)
        classnames, labels = list(classes), None
    head = build_head(encoder, classnames, templates, descriptions, progress)
    result = _finish(folder, paths, encoding, head, labels, templates, transductive)
    result.skipped = list(skipped or [])
    return result


def folder_label(path: str | os.PathLike, root: str | os.PathLike | None) -> str | None:
    """The class folder of an indexed image (``root/cat/x.jpg`` -> ``cat``; a ``train``/``test``
    level is looked through), or None for an image directly in the root or outside it."""
    path = Path(path)
    if root is not None:
        try:
            path = path.relative_to(root) if path.is_absolute() else path
        except ValueError:
            return None
    parts = path.parts[:-1]
    if len(parts) > 1 and parts[0] in SPLIT_FOLDERS:
        return parts[1]
    return parts[0] if parts else None


def classify_index(
    index_path: str | os.PathLike | None,
    classes: Sequence[str] | None = None,
    templates: str | Sequence[str] = "simple",
    descriptions: str | os.PathLike | dict | None = None,
    model: str | Encoder | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
    transductive: bool = False,
) -> Classification:
    """Classify the images of an index from its stored vectors (no re-encoding); with
    ``transductive``, TransCLIP refines the zero-shot predictions over all of them.

    ``model`` (a spec or an encoder) defaults to the index's model; another one is refused. When
    every image lies in a class subfolder of the index root whose name is a class (or ``classes``
    is omitted and those folder names are taken as the classes), the result is labelled and has
    metrics.
    """
    from ..index import Index

    with Index.open(index_path) as index:
        encoder = index.encoder(model, device, precision)
        paths, encoding = index.load_encoding()
        root, where = index.root, index.path
    if len(paths) == 0:
        raise ClipxferError(f"index {where} holds no images; add some with 'clipxfer index'")
    folders = [folder_label(p, root) for p in paths]
    if classes is None:
        if any(f is None for f in folders):
            raise ClipxferError(f"index {where}: give --classes (its images are not all in class subfolders of {root})")
        classes = sorted(set(folders))
        if len(classes) < 2:
            raise ClipxferError(f"index {where}: its images are in {len(classes)} class folder(s); give --classes")
    labels = None
    index_of, outside = match_classes(sorted({f for f in folders if f is not None}), classes)
    if not outside and all(f is not None for f in folders):
        labels = np.array([index_of[f] for f in folders], dtype=np.int64)
    head = build_head(encoder, list(classes), templates, descriptions, progress)
    return _finish(where, paths, encoding, head, labels, templates, transductive)


def conformalize(
    result: Classification,
    alpha: float,
    calibrate: str | os.PathLike | None = None,
    score: str = "aps",
    reject: bool = False,
    encoder: Encoder | None = None,
    seed: int = 0,
) -> ConformalSets:
    """Add prediction sets at level ``alpha`` to ``result`` (and return them).

    Calibrated on ``calibrate`` (labelled images of the same classes) when given; otherwise a
    labelled ``result`` is split in seeded halves, one calibrating and the other measuring coverage.
    """
    check_alpha(alpha, "--conformal")  # a bad value is named before any calibration work
    evaluate_rows = None
    if calibrate is not None:
        if encoder is None:
            from ..encoders import cached_encoder
            from ..encoders.ids import spec_for_id

            encoder = cached_encoder(spec_for_id(result.head.model_id))
        calibration = calibrate_on_dataset(encoder, result.head, calibrate)
    elif result.labels is not None:
        calibrate_rows, evaluate_rows = split_for_calibration(len(result.paths), seed)
        calibration = ClassifierCalibration.from_probs(
            result.probs[calibrate_rows], result.labels[calibrate_rows],
            f"a random half of {result.source} ({len(calibrate_rows)} images, seed {seed})",
        )
    else:
        raise ClipxferError(
            f"{result.source}: --conformal needs labelled images to calibrate on: pass --calibrate DATA "
            "(class folders or a CSV manifest of the same classes)"
        )
    sets = conformal_sets(result.probs, calibration, alpha, score, reject)
    if result.labels is not None:
        sets.evaluate(result.labels, evaluate_rows)
    result.conformal = sets
    return sets
