"""WiSE-FT (Wortsman et al. 2022): the fine-tuned weights interpolated with the starting ones,
``w0 + alpha (w - w0)``, with ``alpha`` given or the best of :data:`WISE_GRID` on validation."""

from __future__ import annotations

import numpy as np
import torch

from .model import evaluate

#: alpha values tried by ``wise="auto"``.
WISE_GRID = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))


def _set_alpha(root, head, head0, start, tuned, layers, alpha: float) -> None:
    """Put ``w0 + alpha (w - w0)`` into the tower and the head (LoRA: ``B`` scaled by alpha)."""
    with torch.no_grad():
        for k in head:
            head[k].copy_(_mix(head0[k], tuned["head"][k], alpha))
        for n in start:
            root.get_parameter(n).copy_(_mix(start[n], tuned["tower"][n], alpha))
        for name, layer in layers.items():
            layer.scaling["default"] = tuned["scaling"][name] * alpha


def _mix(w0: torch.Tensor, w1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exactly ``w0`` at alpha 0 and exactly ``w1`` at alpha 1."""
    if alpha == 0.0:
        return w0
    if alpha == 1.0:
        return w1
    return w0 + alpha * (w1 - w0)


def choose_alpha(work, root, head, head0, start, layers, settings, val_px, val_labels, best_key, interrupted):
    """The WiSE alpha (given, or the best of :data:`WISE_GRID` on validation) applied to the model."""
    tuned = {
        "head": {k: v.detach().clone() for k, v in head.items()},
        "tower": {n: root.get_parameter(n).detach().clone() for n in start},
        "scaling": {name: layer.scaling["default"] for name, layer in layers.items()},
    }
    if settings.wise != "auto":
        alpha = float(settings.wise)
        _set_alpha(root, head, head0, start, tuned, layers, alpha)
        acc, loss = evaluate(work, head, val_px, val_labels) if alpha != 1.0 else (best_key[0], -best_key[1])
        return alpha, acc, loss
    if len(val_labels) == 0:
        return 1.0, float("nan"), float("nan")
    scored = []
    for alpha in WISE_GRID:
        _set_alpha(root, head, head0, start, tuned, layers, alpha)
        acc, loss = evaluate(work, head, val_px, val_labels)
        scored.append(((acc, -loss), alpha))
    # Ties go to the smaller alpha: the model closer to the pretrained one.
    (acc, neg_loss), alpha = max(scored, key=lambda item: (item[0], -item[1]))
    _set_alpha(root, head, head0, start, tuned, layers, alpha)
    return alpha, acc, -neg_loss
