"""Few-shot transfer, end to end: a drawn task -> fitted head -> accuracy on the held-out test set,
and the head saved beside its drawn manifest. The commands ``clipxfer probe|tip|coop|mix|lpp|clap``
are thin layers over :func:`run_transfer`; the benchmark calls the same pieces."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..calibrate.sets import calibrate_on
from ..datasets.labelled import LabelledImages
from ..encoders.base import Encoder, ImageEncoding
from ..errors import ClipxferError
from ..heads.base import Head
from ..heads.fitting import FEW_SHOT_METHODS, fit_head
from ..metrics import classification_report
from .inputs import TrainingInputs, manifest_path_for
from .task import FewShotTask


def accuracy(head: Head, encoding: ImageEncoding, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``head`` on encoded images."""
    return float((head.predict(encoding) == labels).mean()) if len(labels) else float("nan")


def score(head: Head, encoding: ImageEncoding, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, plus clipxfer.metrics' report (macro accuracy and friends)."""
    result: dict[str, Any] = {"accuracy": accuracy(head, encoding, labels)}
    report = classification_report(labels, head.predict_proba(encoding), head.classnames)
    if isinstance(report, dict):
        result["report"] = report
    return result


def run_transfer(
    method: str,
    data: str | os.PathLike | LabelledImages,
    shots: int,
    seed: int = 0,
    model: str | None = None,
    encoder: Encoder | None = None,
    out: str | os.PathLike | None = None,
    templates: str | list[str] = "simple",
    index_path: str | os.PathLike | None = None,
    max_test: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    save: bool = True,
    progress: bool = False,
    classes: list[str] | None = None,
    transductive: bool = False,
    force: bool = False,
    **options,
) -> dict[str, Any]:
    """Fit ``method`` on ``shots`` images per class of ``data`` and score it against zero-shot on
    the same test set; save the head (and the drawn manifest next to it) unless ``save=False``.
    With ``transductive``, the head is wrapped in TransCLIP (:mod:`clipxfer.heads.transclip`):
    it is scored on the test set as one batch, and the saved head refines every batch it predicts.
    ``options`` go to the method's fit (:func:`~clipxfer.heads.fitting.fit_head`).

    The other parameters are the fields of :class:`~clipxfer.fewshot.inputs.TrainingInputs`, documented
    there (``classes`` fixes the class list and order of a folder or manifest; ``force`` overwrites an
    existing head file, which is otherwise refused before any work; the default file name is
    :func:`output_name`'s). Returns ``method, shots, seed, accuracy, zeroshot_accuracy, val_accuracy, fit_seconds,
    num_classes, num_train, num_val, num_test, model, manifest_hash, head, manifest, options``.
    """
    if method not in FEW_SHOT_METHODS:
        raise ClipxferError(f"unknown method '{method}': use one of {', '.join(FEW_SHOT_METHODS)}")
    inputs = TrainingInputs(
        data, shots, seed, model=model, encoder=encoder, out=out, templates=templates, index_path=index_path,
        max_test=max_test, device=device, precision=precision, save=save, progress=progress, classes=classes,
        force=force,
    )
    dataset, encoder = inputs.load()
    head_path = inputs.head_path(output_name(method, options, transductive), dataset)
    task = inputs.prepare_task(encoder, dataset)

    start = time.perf_counter()
    head = fit_head(method, task.data, **options)
    if transductive:
        from ..heads.transclip import TransCLIPHead

        head = TransCLIPHead.wrap(head, task.data)
    fit_seconds = time.perf_counter() - start

    return score_and_save(method, head, task, encoder, fit_seconds, head_path, options)


def output_name(method: str, options: dict[str, Any], transductive: bool = False) -> str:
    """The method and variant a default head file is named by: ``tip`` and ``tipf`` (``--finetune``),
    ``mix-probe`` and ``mix-coop``, ``meta-probe`` (``--init``), ``-trans`` with ``--transductive``."""
    name = method
    if method == "tip" and options.get("finetune"):
        name = "tipf"
    elif method == "mix":
        name = f"mix-{options.get('base') or 'probe'}"
    if options.get("init"):
        name = f"meta-{name}"
    return f"{name}-trans" if transductive else name


def score_and_save(
    method: str,
    head: Head,
    task: FewShotTask,
    encoder: Encoder,
    fit_seconds: float,
    head_path: Path | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Score ``head`` and the zero-shot head on the task's test set and, with a ``head_path``,
    save the drawn manifest and then the head beside it. Returns the result object of the
    training commands (see :func:`run_transfer`)."""
    dataset = task.dataset
    zeroshot_scores = score(task.data.zeroshot, task.test, task.test_labels)
    scores = score(head, task.test, task.test_labels)
    result: dict[str, Any] = {
        "method": method,
        "variant": head.config.get("variant", method),
        "shots": task.data.shots,
        "seed": task.data.seed,
        "accuracy": scores["accuracy"],
        "zeroshot_accuracy": zeroshot_scores["accuracy"],
        "val_accuracy": head.config.get("val_accuracy"),
        "fit_seconds": round(fit_seconds, 4),
        "num_classes": len(dataset.classnames),
        "num_train": int(len(task.split.train)),
        "num_val": int(len(task.split.val)),
        "num_test": int(len(task.split.test)),
        "model": encoder.id,
        "dataset": dataset.name,
        "manifest_hash": task.data.manifest_hash,
        "options": dict(options),
        "head": None,
        "manifest": None,
    }
    if "report" in scores:
        result["report"] = scores["report"]
    if len(task.data.val_labels):
        # Validation images were not fitted on: they calibrate 'predict --conformal' later.
        head.config["calibration"] = calibrate_on(
            head, task.data.val, task.data.val_labels, f"validation split ({len(task.data.val_labels)} images)"
        ).to_config()
    if head_path is not None:
        head.config.update(
            {"dataset": dataset.name, "test_accuracy": scores["accuracy"], "zeroshot_test_accuracy": zeroshot_scores["accuracy"]}
        )
        # The manifest first: a head on disk always has its manifest beside it.
        manifest_path = task.split.write_manifest(dataset, manifest_path_for(head_path))
        result["head"] = str(head.save(head_path))
        result["manifest"] = str(manifest_path)
    return result
