"""Meta-training the residual feature adapter (see :mod:`clipxfer.metalearn`): Reptile or FOMAML
steps over episodes of base classes with the ProtoNet loss, the state that scores best on held-out
validation episodes kept."""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from ..vector_math import l2_normalize
from .episodes import Episode, check_episode_pool, episodes_accuracy, sample_episode
from .settings import MetaSettings


class ResidualAdapter(nn.Module):
    """``x + relu(x @ w1.T + b1) @ w2.T`` with ``w2 = 0``: the identity at initialisation."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, dim, generator=generator) / dim**0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.zeros(dim, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(x @ self.w1.T + self.b1) @ self.w2.T

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"adapter.{n}": p.detach().numpy().copy() for n, p in self.named_parameters()}


def proto_loss(model: nn.Module, x: torch.Tensor, episode: Episode, ways: int, scale: float, support_only: bool = False):
    """ProtoNet cross-entropy of the episode's queries (or of its support rows against their own
    class means, ``support_only``, what FOMAML's inner loop sees)."""
    z = nn.functional.normalize(model(x), dim=-1)
    s_rows = torch.as_tensor(episode.support)
    s_labels = torch.as_tensor(episode.support_labels)
    support = z[s_rows]
    means = torch.zeros(ways, z.shape[1]).index_add_(0, s_labels, support)
    protos = nn.functional.normalize(means, dim=-1)
    if support_only:
        return nn.functional.cross_entropy(scale * support @ protos.T, s_labels)
    query = z[torch.as_tensor(episode.query)]
    return nn.functional.cross_entropy(scale * query @ protos.T, torch.as_tensor(episode.query_labels))


def _local(x_all: torch.Tensor, episode: Episode) -> tuple[torch.Tensor, Episode]:
    """The episode's rows of ``x_all`` and the episode re-indexed into them."""
    rows = np.concatenate([episode.support, episode.query])
    ns = len(episode.support)
    local = Episode(episode.classes, np.arange(ns), episode.support_labels, np.arange(ns, len(rows)), episode.query_labels)
    return x_all[torch.as_tensor(rows)], local


def validation_episodes(val_labels: np.ndarray, settings: MetaSettings, count: int) -> list[Episode]:
    """``count`` episodes of the held-out base images (seed ``settings.seed + 1``), with as many
    queries per class as they allow, at most ``settings.queries``."""
    val_classes = check_episode_pool(val_labels, settings.ways, settings.shots, 1, "meta-train (held-out base images)")
    val_queries = int(min(settings.queries, np.bincount(val_labels)[val_classes].min() - settings.shots))
    val_rng = np.random.default_rng(settings.seed + 1)
    return [
        sample_episode(val_labels, val_classes, settings.ways, settings.shots, val_queries, val_rng)
        for _ in range(count)
    ]


def adapter_step(
    model: ResidualAdapter, outer: torch.optim.Optimizer | None, x: torch.Tensor, episode: Episode,
    settings: MetaSettings,
) -> None:  # fmt: skip
    """One episode (rows ``x``, ``episode`` indexing into them): adapt a copy of ``model`` with
    ``inner_steps`` Adam steps, then move ``model`` toward it (Reptile) or by the copy's query-loss
    gradient (FOMAML, through the ``outer`` optimiser)."""
    fast = copy.deepcopy(model)
    inner = torch.optim.Adam(fast.parameters(), lr=settings.inner_lr)
    for _ in range(settings.inner_steps):
        loss = proto_loss(fast, x, episode, settings.ways, settings.scale, support_only=(settings.algo == "fomaml"))
        inner.zero_grad()
        loss.backward()
        inner.step()
    if settings.algo == "reptile":
        with torch.no_grad():
            for p, q in zip(model.parameters(), fast.parameters()):
                p.add_(settings.meta_lr * (q - p))
    else:
        fast.zero_grad()
        proto_loss(fast, x, episode, settings.ways, settings.scale).backward()
        outer.zero_grad()
        for p, q in zip(model.parameters(), fast.parameters()):
            p.grad = q.grad.detach().clone()
        outer.step()


def train_adapter(
    x: np.ndarray,
    labels: np.ndarray,
    val_x: np.ndarray,
    val_labels: np.ndarray,
    settings: MetaSettings,
    eval_every: int = 25,
    val_episodes: int = 50,
    progress: bool = False,
) -> tuple[ResidualAdapter, dict[str, Any]]:
    """Meta-train the residual adapter on L2-normalised features ``x`` with checked ``settings``
    (:func:`~clipxfer.metalearn.settings.make_settings`), scoring it on ``val_episodes`` episodes of
    ``val_x`` every ``eval_every`` episodes. Returns the kept adapter and a record (base validation
    accuracy of identity and kept state)."""
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    classes = check_episode_pool(labels, settings.ways, settings.shots, settings.queries, "meta-train")
    val_eps = validation_episodes(val_labels, settings, val_episodes)
    model = ResidualAdapter(x.shape[1], settings.hidden, generator)
    xt = torch.as_tensor(l2_normalize(x))
    outer = torch.optim.Adam(model.parameters(), lr=settings.meta_lr) if settings.algo == "fomaml" else None

    def val_accuracy() -> float:
        with torch.no_grad():
            return float(episodes_accuracy(lambda a: model(torch.as_tensor(a)).numpy(), l2_normalize(val_x),
                                           val_labels, val_eps, settings.ways).mean())

    best_state, best_episode = copy.deepcopy(model.state_dict()), 0
    identity_val = best_val = val_accuracy()
    history = [(0, round(identity_val, 4))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.episodes, desc=f"meta-train adapter ({settings.algo})", unit="episode", file=sys.stderr)
    for number in range(1, settings.episodes + 1):
        episode = sample_episode(labels, classes, settings.ways, settings.shots, settings.queries, rng)
        adapter_step(model, outer, *_local(xt, episode), settings)
        if bar:
            bar.update()
        if number % eval_every == 0 or number == settings.episodes:
            accuracy = val_accuracy()
            history.append((number, round(accuracy, 4)))
            if accuracy > best_val:
                best_val, best_episode, best_state = accuracy, number, copy.deepcopy(model.state_dict())
    if bar:
        bar.close()
    model.load_state_dict(best_state)
    record = {"identity_val_accuracy": identity_val, "val_accuracy": best_val, "best_episode": best_episode,
              "val_history": history, "val_episodes": val_episodes}  # fmt: skip
    return model, record
