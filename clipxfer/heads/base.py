"""The Head interface: every transfer method (zero-shot, probe, Tip-Adapter, CoOp, mixing, ...)
is a Head, saved and loaded the same way.

A head maps an :class:`~clipxfer.encoders.ImageEncoding` (shared-space embeddings plus probe
features) to class logits. Its state is a dict of named float32 arrays plus JSON-able metadata;
on disk that is one ``.safetensors`` file whose header carries the metadata as JSON, so a head
is a single portable file and never a pickle.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..encoders.base import Encoder, ImageEncoding
from ..encoders.registry import spec_for_id
from ..errors import ClipxferError

FORMAT = "clipxfer-head/1"
METADATA_KEY = "clipxfer"

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
    """

    method: ClassVar[str]

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

    def check_model(self, model_id: str) -> None:
        """Refuse features made by another encoder than the one this head was fitted on."""
        if model_id != self.model_id:
            raise ClipxferError(
                f"this {self.method} head was made with model '{self.model_id}' but the images were encoded "
                f"with '{model_id}': use --model {spec_for_id(self.model_id)}"
            )

    def metadata(self) -> dict[str, Any]:
        """Everything but the arrays, as stored in the file header."""
        return {
            "format": FORMAT,
            "method": self.method,
            "model_id": self.model_id,
            "classes": self.classnames,
            "config": self.config,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head to ``path`` (``.safetensors`` added if missing), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(self.weights, str(tmp), metadata={METADATA_KEY: json.dumps(self.metadata())})
        os.replace(tmp, path)
        return path


def read_head_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved head, without loading its arrays."""
    path = Path(path)
    if not path.is_file():
        raise ClipxferError(f"{path}: head file not found")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ClipxferError(f"{path}: not a clipxfer head file ({exc})") from None
    if raw is None:
        raise ClipxferError(f"{path}: a safetensors file but not a clipxfer head (no '{METADATA_KEY}' metadata)")
    return json.loads(raw)


def load_head(path: str | os.PathLike, model_id: str | None = None) -> Head:
    """Load any saved head; with ``model_id`` given, refuse a head made for another model."""
    from . import HEAD_TYPES as known  # importing the package registers every method

    meta = read_head_metadata(path)
    if meta.get("format") != FORMAT:
        raise ClipxferError(f"{path}: head format {meta.get('format')!r} is not {FORMAT!r}")
    method = meta["method"]
    if method not in known:
        raise ClipxferError(f"{path}: unknown head method '{method}' (known: {', '.join(sorted(known))})")
    with safe_open(str(path), framework="numpy") as handle:
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    head = known[method](meta["model_id"], meta["classes"], weights, meta["config"])
    if model_id is not None:
        head.check_model(model_id)
    return head
