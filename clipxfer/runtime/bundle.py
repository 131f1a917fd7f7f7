"""A loaded bundle: ``Bundle.load(DIR)`` checks the manifest, compiles the graph for the CPU, and
``bundle.predict(images)`` answers with labels, scores and conformal sets (a classifier) or
decisions, scores and anomaly maps (a detector). Needs numpy, pillow and openvino, never torch.

Images are decoded exactly as the toolkit decodes them (:mod:`clipxfer.images`): a classifier sees
the resized centre crop, a detector the whole image squashed to the input size.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ClipxferError
from ..extras import import_extra
from ..images import as_pil, load_model_input, open_image_bytes
from .manifest import read_manifest
from .sets import check_alpha, prediction_sets, threshold

#: Images per inference call: bounds memory for long lists.
BATCH = 16
UNKNOWN = "unknown"


@dataclass
class Classified:
    """A classifier's answers for ``n`` images: ``labels`` (the top class, or ``unknown`` where a
    rejecting set holds several), ``scores`` (its probability), ``probs`` ``(n, classes)``, ``sets``
    (class names per image, or None without calibration)."""

    labels: list[str]
    scores: np.ndarray
    probs: np.ndarray
    sets: list[list[str]] | None

    def rows(self) -> list[dict[str, Any]]:
        return [{"decision": label, "score": round(float(score), 6), **({"set": self.sets[i]} if self.sets else {})}
                for i, (label, score) in enumerate(zip(self.labels, self.scores))]  # fmt: skip


@dataclass
class Inspected:
    """A detector's answers: ``defect`` (bool per image), ``scores`` and ``maps`` ``(n, size, size)``;
    ``calibrated`` False when the detector has no threshold (every decision is then ``unknown``)."""

    defect: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    calibrated: bool = True

    @property
    def labels(self) -> list[str]:
        """``defect`` or ``ok`` per image, as ``anomaly score`` decides; ``unknown`` without a threshold."""
        if not self.calibrated:
            return ["unknown"] * len(self.defect)
        return ["defect" if flag else "ok" for flag in self.defect]

    def rows(self) -> list[dict[str, Any]]:
        return [{"decision": label, "score": round(float(score), 6)} for label, score in zip(self.labels, self.scores)]


def _pixels_whole(item, size: int) -> np.ndarray:
    """:func:`clipxfer.anomaly.patches.whole_image`: the full image squashed to ``size x size``."""
    from PIL import Image

    return np.asarray(as_pil(item).resize((size, size), Image.BICUBIC), dtype=np.uint8)


class Bundle:
    """An exported classifier or detector; see the module docstring."""

    def __init__(self, folder: Path, manifest: dict[str, Any], info: dict[str, Any], compiled, head=None):
        self.folder = folder
        self.manifest = manifest
        self.info = info
        self.kind: str = manifest["kind"]
        self.encoder_id: str = manifest["encoder_id"]
        self.method: str = manifest["method"]
        self.precision: str = manifest["precision"]
        self.input_size: int = int(manifest["input_size"])
        self.classes: list[str] = list(info.get("classes", []))
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._head = head.create_infer_request() if head is not None else None
        self._lock = threading.Lock()  # one request, shared: the server calls from several threads

    @classmethod
    def load(cls, folder: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Read, check (SHA-256 of every file) and compile the bundle in ``folder``."""
        folder = Path(folder)
        manifest = read_manifest(folder, verify)
        info_name = f"{manifest['kind']}.json"
        try:
            info = json.loads((folder / info_name).read_text())
        except (OSError, ValueError) as exc:
            raise ClipxferError(f"{folder / info_name}: unreadable ({exc}); export the bundle again") from None
        ov = import_extra("openvino", "runtime", "running a bundle")
        try:
            model = ov.Core().read_model(str(folder / manifest["graph"]))
            # fp32 means fp32: without the hint a CPU with bf16 would run the float layers in bf16.
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            compiled = ov.Core().compile_model(model, "CPU", config)
            head = None
            if manifest.get("head_graph"):  # int8: the quantized tower, then the head in float
                head = ov.Core().compile_model(ov.Core().read_model(str(folder / manifest["head_graph"])), "CPU", config)
        except Exception as exc:  # a graph this OpenVINO cannot read: say which and stop
            raise ClipxferError(f"{folder}: OpenVINO {ov.get_version()} cannot load this graph ({exc}); "
                                "export the bundle again") from None
        return cls(folder, manifest, info, compiled, head)

    # ------------------------------------------------------------------ inputs

    def pixels(self, item) -> np.ndarray:
        """One image (path, bytes, PIL image or array) as the graph's uint8 input."""
        if isinstance(item, (bytes, bytearray)):
            item = open_image_bytes(bytes(item), "upload")
        if self.kind == "detector":
            return _pixels_whole(item, self.input_size)
        return load_model_input(item, self.input_size)

    def _run(self, pixels: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            self._request.infer({0: np.ascontiguousarray(pixels, dtype=np.uint8)})
            outputs = [self._request.get_output_tensor(i).data.copy() for i in range(len(self._compiled.outputs))]
            if self._head is not None:
                self._head.infer(dict(enumerate(outputs)))
                outputs = [self._head.get_output_tensor(0).data.copy()]
            return outputs

    def outputs(self, images: Sequence) -> list[np.ndarray]:
        """The graph's raw outputs for ``images``, decoded and run :data:`BATCH` at a time."""
        parts = []
        for start in range(0, len(images), BATCH):
            batch = np.stack([self.pixels(item) for item in images[start : start + BATCH]])
            parts.append(self._run(batch))
        return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))] if parts else []

    # ------------------------------------------------------------------ answers

    def predict(self, images: Sequence, alpha: float | None = None, reject: bool | None = None):
        """Classify or inspect ``images``: :class:`Classified` or :class:`Inspected`. ``alpha`` and
        ``reject`` override the conformal level and rejection the bundle was exported with."""
        if not len(images):
            raise ClipxferError("no images given to predict")
        if self.kind == "detector":
            scores, maps = self.outputs(images)
            scores = scores.astype(np.float64)
            return Inspected(scores > self.threshold, scores, maps, self.info.get("threshold") is not None)
        return self.classify_logits(self.outputs(images)[0], alpha, reject)

    @property
    def threshold(self) -> float:
        """A detector's score threshold (``inf`` when its calibration was too small to flag anything)."""
        value = self.info.get("threshold")
        return math.inf if value is None else float(value)

    def classify_logits(self, logits: np.ndarray, alpha: float | None = None, reject: bool | None = None) -> Classified:
        """Probabilities, labels and sets from a classifier graph's logits."""
        logits = logits.astype(np.float32)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        labels = [self.classes[i] for i in best]
        conformal = self.info.get("conformal") or {}
        calibration = self.info.get("calibration")
        alpha = conformal.get("alpha") if alpha is None else check_alpha(alpha)
        reject = bool(conformal.get("reject", False)) if reject is None else reject
        sets = None
        if calibration and alpha is not None:
            level = threshold(calibration, alpha, conformal.get("score", "aps"))
            members = prediction_sets(probs, level, conformal.get("score", "aps"))
            sets = [[self.classes[j] for j in np.flatnonzero(row)] for row in members]
            if reject:
                labels = [names[0] if len(names) == 1 else UNKNOWN for names in sets]
        return Classified(labels, probs[np.arange(len(best)), best], probs, sets)

    def describe(self) -> dict[str, Any]:
        """What the bundle is, for ``--json`` output and the server's ``/health``."""
        about = {key: self.manifest.get(key) for key in ("kind", "method", "encoder_id", "precision", "input_size")}
        if self.kind == "classifier":
            about["classes"] = self.classes
            about["conformal"] = self.info.get("conformal")
        else:
            about["threshold"] = self.info.get("threshold")
            about["false_alarm_rate"] = self.info.get("false_alarm_rate")
        return about
