"""``clipxfer fit``: draw the shots, fit one method or choose one by cross-validation (``auto``),
score it against zero-shot on the held-out test set and save the head beside its drawn manifest."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from ..calibrate.sets import calibrate_on
from ..datasets.features import encode_dataset
from ..datasets.labelled import LabelledImages
from ..encoders.base import Encoder
from ..errors import ClipxferError
from ..fewshot.inputs import TrainingInputs, manifest_path_for
from ..fewshot.run import accuracy
from .candidates import CANDIDATES, ENSEMBLE
from .folds import DEFAULT_FOLDS
from .select import fit_auto, fit_candidate

#: What ``--method`` accepts besides ``auto``.
FIT_METHODS = ("auto", *CANDIDATES)


def parse_budget(text: str | float | None) -> float | None:
    """``"10m"``, ``"90s"``, ``"1h"`` or a number of seconds -> seconds (None: no budget)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        units = {"s": 1, "m": 60, "h": 3600}
        value, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
        try:
            seconds = float(value) * units[unit]
        except ValueError:
            raise ClipxferError(f"--budget {text!r}: give a time such as 90s, 10m or 1h") from None
    if not seconds > 0:
        raise ClipxferError(f"--budget must be positive, not {text!r}")
    return seconds


def run_fit(
    data: str | os.PathLike | LabelledImages,
    shots: int,
    method: str = "auto",
    seed: int = 0,
    candidates: list[str] | str | None = None,
    folds: int = DEFAULT_FOLDS,
    budget: str | float | None = None,
    transductive: bool = False,
    model: str | None = None,
    encoder: Encoder | None = None,
    out: str | os.PathLike | None = None,
    templates: str | list[str] = "simple",
    max_test: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    save: bool = True,
    progress: bool = False,
    classes: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fit ``method`` (a name of :data:`FIT_METHODS`; ``auto``: chosen by cross-validation on the
    shots, :func:`~.select.fit_auto`) on ``shots`` images per class of ``data``, score it and the
    zero-shot head on the same test set, and save the head (and the drawn manifest beside it)
    unless ``save=False``. ``transductive`` wraps the final head in TransCLIP (not fine-tuned heads).
    The other parameters are :class:`~clipxfer.fewshot.inputs.TrainingInputs` fields (``force``
    overwrites an existing head file).

    Returns ``method, chosen, variant, shots, seed, accuracy, zeroshot_accuracy, fit_seconds,
    candidates (the table: candidate, status, cv_accuracy, spread, folds, seconds, detail), folds,
    num_classes, num_train, num_val, num_test, model, dataset, head, manifest``."""
    if method not in FIT_METHODS:
        raise ClipxferError(f"unknown method '{method}': use one of {', '.join(FIT_METHODS)}")
    if folds < 2:
        raise ClipxferError(f"--folds must be at least 2, not {folds}")
    budget_s = parse_budget(budget)
    inputs = TrainingInputs(
        data, shots, seed, model=model, encoder=encoder, out=out, templates=templates, max_test=max_test,
        device=device, precision=precision, save=save, progress=progress, classes=classes, force=force,
    )
    dataset, encoder = inputs.load()
    head_path = inputs.head_path(f"{method}-trans" if transductive else method, dataset)
    task = inputs.prepare_task(encoder, dataset)
    sources = dataset.sources
    images = ([sources[i] for i in task.split.train], [sources[i] for i in task.split.val])

    started = time.perf_counter()
    table, chosen, folds_used = [], method, 0
    if method == "auto":
        result = fit_auto(task.data, images, candidates, folds, budget_s, seed,
                          log=(lambda line: print(line, file=sys.stderr)) if progress else (lambda line: None))
        head, chosen, table, folds_used = result.head, result.chosen, result.table(), result.folds
    else:
        head = fit_candidate(CANDIDATES[method], task.data, images)
    trains_encoder = getattr(head, "trains_encoder", False)
    if transductive:
        if trains_encoder:
            raise ClipxferError(f"--transductive does not wrap a fine-tuned head ({chosen}); leave it out")
        from ..heads.transclip import TransCLIPHead

        head = TransCLIPHead.wrap(head, task.data)
    fit_seconds = time.perf_counter() - started

    test = encode_dataset(head.encoder, dataset.subset(task.split.test)) if trains_encoder else task.test
    score = accuracy(head, test, task.test_labels)
    zeroshot_score = accuracy(task.data.zeroshot, task.test, task.test_labels)
    if len(task.data.val_labels) and not trains_encoder and chosen != ENSEMBLE:
        # Validation images calibrate 'predict --conformal' (an ensemble or a fine-tuned head saw them).
        head.config["calibration"] = calibrate_on(
            head, task.data.val, task.data.val_labels, f"validation split ({len(task.data.val_labels)} images)"
        ).to_config()
    out_result: dict[str, Any] = {
        "method": method, "chosen": chosen, "variant": head.config.get("variant", head.method),
        "shots": shots, "seed": seed, "accuracy": score, "zeroshot_accuracy": zeroshot_score,
        "fit_seconds": round(fit_seconds, 3), "candidates": table, "folds": folds_used,
        "num_classes": len(dataset.classnames), "num_train": int(len(task.split.train)),
        "num_val": int(len(task.split.val)), "num_test": int(len(task.split.test)), "model": encoder.id,
        "dataset": dataset.name, "head": None, "manifest": None,
    }
    if head_path is not None:
        head.config.update({"dataset": dataset.name, "test_accuracy": score, "zeroshot_test_accuracy": zeroshot_score})
        manifest = task.split.write_manifest(dataset, manifest_path_for(head_path))  # the manifest first
        out_result["head"] = str(head.save(head_path))
        out_result["manifest"] = str(manifest)
    return out_result
