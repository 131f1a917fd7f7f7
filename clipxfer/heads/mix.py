"""Weight-space mixing (WiSE-FT, Wortsman et al., CVPR 2022) of the zero-shot head with an
adapted linear head: ``W = (1 - mix) * W_zeroshot + mix * W_adapted``.

The adapted head is a probe (fitted freely, ``prior="none"``, so the mix alone decides how much
zero-shot to keep) or CoOp (class weights in the zero-shot head's own space). Both heads are
linear in the image encoding (see :mod:`clipxfer.heads.linear`), so mixing their weights is
exactly mixing their logits; the mixed head is stored as one linear head. ``mix`` is a number
in [0, 1] or ``"auto"``: the value of :data:`MIX_GRID` that scores best on validation.
"""

from __future__ import annotations

import numpy as np

from ..errors import ClipxferError
from .base import HEAD_TYPES, FewShotData, fit_provenance, register_head
from .linear import PARTS, LinearHead, linear_logits, val_score, zeroshot_parts

MIX_GRID = tuple(float(v) for v in np.round(np.linspace(0.0, 1.0, 21), 2))
BASES = ("probe", "coop")


def adapted_parts(head) -> dict[str, np.ndarray]:
    """The linear parts of an adapted head (probe: stored as such; CoOp: like zero-shot)."""
    if head.method == "coop":
        return zeroshot_parts(head)
    return {name: head.weights[name] for name in PARTS if name in head.weights}


def mix_parts(zeroshot: dict[str, np.ndarray], adapted: dict[str, np.ndarray], mix: float) -> dict[str, np.ndarray]:
    """``(1 - mix) * zeroshot + mix * adapted`` part by part (an absent part counts as zero)."""
    mixed = {}
    for name in PARTS:
        if name in zeroshot or name in adapted:
            left = zeroshot.get(name, 0.0) * (1.0 - mix)
            right = adapted.get(name, 0.0) * mix
            mixed[name] = np.asarray(left + right, dtype=np.float32)
    return mixed


@register_head
class MixHead(LinearHead):
    """A zero-shot / adapted weight-space mixture; see the module docstring."""

    method = "mix"
    required_tensors = {"embedding_weights": ("C", "E")}  # the zero-shot side is always mixed in

    @classmethod
    def fit(cls, data: FewShotData, base: str = "probe", mix: float | str = "auto", **base_options) -> "MixHead":
        """Fit the ``base`` head on ``data`` (``base_options`` go to its ``fit``), then mix it
        with ``data.zeroshot`` at ``mix`` or at the validation-best value of :data:`MIX_GRID`."""
        if base not in BASES:
            raise ClipxferError(f"mix: --base must be one of {', '.join(BASES)}, not {base!r}")
        if base == "probe":
            base_options.setdefault("prior", "none")
        adapted_head = HEAD_TYPES[base].fit(data, **base_options)
        zeroshot, adapted = zeroshot_parts(data.zeroshot), adapted_parts(adapted_head)
        if mix == "auto":
            scored = [(val_score(linear_logits(mix_parts(zeroshot, adapted, m), data.val), data.val_labels), m)
                      for m in MIX_GRID]
            # Ties go to the larger mix: the adapted head is what the shots were spent on.
            best_score, chosen = max(scored)
        else:
            chosen = float(mix)
            if not 0.0 <= chosen <= 1.0:
                raise ClipxferError(f"mix: --mix {mix} must be between 0 and 1, or auto")
            best_score = val_score(linear_logits(mix_parts(zeroshot, adapted, chosen), data.val), data.val_labels)
        config = {
            "variant": f"mix-{base}",
            "base": base,
            "mix": chosen,
            "mix_mode": "auto" if mix == "auto" else "fixed",
            "base_config": adapted_head.config,
            **fit_provenance(data),
            "val_accuracy": best_score[0],
            "val_loss": -best_score[1],
        }
        return cls(data.encoder.id, data.classnames, mix_parts(zeroshot, adapted, chosen), config)
