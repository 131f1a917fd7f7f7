"""The settings of one meta-training run: :class:`MetaSettings`, made and checked by
:func:`make_settings` before any data is loaded or encoded (as :mod:`clipxfer.finetune.settings` does
for fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ClipxferError
from .episodes import check_episode_shape

ALGOS = ("reptile", "fomaml")


@dataclass
class MetaSettings:
    """Hyperparameters of one meta-training run (see :mod:`clipxfer.metalearn`). ``meta_lr=None``
    means the algorithm's default, filled in by :meth:`check`."""

    algo: str = "reptile"
    #: An episode: ``ways`` base classes, ``shots`` support and ``queries`` query images of each.
    ways: int = 5
    shots: int = 1
    queries: int = 15
    #: Episodes of the adapter's meta-training.
    episodes: int = 300
    inner_steps: int = 5
    inner_lr: float = 1e-3
    #: Reptile's interpolation step (default 0.1) or FOMAML's Adam learning rate (default 1e-3).
    meta_lr: float | None = None
    #: Width of the residual adapter.
    hidden: int = 128
    #: Logit scale of the ProtoNet loss.
    scale: float = 10.0
    #: Also meta-train CoOp context vectors (``ctx_episodes`` episodes) when the encoder has a trainable text tower.
    context: bool = True
    ctx_episodes: int = 30
    ctx_init: str | None = "a photo of a"
    n_ctx: int = 4
    #: Base images per class to encode.
    max_per_class: int = 200
    seed: int = 0

    def check(self) -> MetaSettings:
        """Fill in the default ``meta_lr``; raise ClipxferError on the first bad value."""
        if self.algo not in ALGOS:
            raise ClipxferError(f"--algo {self.algo!r}: choose {' or '.join(ALGOS)}")
        if self.algo == "reptile" and self.inner_steps < 1:
            raise ClipxferError("reptile needs --inner-steps >= 1 (it moves toward the task-adapted parameters)")
        check_episode_shape(self.ways, self.shots, self.queries, "meta-train")
        if self.meta_lr is None:
            self.meta_lr = 0.1 if self.algo == "reptile" else 1e-3
        return self


def make_settings(**options) -> MetaSettings:
    """:class:`MetaSettings` from keyword options, checked; unknown names are one clear error."""
    known = [f.name for f in fields(MetaSettings)]
    unknown = set(options) - set(known)
    if unknown:
        raise ClipxferError(f"meta-train: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return MetaSettings(**options).check()
