"""Meta-training (``clipxfer meta-train`` is a thin layer over :func:`meta_train`): a residual feature
adapter trained by Reptile or first-order MAML over episodes of base classes (:mod:`.adapter`), and
optionally CoOp context vectors (:mod:`.context`), saved as one
:class:`~clipxfer.heads.metalearned.MetaHead`. The settings are :class:`~.settings.MetaSettings`."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np

from ..datasets.features import encode_dataset
from ..datasets.labelled import LabelledImages, load_dataset
from ..datasets.splits import partition_train_test
from ..encoders.base import Encoder, ImageEncoding
from ..errors import ClipxferError
from ..heads.metalearned import MetaHead, adapt_encoding
from ..vector_math import l2_normalize
from .context import train_context
from .feature_adapter import train_adapter
from .settings import MetaSettings, make_settings


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


def encode_base(
    encoder: Encoder, dataset: LabelledImages, chosen: list[int], settings: MetaSettings, progress: bool = False
) -> tuple[ImageEncoding, np.ndarray, int]:
    """The base pool encoded, meta-training rows first, then the held-out ones (see :func:`base_pool`):
    ``(encoding, labels, number of meta-training rows)``."""
    train_rows, held_rows = base_pool(dataset, chosen, settings.max_per_class, settings.seed, min_held=settings.shots + 1)
    rows = np.concatenate([train_rows, held_rows])
    encoding = encode_dataset(encoder, dataset.subset(rows), progress=progress)
    return encoding, dataset.labels[rows], len(train_rows)


def base_prototypes(
    arrays: dict[str, np.ndarray], encoding: ImageEncoding, labels: np.ndarray, chosen: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels renumbered 0..len(chosen)-1, the class prototypes)``: base-class means in the
    adapted space, from every base image; they are the MetaHead's own classifier."""
    adapted = l2_normalize(adapt_encoding(arrays, encoding).features)
    remap = {c: i for i, c in enumerate(chosen)}
    local_labels = np.array([remap[int(c)] for c in labels])
    prototypes = l2_normalize(np.stack([adapted[local_labels == i].mean(axis=0) for i in range(len(chosen))]))
    return local_labels, prototypes


def meta_context(
    encoder: Encoder, base_names: list[str], encoding: ImageEncoding, labels: np.ndarray, settings: MetaSettings,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]] | None:  # fmt: skip
    """Meta-trained context vectors and their record, or None (with a warning) when the encoder
    has no trainable text tower."""
    from ..heads.coop import text_tower

    try:
        text_tower(encoder)
    except ClipxferError:
        print(f"warning: {encoder.id} has no trainable text tower; no context vectors meta-trained", file=sys.stderr)
        return None
    return train_context(encoder, base_names, encoding.embeddings, labels, settings, progress)


def meta_config(settings: MetaSettings, dataset: LabelledImages, base_names: list[str], num_images: int,
                record: dict[str, Any]) -> dict[str, Any]:
    """The MetaHead's config: the adapter's settings, the base data and the training record."""
    s = settings
    return {
        "algo": s.algo, "ways": s.ways, "shots": s.shots, "queries": s.queries, "episodes": s.episodes,
        "inner_steps": s.inner_steps, "inner_lr": s.inner_lr, "meta_lr": s.meta_lr, "hidden": s.hidden, "scale": s.scale,
        "seed": s.seed, "max_per_class": s.max_per_class, "dataset": dataset.name, "base_classes": base_names,
        "num_base_images": num_images, **record,
    }  # fmt: skip


def meta_summary(head: MetaHead, settings: MetaSettings) -> dict[str, Any]:
    """What :func:`meta_train` returns beside the head (``head`` filled in once saved)."""
    config = head.config
    summary = {
        "method": "meta", "algo": settings.algo, "model": head.model_id, "base_classes": head.classnames,
        "ways": settings.ways, "shots": settings.shots, "episodes": settings.episodes,
        "identity_val_accuracy": config["identity_val_accuracy"], "val_accuracy": config["val_accuracy"],
        "best_episode": config["best_episode"], "context": "ctx" in head.weights, "head": None,
    }  # fmt: skip
    if "ctx" in head.weights:
        summary.update({k: config[k] for k in ("ctx_query_loss_first", "ctx_query_loss_last")})
    return summary


def meta_train(
    base: str | os.PathLike | LabelledImages,
    encoder: Encoder | None = None,
    model: str | None = None,
    classes: Sequence[str] | str | None = None,
    *,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
    **settings: Any,
) -> tuple[MetaHead, dict[str, Any]]:
    """Meta-train on the base classes of ``base`` (its training pool; ``classes`` names or numbers,
    default all) and return the :class:`MetaHead` (saved to ``out`` when given) and a summary dict.
    The encoder is ``encoder``, or loaded from ``model``, ``device`` and ``precision``.

    ``settings``: :class:`~clipxfer.metalearn.settings.MetaSettings` fields (``algo, ways, shots,
    queries, episodes, inner_steps, inner_lr, meta_lr, hidden, scale, context, ctx_episodes, ctx_init,
    n_ctx, max_per_class, seed``), checked before anything is loaded. ``meta_lr`` defaults to 0.1 for
    Reptile (interpolation step) and 1e-3 for FOMAML (Adam). ``context`` also meta-trains CoOp
    context vectors (``ctx_episodes`` episodes) when the encoder has a trainable text tower.
    """
    settings = make_settings(**settings)  # bad settings fail before any loading or encoding
    dataset = base if isinstance(base, LabelledImages) else load_dataset(base)
    chosen = resolve_classes(dataset, classes)
    ways = settings.ways
    if len(chosen) < ways:
        raise ClipxferError(f"meta-train: {len(chosen)} base classes but --ways {ways}: give at least {ways} classes or lower --ways")
    if encoder is None:
        from ..encoders import load_encoder

        encoder = load_encoder(model, device=device, precision=precision)
    encoding, labels, n_train = encode_base(encoder, dataset, chosen, settings, progress)
    feats = encoding.features
    adapter, record = train_adapter(
        feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:], settings, progress=progress
    )
    arrays = adapter.arrays()
    local_labels, prototypes = base_prototypes(arrays, encoding, labels, chosen)
    base_names = [dataset.classnames[c] for c in chosen]
    weights = {**arrays, "prototypes": prototypes}
    config = meta_config(settings, dataset, base_names, len(labels), record)
    context = meta_context(encoder, base_names, encoding, local_labels, settings, progress) if settings.context else None
    if context is not None:
        weights["ctx"] = context[0]
        config.update({"ctx_episodes": settings.ctx_episodes, **context[1]})
    head = MetaHead(encoder.id, base_names, weights, config)
    summary = meta_summary(head, settings)
    if out is not None:
        summary["head"] = str(head.save(out))
    return head, summary
