"""LP++ (Huang, Shakeri, Dolz, Boudiaf, Bahig, Ben Ayed; CVPR 2024): a linear probe plus
class-wise blending with the text weights, trained without a validation search.

    logits = normalize(features) @ W.T + b + alpha * (embeddings @ T.T)

``T`` are the zero-shot class weights (unit rows, no logit scale) and ``alpha`` holds one weight per
class. Training is full-batch block-coordinate descent on the mean cross-entropy:

* ``W`` starts at the per-class sums of the shots' features (the reference's centroids), ``b`` at 0,
  and takes momentum-SGD steps of size ``lr_w = 4 N / lambda_max(F^T F)`` (a bound on the curvature of
  the loss in ``W``, so no learning rate is searched);
* ``alpha`` starts at ``250 * mean_{shots i, classes c} (e_i . t_c)`` for every class, and every
  :data:`ALPHA_EVERY` steps takes one gradient step of size
  ``lr_alpha = N / (4 max_c sum_i (e_i . t_c)^2)``.

Everything is a closed-form function of the shots, so ``fit`` uses no validation images; it runs
a fixed number of epochs and keeps the last iterate. The visual part acts on the probe features
(``lite``: the 1280-d backbone; CLIP models: the embeddings themselves, exactly the reference).
The fitted head is linear (``embedding_weights = alpha * T``), so it saves, mixes and predicts like
the probe. What differs from the authors' code is in docs/methods.md.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import ClipxferError
from .base import FewShotData, fit_provenance, register_head
from .linear import LinearHead, probe_inputs, val_score

#: Full-batch epochs (the reference's ``train_epoch`` for its published numbers).
DEFAULT_EPOCHS = 300
#: ``alpha`` is updated once per this many ``W`` steps (the reference's schedule).
ALPHA_EVERY = 10
#: The reference's scale of the initial text blending weight.
ALPHA_INIT_SCALE = 250.0
MOMENTUM = 0.9
ALPHA_RULES = ("fit", "reference")


def lr_visual(features: np.ndarray) -> float:
    """``4 N / lambda_max(F^T F)``: the visual step size from the Lipschitz bound of the loss."""
    x = np.asarray(features, dtype=np.float64)
    top = float(np.linalg.norm(x, ord=2)) ** 2  # largest eigenvalue of F^T F = top singular value^2
    return 4.0 * len(x) / max(top, 1e-12)


def lr_alpha(text_logits: np.ndarray) -> float:
    """``N / (4 max_c sum_i (e_i . t_c)^2)``: the step size of the blending weights."""
    t = np.asarray(text_logits, dtype=np.float64)
    return len(t) / (4.0 * max(float((t**2).sum(axis=0).max()), 1e-12))


def init_alpha(text_logits: np.ndarray, labels: np.ndarray, num_classes: int, rule: str = "fit") -> float:
    """The starting blend weight, one number for every class.

    ``rule="reference"``: ``250 *`` the mean text logit of the shots (the authors' heuristic, tuned
    for CLIP, where that lands near CLIP's own logit scale). ``rule="fit"`` (default): the scale
    ``a`` that minimises the shots' cross-entropy under ``a * text_logits`` alone (a 1-D convex
    problem), i.e. the temperature at which the text prior explains the shots best; a weak prior
    (``lite``) starts weak, a strong one strong."""
    t = np.asarray(text_logits, dtype=np.float64)
    if rule == "reference":
        sums = np.zeros((num_classes, t.shape[1]))
        np.add.at(sums, labels, t)
        counts = np.maximum(np.bincount(labels, minlength=num_classes), 1)[:, None]
        return ALPHA_INIT_SCALE * float((sums / counts).mean())
    from scipy.optimize import minimize_scalar

    def loss(scale: float) -> float:
        z = scale * t
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]).mean())

    return float(minimize_scalar(loss, bounds=(0.0, 10 * ALPHA_INIT_SCALE), method="bounded").x)


def class_sums(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, d)``: the sum of each class's feature rows (the reference initialises W so)."""
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, np.asarray(features, dtype=np.float64))
    return sums


def softmax_gradient(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``labels`` under ``logits`` and its gradient ``(P - Y) / N``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(-np.log(np.clip(probs[rows, labels], 1e-300, None)).mean())
    probs[rows, labels] -= 1.0
    return loss, probs / len(labels)


# Small matrices gain nothing from BLAS threads, and on a loaded machine two spinning threads
# made the loop 25x slower (26 s instead of 1 s for 160 x 1280 on 2 busy cores).
@threadpool_limits.wrap(limits=1, user_api="blas")
def fit_lpp(
    features: np.ndarray,
    text_logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int = DEFAULT_EPOCHS,
    alpha_every: int = ALPHA_EVERY,
    alpha_rule: str = "fit",
) -> dict[str, np.ndarray | float]:
    """Train LP++ on ``features`` (unit rows, ``(N, d)``), ``text_logits`` (``(N, C)``:
    embeddings @ T.T) and integer ``labels``. Returns ``W (C, d)``, ``b (C,)``, ``alpha (C,)``,
    the two step sizes and the final loss. Deterministic: full batch, float64, no randomness.

    ``W, b`` follow heavy-ball SGD (``v = 0.9 v + g; p -= lr_w v``, PyTorch's form). ``alpha``'s
    gradient is summed from the first epoch and never reset, as in the reference, and every
    ``alpha_every`` epochs ``alpha -= lr_alpha * summed_gradient``."""
    x = np.asarray(features, dtype=np.float64)
    t = np.asarray(text_logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    step_w, step_alpha = lr_visual(x), lr_alpha(t)
    weight = class_sums(x, y, num_classes)
    bias = np.zeros(num_classes)
    alpha = np.full(num_classes, init_alpha(t, y, num_classes, alpha_rule))
    velocity_w, velocity_b, alpha_grad = np.zeros_like(weight), np.zeros_like(bias), np.zeros_like(alpha)
    loss = float("nan")
    for epoch in range(epochs):
        loss, grad = softmax_gradient(x @ weight.T + bias + alpha * t, y)
        alpha_grad += (grad * t).sum(axis=0)
        velocity_w = MOMENTUM * velocity_w + grad.T @ x
        velocity_b = MOMENTUM * velocity_b + grad.sum(axis=0)
        weight -= step_w * velocity_w
        bias -= step_w * velocity_b
        if (epoch + 1) % alpha_every == 0:
            alpha = alpha - step_alpha * alpha_grad
    return {"W": weight, "b": bias, "alpha": alpha, "lr_w": step_w, "lr_alpha": step_alpha, "loss": loss}


@register_head
class LPPHead(LinearHead):
    """LP++: a linear probe blended class-wise with the text weights; see the module docstring."""

    method = "lpp"
    needs_validation = False  # settings come from the shots (module docstring)

    @classmethod
    def fit(cls, data: FewShotData, epochs: int = DEFAULT_EPOCHS, alpha_init: str = "fit") -> "LPPHead":
        """Fit on ``data.train`` with the step sizes of the module docstring (no validation search);
        ``data.val`` is only scored, for the record."""
        if epochs < 1:
            raise ClipxferError(f"lpp: --epochs must be at least 1, not {epochs}")
        if alpha_init not in ALPHA_RULES:
            raise ClipxferError(f"lpp: alpha_init must be one of {', '.join(ALPHA_RULES)}, not {alpha_init!r}")
        zeroshot = data.zeroshot
        if "class_weights" not in zeroshot.weights:
            raise ClipxferError(f"lpp: the text prior must be a zero-shot head, not a {zeroshot.method} head")
        text = zeroshot.weights["class_weights"].astype(np.float64)
        num_classes = len(data.classnames)
        fitted = fit_lpp(
            probe_inputs(data.train), data.train.embeddings @ text.T, data.train_labels, num_classes, epochs,
            alpha_rule=alpha_init,
        )
        weights = {
            "feature_weights": fitted["W"],
            "bias": fitted["b"],
            "embedding_weights": fitted["alpha"][:, None] * text,
        }
        config = {
            "variant": "lpp",
            "epochs": int(epochs),
            "lr_w": fitted["lr_w"],
            "lr_alpha": fitted["lr_alpha"],
            "alpha_init": alpha_init,
            "alpha_mean": float(np.mean(fitted["alpha"])),
            "train_loss": fitted["loss"],
            **fit_provenance(data),
        }
        head = cls(data.encoder.id, data.classnames, weights, config)
        if len(data.val_labels):
            accuracy, neg_loss = val_score(head.logits(data.val), data.val_labels)
            head.config.update(val_accuracy=accuracy, val_loss=-neg_loss)
        return head
