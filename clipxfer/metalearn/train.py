"""Meta-training (``clipxfer meta-train`` is a thin layer over :func:`meta_train`): a residual feature
adapter trained by Reptile or first-order MAML over episodes of base classes, and optionally CoOp
context vectors, saved as one :class:`~clipxfer.heads.metalearned.MetaHead`."""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..datasets.features import encode_dataset
from ..datasets.labelled import LabelledImages, load_dataset
from ..datasets.splits import partition_train_test
from ..encoders.base import Encoder, l2_normalize
from ..errors import ClipxferError
from ..heads.metalearned import MetaHead, adapt_encoding
from .episodes import ALGOS, Episode, check_episode_pool, episodes_accuracy, sample_episode


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


def train_adapter(
    x: np.ndarray,
    labels: np.ndarray,
    val_x: np.ndarray,
    val_labels: np.ndarray,
    algo: str,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    inner_steps: int,
    inner_lr: float,
    meta_lr: float,
    hidden: int,
    scale: float,
    seed: int,
    eval_every: int = 25,
    val_episodes: int = 50,
    progress: bool = False,
) -> tuple[ResidualAdapter, dict[str, Any]]:
    """Meta-train the residual adapter on L2-normalised features ``x`` (see the module docstring).
    Returns the kept adapter and a record (base validation accuracy of identity and kept state)."""
    if algo == "reptile" and inner_steps < 1:
        raise ClipxferError("reptile needs --inner-steps >= 1 (it moves toward the task-adapted parameters)")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    classes = check_episode_pool(labels, ways, shots, queries, "meta-train")
    val_classes = check_episode_pool(val_labels, ways, shots, 1, "meta-train (held-out base images)")
    val_queries = int(min(queries, np.bincount(val_labels)[val_classes].min() - shots))
    val_rng = np.random.default_rng(seed + 1)
    val_eps = [sample_episode(val_labels, val_classes, ways, shots, val_queries, val_rng) for _ in range(val_episodes)]
    model = ResidualAdapter(x.shape[1], hidden, generator)
    xt = torch.as_tensor(l2_normalize(x))
    outer = torch.optim.Adam(model.parameters(), lr=meta_lr) if algo == "fomaml" else None

    def val_accuracy() -> float:
        with torch.no_grad():
            return float(episodes_accuracy(lambda a: model(torch.as_tensor(a)).numpy(), l2_normalize(val_x),
                                           val_labels, val_eps, ways).mean())

    best_state, best_episode = copy.deepcopy(model.state_dict()), 0
    identity_val = best_val = val_accuracy()
    history = [(0, round(identity_val, 4))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=episodes, desc=f"meta-train adapter ({algo})", unit="episode", file=sys.stderr)
    for number in range(1, episodes + 1):
        episode = sample_episode(labels, classes, ways, shots, queries, rng)
        ex, local = _local(xt, episode)
        fast = copy.deepcopy(model)
        inner = torch.optim.Adam(fast.parameters(), lr=inner_lr)
        for _ in range(inner_steps):
            loss = proto_loss(fast, ex, local, ways, scale, support_only=(algo == "fomaml"))
            inner.zero_grad()
            loss.backward()
            inner.step()
        if algo == "reptile":
            with torch.no_grad():
                for p, q in zip(model.parameters(), fast.parameters()):
                    p.add_(meta_lr * (q - p))
        else:
            fast.zero_grad()
            proto_loss(fast, ex, local, ways, scale).backward()
            outer.zero_grad()
            for p, q in zip(model.parameters(), fast.parameters()):
                p.grad = q.grad.detach().clone()
            outer.step()
        if bar:
            bar.update()
        if number % eval_every == 0 or number == episodes:
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


def train_context(
    encoder: Encoder,
    classnames: Sequence[str],
    embeddings: np.ndarray,
    labels: np.ndarray,
    algo: str,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    inner_steps: int,
    lr: float,
    meta_lr: float,
    ctx_init: str | None,
    n_ctx: int,
    seed: int,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Meta-train CoOp context vectors (unified, class token at the end) over episodes of base
    classes: the episode's logits are ``logit_scale * image @ text[episode classes].T``."""
    from ..heads.coop import PromptLearner, text_tower

    tower = text_tower(encoder)
    generator = torch.Generator().manual_seed(seed)
    learner = PromptLearner(tower, classnames, n_ctx, ctx_init, "end", False, generator)
    scale = float(encoder.logit_scale)
    classes = check_episode_pool(labels, ways, shots, queries, "meta-train")
    rng = np.random.default_rng(seed + 2)
    emb = torch.as_tensor(embeddings, device=tower.device)
    outer = torch.optim.Adam([learner.ctx], lr=meta_lr) if algo == "fomaml" else None

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

        bar = tqdm(total=episodes, desc=f"meta-train context ({algo})", unit="episode", file=sys.stderr)
    with tower.frozen():
        for _ in range(episodes):
            e = sample_episode(labels, classes, ways, shots, queries, rng)
            fast = nn.Parameter(learner.ctx.detach().clone())
            inner = torch.optim.Adam([fast], lr=lr)
            inner_rows = e.support if algo == "fomaml" else np.concatenate([e.support, e.query])
            inner_targets = e.support_labels if algo == "fomaml" else np.concatenate([e.support_labels, e.query_labels])
            for _ in range(inner_steps):
                loss = loss_of(fast, inner_rows, inner_targets, e.classes)
                inner.zero_grad()
                loss.backward()
                inner.step()
            if algo == "reptile":
                with torch.no_grad():
                    learner.ctx.add_(meta_lr * (fast - learner.ctx))
                with torch.no_grad():
                    losses.append(float(loss_of(learner.ctx, e.query, e.query_labels, e.classes)))
            else:
                query_loss = loss_of(fast, e.query, e.query_labels, e.classes)
                (grad,) = torch.autograd.grad(query_loss, fast)
                outer.zero_grad()
                learner.ctx.grad = grad.detach().clone()
                outer.step()
                losses.append(float(query_loss.detach()))
            if bar:
                bar.update()
    if bar:
        bar.close()
    head = max(1, len(losses) // 5)
    record = {"ctx_query_loss_first": float(np.mean(losses[:head])), "ctx_query_loss_last": float(np.mean(losses[-head:])),
              "n_ctx": learner.n_ctx, "ctx_init": ctx_init or ""}  # fmt: skip
    return learner.ctx.detach().cpu().float().numpy(), record


def resolve_classes(dataset: LabelledImages, classes: Sequence[str] | str | None) -> list[int]:
    """Class indices from names or numbers (``"a,b,c"`` or a list); all classes when None."""
    if classes is None:
        return list(range(len(dataset.classnames)))
    items = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
    indices = []
    for item in filter(None, items):
        if item in dataset.classnames:
            indices.append(dataset.classnames.index(item))
        elif item.isdigit() and int(item) < len(dataset.classnames):
            indices.append(int(item))
        else:
            raise ClipxferError(
                f"--classes: '{item}' is not a class of {dataset.name} ({', '.join(dataset.classnames)}) nor its number"
            )
    return sorted(set(indices))


def base_pool(
    dataset: LabelledImages, classes: list[int], max_per_class: int, seed: int, min_held: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Meta-training and held-out rows of the dataset's training pool, per chosen class at most
    ``max_per_class`` images (drawn with ``seed``), a fifth of each class (at least ``min_held``)
    held out."""
    pool, _ = partition_train_test(dataset)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in classes:
        members = rng.permutation(pool[dataset.labels[pool] == c])[:max_per_class]
        cut = min(max(min_held, len(members) // 5), len(members) - 1)
        held.extend(members[:cut])
        train.extend(members[cut:])
    return np.array(train, np.int64), np.array(held, np.int64)


def meta_train(
    base: str | os.PathLike | LabelledImages,
    encoder: Encoder | None = None,
    model: str | None = None,
    classes: Sequence[str] | str | None = None,
    algo: str = "reptile",
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    episodes: int = 300,
    inner_steps: int = 5,
    inner_lr: float = 1e-3,
    meta_lr: float | None = None,
    hidden: int = 128,
    scale: float = 10.0,
    context: bool = True,
    ctx_episodes: int = 30,
    ctx_init: str | None = "a photo of a",
    n_ctx: int = 4,
    max_per_class: int = 200,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
) -> tuple[MetaHead, dict[str, Any]]:
    """Meta-train on the base classes of ``base`` (its training pool) and return the
    :class:`MetaHead` (saved to ``out`` when given) and a summary dict.

    ``meta_lr`` defaults to 0.1 for Reptile (interpolation step) and 1e-3 for FOMAML (Adam).
    ``context`` also meta-trains CoOp context vectors (``ctx_episodes`` episodes) when the
    encoder has a trainable text tower.
    """
    if algo not in ALGOS:
        raise ClipxferError(f"--algo {algo!r}: choose {' or '.join(ALGOS)}")
    dataset = base if isinstance(base, LabelledImages) else load_dataset(base)
    chosen = resolve_classes(dataset, classes)
    if len(chosen) < ways:
        raise ClipxferError(f"meta-train: {len(chosen)} base classes but --ways {ways}: give at least {ways} classes or lower --ways")
    if encoder is None:
        from ..encoders import load_encoder

        encoder = load_encoder(model, device=device, precision=precision)
    meta_lr = (0.1 if algo == "reptile" else 1e-3) if meta_lr is None else meta_lr
    train_rows, held_rows = base_pool(dataset, chosen, max_per_class, seed, min_held=shots + 1)
    rows = np.concatenate([train_rows, held_rows])
    encoding = encode_dataset(encoder, dataset.subset(rows), progress=progress)
    n_train = len(train_rows)
    labels = dataset.labels[rows]
    feats = encoding.features
    adapter, record = train_adapter(
        feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:], algo, ways, shots, queries, episodes,
        inner_steps, inner_lr, meta_lr, hidden, scale, seed, progress=progress,
    )  # fmt: skip
    arrays = adapter.arrays()
    # Base-class prototypes in adapted space, from every base image: the MetaHead's own classifier.
    adapted = l2_normalize(adapt_encoding(arrays, encoding).features)
    base_names = [dataset.classnames[c] for c in chosen]
    remap = {c: i for i, c in enumerate(chosen)}
    local_labels = np.array([remap[int(c)] for c in labels])
    prototypes = l2_normalize(np.stack([adapted[local_labels == i].mean(axis=0) for i in range(len(chosen))]))
    weights = {**arrays, "prototypes": prototypes}
    config: dict[str, Any] = {
        "algo": algo, "ways": ways, "shots": shots, "queries": queries, "episodes": episodes,
        "inner_steps": inner_steps, "inner_lr": inner_lr, "meta_lr": meta_lr, "hidden": hidden, "scale": scale,
        "seed": seed, "max_per_class": max_per_class, "dataset": dataset.name, "base_classes": base_names,
        "num_base_images": int(len(rows)), **record,
    }  # fmt: skip
    if context:
        try:
            from ..heads.coop import text_tower

            text_tower(encoder)
            has_tower = True
        except ClipxferError:
            has_tower = False
        if has_tower:
            ctx, ctx_record = train_context(
                encoder, base_names, encoding.embeddings, local_labels, algo, ways, shots, queries, ctx_episodes,
                inner_steps, 2e-3, 0.5 if algo == "reptile" else 2e-3, ctx_init, n_ctx, seed, progress,
            )  # fmt: skip
            weights["ctx"] = ctx
            config.update({"ctx_episodes": ctx_episodes, **ctx_record})
        else:
            print(f"warning: {encoder.id} has no trainable text tower; no context vectors meta-trained", file=sys.stderr)
    head = MetaHead(encoder.id, base_names, weights, config)
    summary = {
        "method": "meta", "algo": algo, "model": encoder.id, "base_classes": base_names, "ways": ways, "shots": shots,
        "episodes": episodes, "identity_val_accuracy": record["identity_val_accuracy"],
        "val_accuracy": record["val_accuracy"], "best_episode": record["best_episode"],
        "context": "ctx" in weights, "head": None,
    }  # fmt: skip
    if "ctx" in weights:
        summary.update({k: config[k] for k in ("ctx_query_loss_first", "ctx_query_loss_last")})
    if out is not None:
        summary["head"] = str(head.save(out))
    return head, summary
