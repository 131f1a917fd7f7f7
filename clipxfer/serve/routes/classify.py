"""Classify and score uploads: the loaded heads, ``/api/classify`` (with conformal prediction sets
for calibrated heads) and ``/api/anomaly`` (the loaded detector)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, File, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

from ...calibrate.conformal import check_alpha
from ...errors import ClipxferError
from ..state import NotFound, ServeState
from ..uploads import decode_upload, read_upload
from .search import check_k


def detector_score(detector, encoder, image) -> dict[str, Any]:
    """``{score, decision (ok|defect; unknown for a detector without a threshold), threshold}`` of one
    decoded image, like a row of ``clipxfer anomaly score --json``."""
    from ...anomaly.patches import encode_dense

    result = detector.score(encode_dense(encoder, [image], resolution=detector.map_size))
    threshold = float(detector.threshold)
    return {
        "score": round(float(result.scores[0]), 6),
        "decision": detector.decision_names(result.scores)[0],
        "threshold": threshold if np.isfinite(threshold) else None,
    }


def conformal_set(head, probs: np.ndarray, alpha: float, where: str) -> dict[str, Any] | None:
    """The conformal prediction set of one image at level ``alpha`` (``{set, conformal}``, the keys
    of ``predict --conformal --json``) when the head carries a calibration (``config["calibration"]``,
    stored by the training commands), else None. Uses :mod:`clipxfer.calibrate.sets`, as ``predict``
    does; ``alpha`` is checked by the route, so errors name the query parameter."""
    if not head.config.get("calibration"):
        return None
    try:
        from ...calibrate.sets import conformal_sets, head_calibration
    except ImportError:  # a clipxfer without classifier calibration
        return None
    sets = conformal_sets(probs[None], head_calibration(head, where), alpha)
    return {"set": sets.set_names(head.classnames)[0], "conformal": sets.summary()}


def multilabel_prediction(head, probs: np.ndarray, alpha: float, name: str) -> tuple[dict[str, Any], dict | None]:
    """One image's prediction by a multi-label head, as a row of ``predict --multi-label --json``:
    ``labels`` (every label at or above its threshold), ``probabilities`` per label, ``top_k`` and, for a
    head with a label calibration, ``set`` (per-label conformal at ``alpha``); and the conformal summary."""
    decided = probs >= head.weights["thresholds"]
    prediction = {
        "path": name,
        "labels": [n for n, keep in zip(head.classnames, decided) if keep],
        "probabilities": {n: float(p) for n, p in zip(head.classnames, probs)},
        "thresholds": {n: float(t) for n, t in zip(head.classnames, head.weights["thresholds"])},
    }
    calibration = head.config.get("label_calibration")
    if not calibration:
        return prediction, None
    in_set = head.label_sets(probs[None], alpha)[0]
    prediction["set"] = [n for n, keep in zip(head.classnames, in_set) if keep]
    return prediction, {"alpha": alpha, "method": "label-conditional", "calibration_source": calibration["source"]}


def add_classify_routes(router: APIRouter, state: ServeState) -> None:
    """Add ``/api/heads``, ``/api/classify``, ``/api/anomaly`` to ``router``."""
    @router.get("/api/heads")
    async def heads():
        """Loaded heads (and ``labelling``, the head of the labelling loop once fitted); ``multi_label``
        says which answer ``/api/classify`` gives (labels per image, or one class)."""
        loaded = dict(state.heads)
        if state.session.head is not None:
            loaded["labelling"] = state.session.head
        return [{"name": n, "method": h.method, "classes": h.classnames, "model": h.model_id,
                 "multi_label": bool(getattr(h, "multi_label", False))} for n, h in loaded.items()]

    @router.post("/api/classify")
    async def classify(file: UploadFile = File(...), head: str | None = None, k: int = 5, alpha: float = 0.1):
        """Classify an upload with a loaded head (``head`` is its file name, with or without
        ``.safetensors``): ``predict --json`` plus ``top_k`` and, for a calibrated head, the conformal
        prediction ``set`` at level ``alpha`` (coverage >= 1 - alpha). A multi-label head
        (``probe --multi-label``) answers with ``labels`` and per-label ``probabilities`` instead, and
        ``multi_label: true``; its ``set`` holds each label the image has with probability >= 1 - alpha."""
        check_alpha(alpha, "alpha")
        if head is not None:
            head = head.removesuffix(".safetensors")
        if head is None:
            if len(state.heads) != 1:
                raise ClipxferError(f"name a head with ?head= (loaded: {', '.join(state.heads) or 'none'})")
            head = next(iter(state.heads))
        if head == "labelling":
            chosen = state.session.head_for_export()
        elif head in state.heads:
            chosen = state.heads[head]
        else:
            raise NotFound(f"no head named '{head}' (loaded: {', '.join(state.heads) or 'none'}; "
                           "clipxfer serve --head FILE loads one)")
        check_k(k)
        data = await read_upload(file, state.config.max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data)
        encoding = await run_in_threadpool(state.encoder.embed_images, [image])
        probs = chosen.predict_proba(encoding)[0]
        order = np.argsort(-probs)[: min(k, len(probs))]
        name = Path(file.filename or "upload").name
        if getattr(chosen, "multi_label", False):
            prediction, conformal = multilabel_prediction(chosen, probs, alpha, name)
            prediction["top_k"] = [{"label": chosen.classnames[i], "probability": float(probs[i])} for i in order]
            return {"head": head, "method": chosen.method, "model": chosen.model_id, "classes": chosen.classnames,
                    "multi_label": True, "predictions": [prediction], "conformal": conformal}
        prediction = {
            "path": name,
            "label": chosen.classnames[order[0]],
            "probability": float(probs[order[0]]),
            "probabilities": {n: float(p) for n, p in zip(chosen.classnames, probs)},
            "top_k": [{"label": chosen.classnames[i], "probability": float(probs[i])} for i in order],
        }
        conformal = conformal_set(chosen, probs, alpha, f"head '{head}'")
        if conformal is not None:
            prediction["set"] = conformal["set"]
        result = {"head": head, "method": chosen.method, "model": chosen.model_id, "classes": chosen.classnames,
                  "predictions": [prediction]}
        if conformal is not None:
            result["conformal"] = conformal["conformal"]
        return result

    @router.post("/api/anomaly")
    async def anomaly(file: UploadFile = File(...)):
        """Anomaly score of an upload with the loaded detector (409 when none is loaded)."""
        if state.detector is None:
            raise HTTPException(409, "no detector loaded: start clipxfer serve with --detector DET.safetensors")
        data = await read_upload(file, state.config.max_upload_bytes)
        image = await run_in_threadpool(decode_upload, data)
        result = await run_in_threadpool(detector_score, state.detector, state.encoder, image)
        return {"path": Path(file.filename or "upload").name, **result}
