"""``run_finetune``: draw the shots, fine-tune, score against zero-shot on the test set, save the adapter
beside its drawn manifest."""

from __future__ import annotations

import os
import time
from typing import Any

from ..datasets.features import encode_dataset
from ..datasets.labelled import LabelledImages, check_classes
from ..encoders.base import Encoder
from ..encoders.ids import base_of
from ..errors import ClipxferError
from ..fewshot.inputs import TrainingInputs, manifest_path_for
from ..fewshot.run import accuracy
from ..fewshot.task import FewShotTask
from ..heads.finetune import FinetuneHead
from .head import fit_finetune_head
from .settings import make_settings


def run_finetune(
    data: str | os.PathLike | LabelledImages,
    shots: int,
    seed: int = 0,
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
    **settings: Any,
) -> dict[str, Any]:
    """Fine-tune the encoder on ``shots`` images per class of ``data`` and score it against the
    zero-shot head of the plain encoder on the same test set; write the adapter (and the drawn
    manifest beside it) unless ``save=False``. ``settings``: :class:`FinetuneSettings` fields. The
    other parameters are the fields of :class:`~clipxfer.fewshot.inputs.TrainingInputs`, documented there.

    Ctrl-C during training saves the best epoch so far, then re-raises ``KeyboardInterrupt``.
    Returns ``method, variant, shots, seed, accuracy, zeroshot_accuracy, val_accuracy, wise_alpha,
    best_epoch, epochs_run, fit_seconds, num_classes, num_train, num_val, num_test, model,
    base_model, manifest_hash, adapter, manifest``.
    """
    checked = make_settings(**settings)  # bad settings fail before any loading or encoding
    inputs = TrainingInputs(
        data, shots, seed, model=model, encoder=encoder, out=out, templates=templates, max_test=max_test,
        device=device, precision=precision, save=save, progress=progress, classes=classes, force=force,
    )
    dataset, encoder = inputs.load()
    check_classes(dataset.classnames, dataset.name)
    if base_of(encoder.id) is not None:
        raise ClipxferError(f"model '{encoder.id}' is already fine-tuned; fine-tune its base model instead")
    path = inputs.head_path(f"finetune-{checked.strategy}", dataset)  # an existing file is refused here
    task = inputs.prepare_task(encoder, dataset)
    sources = dataset.sources
    images = ([sources[i] for i in task.split.train], [sources[i] for i in task.split.val])

    started = time.perf_counter()
    head = fit_finetune_head(task.data, images, progress=progress, **settings)
    fit_seconds = time.perf_counter() - started
    if path is not None:
        task.split.write_manifest(dataset, manifest_path_for(path))  # the manifest first, as for heads
    if head.config["interrupted"]:
        if path is not None:
            head.save(path)
        raise KeyboardInterrupt

    result = score_finetune(head, task, encoder, fit_seconds, progress)
    if path is not None:
        head.config.update({"dataset": dataset.name, "test_accuracy": result["accuracy"],
                            "zeroshot_test_accuracy": result["zeroshot_accuracy"]})
        result["adapter"] = str(head.save(path))
        result["manifest"] = str(manifest_path_for(path))
    return result


def score_finetune(head: FinetuneHead, task: FewShotTask, encoder: Encoder, fit_seconds: float,
                   progress: bool = False) -> dict[str, Any]:
    """Score the fine-tuned ``head`` (the test images encoded by its adapted encoder) and the plain
    encoder's zero-shot head on the task's test set: :func:`run_finetune`'s result, nothing saved yet."""
    dataset = task.dataset
    test = encode_dataset(head.encoder, dataset.subset(task.split.test), progress=progress)
    return {
        "method": "finetune",
        "variant": head.config["variant"],
        "shots": task.data.shots,
        "seed": task.data.seed,
        "accuracy": accuracy(head, test, task.test_labels),
        "zeroshot_accuracy": accuracy(task.data.zeroshot, task.test, task.test_labels),
        "val_accuracy": head.config["val_accuracy"],
        "wise_alpha": head.config["wise_alpha"],
        "best_epoch": head.config["best_epoch"],
        "epochs_run": head.config["epochs_run"],
        "fit_seconds": round(fit_seconds, 2),
        "num_classes": len(dataset.classnames),
        "num_train": int(len(task.split.train)),
        "num_val": int(len(task.split.val)),
        "num_test": int(len(task.split.test)),
        "model": head.model_id,
        "base_model": encoder.id,
        "dataset": dataset.name,
        "manifest_hash": task.data.manifest_hash,
        "adapter": None,
        "manifest": None,
    }
