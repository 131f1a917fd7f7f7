"""Meta-learning across few-shot tasks: episodic training on a base labelled set with Reptile
(Nichol et al., 2018) or first-order MAML (Finn et al., 2017) of

(a) a residual feature adapter on frozen probe features (identity at the start, see
    :mod:`clipxfer.heads.metalearned`), adapted to each task by nearest prototype (ProtoNet loss:
    cosine to the class means of the support images, times ``scale``), and
(b) CoOp context vectors through the frozen text tower (:mod:`clipxfer.heads.coop`).

An episode is an N-way K-shot task: N base classes, K support and ``queries`` query images each.
Reptile: a few inner steps on the whole episode, then move the meta-parameters a fraction
``meta_lr`` toward the adapted ones. FOMAML: inner steps on the support set only, then the query
loss gradient at the adapted parameters updates the meta-parameters (Adam); with
``inner_steps=0`` this is a prototypical network.

To guard against meta-overfitting, a fifth of each base class is held out and scored with
validation episodes every ``eval_every`` episodes; the adapter state that scores best (the
identity included) is kept. The result is a :class:`~clipxfer.heads.metalearned.MetaHead`; new classes
are then handled by nearest prototype in adapted space, or by any method started from it
(:func:`fit_with_init`: ``probe``/``tip``/``mix`` on adapted features, ``coop`` from the context).
"""

from .settings import MetaSettings
from .train import meta_train

__all__ = ["meta_train", "MetaSettings"]
