"""Meta-training CoOp context vectors (see :mod:`clipxfer.metalearn`): Reptile or FOMAML steps over
episodes of base classes through the frozen text tower (:mod:`clipxfer.heads.coop`)."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..encoders.base import Encoder
from .episodes import Episode, check_episode_pool, sample_episode
from .settings import MetaSettings

#: The context vectors' own step sizes; the adapter's ``inner_lr`` and ``meta_lr`` do not apply to them.
CONTEXT_INNER_LR = 2e-3
CONTEXT_META_LR = {"reptile": 0.5, "fomaml": 2e-3}

#: ``loss_of(ctx, rows, targets, classes)``: cross-entropy of image ``rows`` against the prompts of
#: ``classes`` made with context vectors ``ctx``.
ContextLoss = Callable[[torch.Tensor, np.ndarray, np.ndarray, np.ndarray], torch.Tensor]


def context_step(learner: nn.Module, outer: torch.optim.Optimizer | None, loss_of: ContextLoss, e: Episode,
                 settings: MetaSettings) -> float:
    """One episode: adapt a copy of ``learner.ctx`` (a CoOp ``PromptLearner``'s) with ``inner_steps`` Adam steps (on the support
    set for FOMAML, the whole episode for Reptile), then move ``learner.ctx`` toward it (Reptile) or
    by its query-loss gradient (FOMAML, through ``outer``). Returns the episode's query loss."""
    fast = nn.Parameter(learner.ctx.detach().clone())
    inner = torch.optim.Adam([fast], lr=CONTEXT_INNER_LR)
    fomaml = settings.algo == "fomaml"
    inner_rows = e.support if fomaml else np.concatenate([e.support, e.query])
    inner_targets = e.support_labels if fomaml else np.concatenate([e.support_labels, e.query_labels])
    for _ in range(settings.inner_steps):
        loss = loss_of(fast, inner_rows, inner_targets, e.classes)
        inner.zero_grad()
        loss.backward()
        inner.step()
    if settings.algo == "reptile":
        with torch.no_grad():
            learner.ctx.add_(CONTEXT_META_LR["reptile"] * (fast - learner.ctx))
        with torch.no_grad():
            return float(loss_of(learner.ctx, e.query, e.query_labels, e.classes))
    query_loss = loss_of(fast, e.query, e.query_labels, e.classes)
    (grad,) = torch.autograd.grad(query_loss, fast)
    outer.zero_grad()
    learner.ctx.grad = grad.detach().clone()
    outer.step()
    return float(query_loss.detach())


def train_context(
    encoder: Encoder,
    classnames: Sequence[str],
    embeddings: np.ndarray,
    labels: np.ndarray,
    settings: MetaSettings,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Meta-train CoOp context vectors (unified, class token at the end) over ``settings.ctx_episodes``
    episodes of base classes with checked ``settings``: the episode's logits are
    ``logit_scale * image @ text[episode classes].T``."""
    from ..heads.coop import PromptLearner, text_tower

    tower = text_tower(encoder)
    generator = torch.Generator().manual_seed(settings.seed)
    learner = PromptLearner(tower, classnames, settings.n_ctx, settings.ctx_init, "end", False, generator)
    scale = float(encoder.logit_scale)
    classes = check_episode_pool(labels, settings.ways, settings.shots, settings.queries, "meta-train")
    rng = np.random.default_rng(settings.seed + 2)
    emb = torch.as_tensor(embeddings, device=tower.device)
    outer = torch.optim.Adam([learner.ctx], lr=CONTEXT_META_LR["fomaml"]) if settings.algo == "fomaml" else None

    def loss_of(ctx: torch.Tensor, rows: np.ndarray, targets: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
        original = learner.ctx
        learner.ctx = ctx  # type: ignore[assignment]  # evaluate the prompts with these context vectors
        try:
            text = tower.encode(learner(), learner.ids, learner.mask)[torch.as_tensor(chosen, device=tower.device)]
        finally:
            learner.ctx = original
        logits = scale * emb[torch.as_tensor(rows, device=tower.device)] @ text.T
        return nn.functional.cross_entropy(logits, torch.as_tensor(targets, device=tower.device))

    losses = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.ctx_episodes, desc=f"meta-train context ({settings.algo})", unit="episode",
                   file=sys.stderr)
    with tower.frozen():
        for _ in range(settings.ctx_episodes):
            e = sample_episode(labels, classes, settings.ways, settings.shots, settings.queries, rng)
            losses.append(context_step(learner, outer, loss_of, e, settings))
            if bar:
                bar.update()
    if bar:
        bar.close()
    head = max(1, len(losses) // 5)
    record = {"ctx_query_loss_first": float(np.mean(losses[:head])), "ctx_query_loss_last": float(np.mean(losses[-head:])),
              "n_ctx": learner.n_ctx, "ctx_init": settings.ctx_init or ""}  # fmt: skip
    return learner.ctx.detach().cpu().float().numpy(), record
