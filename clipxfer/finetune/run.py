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
from ..fewshot.run import accuracy, manifest_path_for, resolve_head_path
from ..fewshot.task import load_inputs, prepare_task
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
    **settings: Any,
) -> dict[str, Any]:
    """Fine-tune the encoder on ``shots`` images per class of ``data`` and score it against the
    zero-shot head of the plain encoder on the same test set; write the adapter (and the drawn
    manifest beside it) unless ``save=False``. ``settings``: :class:`FinetuneSettings` fields.

    Ctrl-C during training saves the best epoch so far, then re-raises ``KeyboardInterrupt``.
    Returns ``method, variant, shots, seed, accuracy, zeroshot_accuracy, val_accuracy, wise_alpha,
    best_epoch, epochs_run, fit_seconds, num_classes, num_train, num_val, num_test, model,
    base_model, manifest_hash, adapter, manifest``.
    """
    make_settings(**settings)  # bad settings fail before any loading or encoding
    dataset, encoder = load_inputs(data, encoder, model, device, precision, classes)
    check_classes(dataset.classnames, dataset.name)
    if base_of(encoder.id) is not None:
        raise ClipxferError(f"model '{encoder.id}' is already fine-tuned; fine-tune its base model instead")
    path = resolve_head_path(out, "finetune", dataset, shots, seed)
    task = prepare_task(encoder, dataset, shots, seed, templates, max_test=max_test, progress=progress)
    sources = dataset.sources
    images = ([sources[i] for i in task.split.train], [sources[i] for i in task.split.val])

    started = time.perf_counter()
    head = fit_finetune_head(task.data, images, progress=progress, **settings)
    fit_seconds = time.perf_counter() - started
    manifest_path = manifest_path_for(path)
    if save:
        task.split.write_manifest(dataset, manifest_path)  # the manifest first, as for heads
    if head.config["interrupted"]:
        if save:
            head.save(path)
        raise KeyboardInterrupt

    test = encode_dataset(head.encoder, dataset.subset(task.split.test), progress=progress)
    result = {
        "method": "finetune",
        "variant": head.config["variant"],
        "shots": shots,
        "seed": seed,
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
    if save:
        head.config.update({"dataset": dataset.name, "test_accuracy": result["accuracy"],
                            "zeroshot_test_accuracy": result["zeroshot_accuracy"]})
        result["adapter"] = str(head.save(path))
        result["manifest"] = str(manifest_path)
    return result
