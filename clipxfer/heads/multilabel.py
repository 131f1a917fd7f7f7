"""Multi-label probe: one sigmoid (binary logistic regression) per label on the probe features, the
L2 strength chosen on validation by mAP, and one decision threshold per label chosen on validation
(the one maximising that label's F1).

    scores = normalize(features) @ W.T + b      (per-label log-odds)
    label c present  <=>  sigmoid(scores_c) >= threshold_c

Zero-shot has no sigmoid of its own; :func:`zeroshot_scores` (the zero-shot logits, per label) rank
images for mAP, and thresholds for them are chosen on validation the same way. Without validation
images (``classify --multi-label``), :func:`zeroshot_label_probabilities` turns the text scores into a
per-label sigmoid whose 0.5 means "more likely than the uniform guess".

Conformal label sets (:func:`label_calibration`, :func:`conformal_label_thresholds`): label-conditional
(Mondrian) split conformal on the probabilities of each label's *positive* validation images. Label ``c``
is in an image's set when ``p_c`` reaches the ``floor(alpha (n_c + 1))``-th smallest of those ``n_c``
probabilities, so a new image that has label ``c`` misses it with probability at most ``alpha``: the
false-negative rate is bounded per label, not only on average. A label with too few positives
(``alpha (n_c + 1) < 1``) is always in the set, which keeps the guarantee.
"""

from __future__ import annotations

import numpy as np
import torch

from ..encoders.base import ImageEncoding
from ..errors import ClipxferError
from .base import Head, register_head
from .linear import probe_inputs
from .probe import L2_GRID, row_space

METHOD = "multilabel-probe"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def zeroshot_label_probabilities(logits: np.ndarray) -> np.ndarray:
    """Per-label probabilities from zero-shot text scores: ``sigmoid(log(C * softmax_c))``, i.e.
    ``C s / (1 + C s)`` for the softmax probability ``s`` of label ``c`` among ``C`` (:func:`uniform_odds`).
    It is 0.5 exactly when the label is as likely as the uniform guess 1/C, so a threshold of 0.5 keeps
    the labels the image's text scores favour over chance; two objects in an image split the softmax
    and both pass."""
    from .base import softmax

    return uniform_odds(softmax(np.asarray(logits, dtype=np.float64)))


def uniform_odds(softmax_probabilities: np.ndarray) -> np.ndarray:
    """``C s / (1 + C s)`` per label: the sigmoid of the log-odds of softmax probability ``s`` against
    the uniform 1/C (see :func:`zeroshot_label_probabilities`)."""
    scaled = np.asarray(softmax_probabilities, dtype=np.float64) * np.shape(softmax_probabilities)[1]
    return scaled / (1.0 + scaled)


def label_calibration(targets: np.ndarray, probabilities: np.ndarray, classnames: list[str], source: str) -> dict:
    """What per-label conformal sets need, JSON-able (stored in a head's config): for each label the
    sorted probabilities of the images that have it, and where they came from."""
    positives = {name: sorted(float(p) for p in probabilities[targets[:, c].astype(bool), c])
                 for c, name in enumerate(classnames)}
    return {"method": "label-conditional", "source": source, "positives": positives}


def conformal_label_thresholds(calibration: dict, classnames: list[str], alpha: float) -> np.ndarray:
    """Per label, the probability a label needs to enter the conformal set at level ``alpha`` (see the
    module docstring); 0 for a label with too few calibration positives (always in the set)."""
    thresholds = np.zeros(len(classnames))
    for c, name in enumerate(classnames):
        scores = calibration["positives"].get(name) or []
        k = int(np.floor(alpha * (len(scores) + 1)))
        if k >= 1:
            thresholds[c] = scores[k - 1]
    return thresholds


def mean_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """mAP over labels with at least one positive."""
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def best_thresholds(targets: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per label, the probability threshold maximising F1 on these images (0.5 for a label
    without positives). Candidates are the midpoints between sorted probabilities."""
    thresholds = np.full(targets.shape[1], 0.5)
    for c in range(targets.shape[1]):
        y, p = targets[:, c].astype(bool), probabilities[:, c]
        if not y.any():
            continue
        values = np.unique(p)
        candidates = np.r_[values[0] - 1e-9, (values[1:] + values[:-1]) / 2, values[-1]]
        f1 = [(2 * (y & (p >= t)).sum()) / max(y.sum() + (p >= t).sum(), 1) for t in candidates]
        thresholds[c] = float(candidates[int(np.argmax(f1))])
    return thresholds


def fit_binary_logistic(x: np.ndarray, targets: np.ndarray, l2: float, init=None, max_iter: int = 200):
    """Full-batch L-BFGS on ``mean BCE(x @ W.T + b, Y) + l2/2 |W|^2`` (all labels at once, float64)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(targets, dtype=torch.float64)
    params = {"W": torch.zeros(yt.shape[1], xt.shape[1], dtype=torch.float64),
              "b": torch.zeros(yt.shape[1], dtype=torch.float64)}
    if init is not None:
        params = {k: v.detach().clone() for k, v in init.items()}
    for value in params.values():
        value.requires_grad_(True)
    optimizer = torch.optim.LBFGS(list(params.values()), lr=1, max_iter=max_iter, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = xt @ params["W"].T + params["b"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none").sum(1).mean()
        loss = loss + 0.5 * l2 * params["W"].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return {k: v.detach() for k, v in params.items()}


@register_head
class MultiLabelProbeHead(Head):
    """See the module docstring. ``predict`` returns 0/1 per label; ``predict_proba`` the sigmoids."""

    method = METHOD
    multi_label = True
    required_tensors = {"feature_weights": ("C", "F"), "bias": ("C",), "thresholds": ("C",)}

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        return (probe_inputs(encoding) @ self.weights["feature_weights"].T + self.weights["bias"]).astype(np.float32)

    def predict_proba(self, encoding: ImageEncoding) -> np.ndarray:
        return sigmoid(self.logits(encoding))

    def predict(self, encoding: ImageEncoding) -> np.ndarray:
        return (self.predict_proba(encoding) >= self.weights["thresholds"]).astype(np.int64)

    @classmethod
    def fit_multilabel(cls, model_id: str, classnames: list[str], train: ImageEncoding, train_targets: np.ndarray,
                       val: ImageEncoding, val_targets: np.ndarray, l2: float | None = None) -> "MultiLabelProbeHead":
        """Fit on ``train`` (targets ``(n, C)`` of 0/1); L2 swept over the probe's grid (strong to
        weak, warm-started) and chosen by validation mAP unless given; thresholds on validation."""
        if not len(val_targets):
            raise ClipxferError("multi-label probe: no validation images to choose its L2 and thresholds on")
        x_train, x_val = probe_inputs(train), probe_inputs(val)
        basis = row_space(x_train)
        x_train, x_val = x_train @ basis, x_val @ basis
        results, init = [], None
        for value in ([float(l2)] if l2 is not None else sorted(L2_GRID, reverse=True)):
            init = fit_binary_logistic(x_train, train_targets, value, init)
            val_scores = x_val @ init["W"].numpy().T + init["b"].numpy()
            results.append((mean_ap(val_targets, val_scores), value, init))
        best_map, best_l2, best = max(results, key=lambda r: (r[0], r[1]))
        weights = {"feature_weights": best["W"].numpy() @ basis.T, "bias": best["b"].numpy()}
        val_probs = sigmoid(x_val @ best["W"].numpy().T + best["b"].numpy())
        weights["thresholds"] = best_thresholds(val_targets, val_probs)
        config = {"variant": METHOD, "l2": best_l2, "val_map": best_map, "multi_label": True,
                  "label_calibration": label_calibration(val_targets, val_probs, classnames,
                                                         f"validation ({len(val_targets)} images)")}
        return cls(model_id, classnames, weights, config)

    def label_sets(self, probabilities: np.ndarray, alpha: float) -> np.ndarray:
        """0/1 per label: the per-label conformal sets at level ``alpha`` (each label the image has is
        missed with probability at most ``alpha``), from the validation calibration stored at fit."""
        calibration = self.config.get("label_calibration")
        if not calibration:
            raise ClipxferError(f"this {METHOD} head has no calibration for conformal sets; refit it with "
                                "'clipxfer probe --multi-label'")
        return (probabilities >= conformal_label_thresholds(calibration, self.classnames, alpha)).astype(np.int64)


def zeroshot_scores(zeroshot: Head, encoding: ImageEncoding) -> np.ndarray:
    """Per-label scores of a zero-shot head for multi-label ranking: its logits (scaled cosines)."""
    return zeroshot.logits(encoding)
