"""Applying a saved head: ``clipxfer predict`` is a thin layer over :func:`predict` and
:func:`predict_sets` (conformal prediction sets)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ..calibrate.conformal import check_alpha
from ..calibrate.sets import ConformalSets, calibrate_on_dataset, conformal_sets, head_calibration
from ..datasets.features import encode_dataset, encode_folder
from ..datasets.labelled import LABEL_SEPARATOR, load_dataset
from ..encoders.base import Encoder
from ..encoders.pipeline import Failure
from ..errors import ClipxferError
from ..heads.base import Head, load_head
from .task import index_rows


def encoder_for_head(
    head_path: str | os.PathLike, model: str | None = None, device: str | None = None, precision: str | None = None
) -> Encoder:
    """The encoder ``model`` names, by default the one the head at ``head_path`` was made with."""
    from ..encoders import load_encoder
    from ..encoders.ids import spec_for_id
    from ..encoders.registry import precision_for_id
    from ..heads.base import read_head_metadata

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
    skipped: list[Failure] | None = None,
) -> tuple[Head, pd.DataFrame, np.ndarray]:
    """Classify the images of ``folder`` (or every image of the index) with a saved head; with
    ``transductive``, TransCLIP refines its predictions over all those images together (a head
    saved with ``--transductive`` always does). With a ``skipped`` list, unreadable images of
    ``folder`` are left out and appended to it (path and reason); without one the first is an error.

    Returns the head, a table ``path, label, probability`` (best class per image) and the full
    ``(n, num_classes)`` probability matrix. The model defaults to the one the head was made with.
    A multi-label head (``probe --multi-label``) gives per-label sigmoid probabilities instead, and its
    ``label`` is every label at or above that label's threshold, joined by ``|`` (empty when none is);
    ``probability`` is then the highest label probability.
    """
    if (folder is None) == (index_path is None):
        raise ClipxferError("give either a folder of images or --index PATH, not both or neither")
    if encoder is None:
        encoder = encoder_for_head(head_path, model, device, precision)
    head = load_head(head_path, model_id=encoder.id)
    if transductive and head.method != "transclip":
        from ..heads.transclip import TransCLIPHead

        head = TransCLIPHead.wrap(head)
    if index_path is not None:
        rows, encoding = index_rows(index_path, encoder)
        paths = sorted(rows, key=rows.get)  # type: ignore[arg-type]
        if encoding.features.shape[1] != encoder.feature_dim:
            raise ClipxferError(
                f"{index_path} stores no probe features for {encoder.id}; classify the folder instead of the index"
            )
    else:
        paths, encoding = encode_folder(encoder, folder, progress, skipped=skipped)  # type: ignore[arg-type]
    probs = head.predict_proba(encoding)
    best = probs.argmax(axis=1)
    if getattr(head, "multi_label", False):
        labels = label_names(head.predict(encoding), head.classnames)
    else:
        labels = [head.classnames[i] for i in best]
    table = pd.DataFrame({"path": paths, "label": labels, "probability": probs[np.arange(len(best)), best]})
    return head, table, probs


def label_names(decisions: np.ndarray, classnames: list[str]) -> list[str]:
    """0/1 decisions per label as ``a|b`` per image (the manifest's multi-label spelling)."""
    return [LABEL_SEPARATOR.join(classnames[c] for c in np.flatnonzero(row)) for row in decisions]


def predict_label_sets(
    head: Head,
    probs: np.ndarray,
    alpha: float,
    encoder: Encoder | None = None,
    calibrate: str | os.PathLike | None = None,
) -> np.ndarray:
    """Per-label conformal sets (0/1 per label, :meth:`MultiLabelProbeHead.label_sets`) of a multi-label
    head's probabilities: every label an image has is in its set with probability >= 1 - ``alpha``.
    Calibrated on the head's validation images, or on ``calibrate`` (a multi-label manifest, encoded
    with ``encoder``)."""
    from ..heads.multilabel import label_calibration

    check_alpha(alpha, "--conformal")
    if calibrate is not None:
        if encoder is None:
            raise ClipxferError("calibrating label sets on --calibrate DATA needs the head's encoder")
        dataset = load_dataset(calibrate, head.classnames, multi_label=True)
        calibration_probs = head.predict_proba(encode_dataset(encoder, dataset))
        head.config["label_calibration"] = label_calibration(dataset.targets, calibration_probs, head.classnames,
                                                             f"{calibrate} ({len(dataset)} images)")
    return head.label_sets(probs, alpha)


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
