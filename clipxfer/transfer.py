"""Few-shot transfer, end to end: labelled data -> K-shot draw -> features -> zero-shot head ->
fitted head -> accuracy on the held-out test set, and ``predict`` with a saved head.

The commands ``clipxfer probe|tip|coop|mix|lpp|clap`` and ``clipxfer predict`` are thin layers over
:func:`run_transfer` and :func:`predict`; the benchmark calls the same pieces.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .calibrate.conformal import check_alpha
from .calibrate.sets import ConformalSets, calibrate_on, calibrate_on_dataset, conformal_sets, head_calibration
from .data import LabelledImages, load_dataset
from .encoders.base import Encoder, ImageEncoding
from .errors import ClipxferError
from .features import encode_dataset, encode_folder, take
from .heads.base import HEAD_TYPES, FewShotData, Head, load_head
from .paths import safe_filename
from .sampling import FewShotSplit, draw_few_shot

#: Few-shot methods the commands train (``zeroshot`` is the baseline every run also scores).
FEW_SHOT_METHODS = ("probe", "tip", "coop", "mix", "lpp", "clap")


@dataclass
class FewShotTask:
    """A drawn few-shot problem, encoded: what a method fits on plus the test set it is scored on."""

    dataset: LabelledImages
    split: FewShotSplit
    data: FewShotData
    test: ImageEncoding
    test_labels: np.ndarray


# --------------------------------------------------------------------------- features


def _index_rows(index_path: str | os.PathLike, encoder: Encoder) -> tuple[dict[str, int], ImageEncoding]:
    """``({absolute path: row}, encoding)`` of an index made with ``encoder``'s model."""
    from .index import Index  # imported late: the index brings faiss

    index = Index.open(index_path)
    model_id = getattr(index, "model_id", None)
    if model_id is not None and model_id != encoder.id:
        raise ClipxferError(
            f"{index_path}: the index was built with model '{model_id}' but this run uses '{encoder.id}'; "
            "pass the same --model or leave out --index"
        )
    paths, encoding = index.load_encoding()
    return {str(Path(p).resolve()): i for i, p in enumerate(paths)}, encoding


def encode_items(
    encoder: Encoder,
    dataset: LabelledImages,
    indices: np.ndarray,
    index_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> ImageEncoding:
    """Embeddings and features of ``dataset`` items at ``indices``: rows of the index when the
    images are indexed (no re-encoding), else encoded once and cached on disk."""
    indices = np.asarray(indices, dtype=np.int64)
    subset = dataset.subset(indices)
    if index_path is None:
        return encode_dataset(encoder, subset, progress=progress)
    rows, stored = _index_rows(index_path, encoder)
    if stored.features.shape[1] != encoder.feature_dim:
        # An index of a model with separate probe features (lite) that did not store them:
        # heads must see the same features at fit and predict time, so encode instead.
        print(f"warning: {index_path} stores no probe features for {encoder.id}; encoding the images instead",
              file=sys.stderr)
        return encode_dataset(encoder, subset, progress=progress)
    found = [rows.get(str(Path(s).resolve())) if isinstance(s, (str, os.PathLike)) else None for s in subset.sources]
    missing = [i for i, row in enumerate(found) if row is None]
    embeddings = np.zeros((len(subset), stored.embeddings.shape[1]), np.float32)
    features = np.zeros((len(subset), stored.features.shape[1]), np.float32)
    hit = [i for i, row in enumerate(found) if row is not None]
    if hit:
        embeddings[hit] = stored.embeddings[[found[i] for i in hit]]
        features[hit] = stored.features[[found[i] for i in hit]]
    if missing:
        print(f"warning: {len(missing)} of {len(subset)} images are not in the index {index_path}; encoding them",
              file=sys.stderr)
        extra = encode_dataset(encoder, subset.subset(missing), progress=progress)
        embeddings[missing] = extra.embeddings
        features[missing] = extra.features
    # CLIP models: one array serves as both (see ImageEncoding).
    return ImageEncoding(embeddings, embeddings if stored.features is stored.embeddings else features)


# --------------------------------------------------------------------------- the task


def check_split(dataset: LabelledImages, split: FewShotSplit) -> None:
    """Every class has a training image and the test set is not empty, or one clear error."""
    counts = np.bincount(dataset.labels[split.train], minlength=len(dataset.classnames))
    empty = [name for name, count in zip(dataset.classnames, counts) if count == 0]
    if empty:
        raise ClipxferError(
            f"{dataset.name}: class(es) {', '.join(empty[:5])} have no training images; add images or remove the class"
        )
    if len(split.test) == 0:
        raise ClipxferError(
            f"{dataset.name}: no test images left after drawing {split.shots} shots per class; "
            "add images or give a 'test' split"
        )


def prepare_task(
    encoder: Encoder,
    dataset: LabelledImages,
    shots: int,
    seed: int,
    templates: str | list[str] = "simple",
    index_path: str | os.PathLike | None = None,
    max_test: int | None = None,
    val_shots: int | None = None,
    progress: bool = False,
) -> FewShotTask:
    """Draw ``shots`` per class with ``seed``, encode train/val/test and build the zero-shot head."""
    from .heads.zeroshot import fit_zeroshot
    from .prompts import load_templates

    split = draw_few_shot(dataset, shots, seed, val_shots=val_shots, max_test=max_test)
    check_split(dataset, split)
    # The test set is encoded on its own so every seed and shot count reuses one cache entry.
    test = encode_items(encoder, dataset, split.test, index_path, progress)
    pool = np.concatenate([split.train, split.val])
    pooled = encode_items(encoder, dataset, pool, index_path, progress)
    train = take(pooled, np.arange(len(split.train)))
    val = take(pooled, np.arange(len(split.train), len(pool)))
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    zeroshot = fit_zeroshot(encoder, dataset.classnames, template_list)
    data = FewShotData(
        encoder=encoder,
        classnames=list(dataset.classnames),
        train=train,
        train_labels=dataset.labels[split.train],
        val=val,
        val_labels=dataset.labels[split.val],
        zeroshot=zeroshot,
        shots=shots,
        seed=seed,
        manifest_hash=split.manifest_hash(dataset),
    )
    return FewShotTask(dataset, split, data, test, dataset.labels[split.test])


def fit_head(method: str, data: FewShotData, **options) -> Head:
    """Fit few-shot ``method`` (probe, tip, coop, mix; or zeroshot) on ``data``. Option ``init``:
    a meta-trained head (``clipxfer meta-train``) to start from (see :func:`clipxfer.meta.fit_with_init`)."""
    if method == "zeroshot":
        return data.zeroshot
    if len(data.train_labels) and not len(data.val_labels):
        raise ClipxferError(
            f"{method}: no validation images to choose its settings on (every class has a single training "
            "image); give at least two images per class, or a 'val' split in the manifest"
        )
    init = options.pop("init", None)
    if init is not None:
        from .meta import fit_with_init

        return fit_with_init(method, data, init, **options)
    if method not in HEAD_TYPES or not hasattr(HEAD_TYPES[method], "fit"):
        raise ClipxferError(f"unknown method '{method}': use one of {', '.join(FEW_SHOT_METHODS)}")
    return HEAD_TYPES[method].fit(data, **options)


def accuracy(head: Head, encoding: ImageEncoding, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``head`` on encoded images."""
    return float((head.predict(encoding) == labels).mean()) if len(labels) else float("nan")


def score(head: Head, encoding: ImageEncoding, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, plus clipxfer.metrics' report (macro accuracy and friends) when that module exists."""
    result: dict[str, Any] = {"accuracy": accuracy(head, encoding, labels)}
    try:
        from .metrics import classification_report
    except ImportError:
        return result
    report = classification_report(labels, head.predict_proba(encoding), head.classnames)
    if isinstance(report, dict):
        result["report"] = report
    return result


def default_head_path(method: str, dataset: LabelledImages, shots: int, seed: int) -> Path:
    """``<method>-<dataset>-<K>shot-seed<S>.safetensors`` in the current folder."""
    return Path(f"{safe_filename(method)}-{safe_filename(dataset.name)}-{shots}shot-seed{seed}.safetensors")


def resolve_head_path(out, method: str, dataset: LabelledImages, shots: int, seed: int) -> Path:
    """``out`` (``.safetensors`` added when missing), or the default name for this run."""
    head_path = Path(out) if out is not None else default_head_path(method, dataset, shots, seed)
    if head_path.suffix != ".safetensors":
        head_path = head_path.with_name(head_path.name + ".safetensors")
    return head_path


def manifest_path_for(head_path: Path) -> Path:
    """The drawn manifest lives next to the head: ``head.safetensors`` -> ``head.manifest.csv``."""
    return head_path.with_name(head_path.name.removesuffix(".safetensors") + ".manifest.csv")


def load_inputs(data: str | os.PathLike | LabelledImages, encoder: Encoder | None, model: str | None = None,
                device: str | None = None, precision: str | None = None,
                classes: list[str] | None = None) -> tuple[LabelledImages, Encoder]:
    """The labelled images and the encoder of a training command, each used as given or loaded:
    ``data`` a built-in name, folder or manifest (``classes`` fixing its class list), the encoder
    from ``model``, ``device`` and ``precision``."""
    dataset = data if isinstance(data, LabelledImages) else load_dataset(data, classes)
    if encoder is None:
        from .encoders import load_encoder

        encoder = load_encoder(model, device=device, precision=precision)
    return dataset, encoder


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
    **options,
) -> dict[str, Any]:
    """Fit ``method`` on ``shots`` images per class of ``data`` and score it against zero-shot on
    the same test set; save the head (and the drawn manifest next to it) unless ``save=False``.
    With ``transductive``, the head is wrapped in TransCLIP (:mod:`clipxfer.heads.transclip`):
    it is scored on the test set as one batch, and the saved head refines every batch it predicts.

    ``classes`` fixes the class list and order of a folder or manifest (unknown labels are errors).
    Returns ``method, shots, seed, accuracy, zeroshot_accuracy, val_accuracy, fit_seconds,
    num_classes, num_train, num_val, num_test, model, manifest_hash, head, manifest, options``.
    """
    if method not in FEW_SHOT_METHODS:
        raise ClipxferError(f"unknown method '{method}': use one of {', '.join(FEW_SHOT_METHODS)}")
    dataset, encoder = load_inputs(data, encoder, model, device, precision, classes)
    head_path = resolve_head_path(out, f"{method}-trans" if transductive else method, dataset, shots, seed)
    task = prepare_task(encoder, dataset, shots, seed, templates, index_path, max_test, progress=progress)

    start = time.perf_counter()
    head = fit_head(method, task.data, **options)
    if transductive:
        from .heads.transclip import TransCLIPHead

        head = TransCLIPHead.wrap(head, task.data)
    fit_seconds = time.perf_counter() - start

    return score_and_save(method, head, task, encoder, fit_seconds, head_path if save else None, options)


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


# --------------------------------------------------------------------------- predict


def encoder_for_head(
    head_path: str | os.PathLike, model: str | None = None, device: str | None = None, precision: str | None = None
) -> Encoder:
    """The encoder ``model`` names, by default the one the head at ``head_path`` was made with."""
    from .encoders import load_encoder
    from .encoders.registry import precision_for_id, spec_for_id
    from .heads.base import read_head_metadata

    meta = read_head_metadata(head_path)
    spec = model or spec_for_id(meta["model_id"])
    if model is None and "base_model_id" in (meta.get("config") or {}):  # a fine-tuning adapter is its own head
        spec = f"{spec_for_id(meta['config']['base_model_id'])}+{head_path}"
    precision = precision_for_id(meta["model_id"], precision)  # an int8 head reloads its int8 encoder
    return load_encoder(spec, device=device, precision=precision)


def predict(
    head_path: str | os.PathLike,
    folder: str | os.PathLike | None = None,
    index_path: str | os.PathLike | None = None,
    model: str | None = None,
    encoder: Encoder | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
    transductive: bool = False,
) -> tuple[Head, pd.DataFrame, np.ndarray]:
    """Classify the images of ``folder`` (or every image of the index) with a saved head; with
    ``transductive``, TransCLIP refines its predictions over all those images together (a head
    saved with ``--transductive`` always does).

    Returns the head, a table ``path, label, probability`` (best class per image) and the full
    ``(n, num_classes)`` probability matrix. The model defaults to the one the head was made with.
    """
    if (folder is None) == (index_path is None):
        raise ClipxferError("give either a folder of images or --index PATH, not both or neither")
    if encoder is None:
        encoder = encoder_for_head(head_path, model, device, precision)
    head = load_head(head_path, model_id=encoder.id)
    if transductive and head.method != "transclip":
        from .heads.transclip import TransCLIPHead

        head = TransCLIPHead.wrap(head)
    if index_path is not None:
        rows, encoding = _index_rows(index_path, encoder)
        paths = sorted(rows, key=rows.get)  # type: ignore[arg-type]
        if encoding.features.shape[1] != encoder.feature_dim:
            raise ClipxferError(
                f"{index_path} stores no probe features for {encoder.id}; classify the folder instead of the index"
            )
    else:
        paths, encoding = encode_folder(encoder, folder, progress)  # type: ignore[arg-type]
    probs = head.predict_proba(encoding)
    best = probs.argmax(axis=1)
    table = pd.DataFrame(
        {"path": paths, "label": [head.classnames[i] for i in best], "probability": probs[np.arange(len(best)), best]}
    )
    return head, table, probs


def predict_sets(
    head: Head,
    probs: np.ndarray,
    alpha: float,
    head_path: str | os.PathLike,
    encoder: Encoder | None = None,
    calibrate: str | os.PathLike | None = None,
    score: str = "aps",
    reject: bool = False,
) -> ConformalSets:
    """Conformal prediction sets for probabilities from :func:`predict`, calibrated on the head's
    own validation images or, with ``calibrate``, on a labelled folder or manifest (which needs the
    ``encoder``)."""
    check_alpha(alpha, "--conformal")  # a bad value is named before any calibration work
    if calibrate is not None:
        calibration = calibrate_on_dataset(encoder or encoder_for_head(head_path), head, calibrate)
    else:
        calibration = head_calibration(head, str(head_path))
    return conformal_sets(probs, calibration, alpha, score, reject)
