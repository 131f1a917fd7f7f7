"""The Head interface: every transfer method (zero-shot, probe, Tip-Adapter, CoOp, mixing, ...)
is a Head, saved and loaded the same way.

A head maps an :class:`~clipxfer.encoders.ImageEncoding` (shared-space embeddings plus probe
features) to class logits. Its state is a dict of named float32 arrays plus JSON-able metadata;
on disk that is one ``.safetensors`` file whose header carries the metadata as JSON, so a head
is a single portable file and never a pickle.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..encoders.artifacts import (
    HEAD_FORMAT,
    check_model_id,
    read_artifact_metadata,
    read_artifact_tensors,
    write_artifact,
)
from ..encoders.base import Encoder, ImageEncoding
from ..errors import ClipxferError

#: method name -> Head subclass; filled by :func:`register_head`.
HEAD_TYPES: dict[str, type["Head"]] = {}


def register_head(cls: type["Head"]) -> type["Head"]:
    """Class decorator: make ``cls`` loadable by its ``method`` name."""
    HEAD_TYPES[cls.method] = cls
    return cls


@dataclass
class FewShotData:
    """Everything a few-shot method may fit on: encoded training and validation images with
    labels, the zero-shot head of the same classes (the prior most methods start from), the
    encoder (CoOp trains through its text tower), and the draw that produced the data."""

    encoder: Encoder
    classnames: list[str]
    train: ImageEncoding
    train_labels: np.ndarray
    val: ImageEncoding
    val_labels: np.ndarray
    zeroshot: "Head"
    shots: int
    seed: int
    manifest_hash: str = ""


def fit_provenance(data: FewShotData) -> dict[str, Any]:
    """The config entries every fitted head records about the draw it was fitted on."""
    return {
        "templates": data.zeroshot.config.get("templates"),
        "shots": data.shots,
        "seed": data.seed,
        "manifest_hash": data.manifest_hash,
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Head(ABC):
    """A fitted classifier over encoder outputs.

    Subclasses set ``method``, keep their arrays in ``self.weights`` and their settings in
    ``self.config`` (hyperparameters, shots, seed, manifest hash, validation score, ...), and
    implement :meth:`logits`. Few-shot methods also implement the classmethod
    ``fit(data: FewShotData, **options) -> Head`` so the CLI and the benchmark train every method
    the same way; options are method hyperparameters with sensible defaults.

    What a saved head must hold is declared, so :func:`load_head` refuses a damaged or tampered
    file in one line instead of predicting garbage (see :meth:`validate`)::

        required_tensors = {"class_weights": ("C", "E"), "bias": ("C",)}
        optional_tensors = {"ctx": None}          # None: any shape
        required_config = ("logit_scale",)

    A shape rule is a tuple with one entry per dimension: an int is that exact size; ``"C"`` is
    the number of classes; any other string is a size that must be the same wherever that
    letter appears in the head's rules (``"E"``: the embedding width, ...). Every array must be
    finite whether declared or not.
    """

    method: ClassVar[str]
    #: tensor name -> shape rule (see the class docstring); every one must be present.
    required_tensors: ClassVar[dict[str, tuple | None]] = {}
    #: tensor name -> shape rule, checked when present.
    optional_tensors: ClassVar[dict[str, tuple | None]] = {}
    #: config keys :meth:`logits` reads.
    required_config: ClassVar[tuple[str, ...]] = ()
    #: Whether ``fit`` chooses its settings on validation images (False: it fits on the shots alone,
    #: so one image per class is enough).
    needs_validation: ClassVar[bool] = True

    def __init__(self, model_id: str, classnames: list[str], weights: dict[str, np.ndarray], config: dict[str, Any]):
        self.model_id = model_id
        self.classnames = list(classnames)
        self.weights = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()}
        self.config = dict(config)

    @abstractmethod
    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        """``(n, num_classes)`` class scores for encoded images."""

    def predict_proba(self, encoding: ImageEncoding) -> np.ndarray:
        """Class probabilities (softmax of :meth:`logits`)."""
        return softmax(self.logits(encoding))

    def predict(self, encoding: ImageEncoding) -> np.ndarray:
        """Index of the most likely class per image."""
        return self.logits(encoding).argmax(axis=1)

    def validate(self, where: str) -> None:
        """Raise ClipxferError (naming ``where``) unless the arrays and config are what this
        method declares (see the class docstring). Subclasses with nested state extend this."""
        check_tensors(self.weights, self.required_tensors, self.optional_tensors, len(self.classnames), where)
        missing = [key for key in self.required_config if key not in self.config]
        if missing:
            raise ClipxferError(f"{where}: {self.method} head config lacks {', '.join(missing)}")

    def check_model(self, model_id: str) -> None:
        """Refuse features made by another encoder than the one this head was fitted on."""
        check_model_id(self.model_id, model_id, f"this {self.method} head was made")

    def metadata(self) -> dict[str, Any]:
        """Everything but the arrays, as stored in the file header."""
        return {
            "format": HEAD_FORMAT,
            "method": self.method,
            "model_id": self.model_id,
            "classes": self.classnames,
            "config": self.config,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head to ``path`` (``.safetensors`` added if missing), atomically, with the
        same permissions as every other file clipxfer writes (the umask's)."""
        return write_artifact(path, self.weights, self.metadata(), "head")


def check_tensors(
    weights: dict[str, np.ndarray],
    required: dict[str, tuple | None],
    optional: dict[str, tuple | None],
    num_classes: int,
    where: str,
) -> None:
    """Every required tensor present, every declared one of its shape rule, all values finite."""
    missing = [name for name in required if name not in weights]
    if missing:
        raise ClipxferError(f"{where}: missing tensor '{missing[0]}' (has: {', '.join(sorted(weights)) or 'none'})")
    sizes: dict[str, int] = {"C": num_classes}
    for name, rule in {**optional, **required}.items():
        if name not in weights or rule is None:
            continue
        shape = weights[name].shape
        if len(shape) != len(rule):
            raise ClipxferError(f"{where}: tensor '{name}' has shape {list(shape)}, expected {len(rule)} dimension(s)")
        for axis, (size, want) in enumerate(zip(shape, rule)):
            if isinstance(want, str):
                want = sizes.setdefault(want, size)
            if size != want:
                what = f"{num_classes} rows, one per class" if rule[axis] == "C" else f"size {want} on axis {axis}"
                raise ClipxferError(f"{where}: tensor '{name}' has shape {list(shape)}, expected {what}")
    for name, value in weights.items():
        if not np.isfinite(value).all():
            raise ClipxferError(f"{where}: tensor '{name}' holds values that are not finite (NaN or infinity)")


def read_head_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved head, without loading its arrays."""
    return read_artifact_metadata(path, "head")


def check_metadata(meta: dict[str, Any], known: dict[str, type[Head]], where: str) -> None:
    """The header fields every head needs, of the right types, or one clear error."""
    if meta.get("format") != HEAD_FORMAT:
        raise ClipxferError(f"{where}: head format {meta.get('format')!r} is not {HEAD_FORMAT!r}")
    method = meta.get("method")
    if not isinstance(method, str):
        raise ClipxferError(f"{where}: head metadata has no method name")
    if method not in known:
        raise ClipxferError(f"{where}: unknown head method '{method}' (known: {', '.join(sorted(known))})")
    if not isinstance(meta.get("model_id"), str) or not meta["model_id"]:
        raise ClipxferError(f"{where}: head metadata needs a model_id string")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 1:
        raise ClipxferError(f"{where}: head metadata needs a non-empty list of classes")
    if not all(isinstance(name, str) for name in classes):
        raise ClipxferError(f"{where}: class names must be strings, got {classes[:5]!r}")
    if not isinstance(meta.get("config"), dict):
        raise ClipxferError(f"{where}: head config must be a JSON object, not {type(meta.get('config')).__name__}")


def load_head(path: str | os.PathLike, model_id: str | None = None) -> Head:
    """Load any saved head, validated in full (metadata, the tensors its method declares, finite
    values); with ``model_id`` given, refuse a head made for another model."""
    known = HEAD_TYPES  # filled: importing this module imports the package, which imports every method

    meta = read_head_metadata(path)
    check_metadata(meta, known, str(path))
    weights = read_artifact_tensors(path, "head")
    head = known[meta["method"]](meta["model_id"], meta["classes"], weights, meta["config"])
    head.validate(str(path))
    if model_id is not None:
        head.check_model(model_id)
    return head
