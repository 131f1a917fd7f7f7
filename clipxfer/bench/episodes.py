"""Episodes mode of the benchmark: novel-class N-way K-shot accuracy with 95% confidence
intervals, every method scored on the same episodes.

Methods: ``zeroshot`` (the text head restricted to the episode's classes), ``prototypes``
(nearest class mean of the raw L2-normalised probe features, the baseline), ``meta`` (nearest
prototype in the adapted space of a meta-trained head) and ``transductive`` (EM prototypes over
the episode's unlabelled queries plus its support, zero-shot prior; see
:mod:`clipxfer.heads.transductive`). The interval is ``1.96 * std / sqrt(episodes)``; ``diff`` is
the paired difference to ``prototypes`` on the same episodes, with its own interval.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..datasets.features import encode_dataset, take
from ..datasets.labelled import LabelledImages, load_dataset
from ..datasets.prompts import load_templates
from ..datasets.splits import partition_train_test
from ..encoders import Encoder, ImageEncoding, load_encoder
from ..errors import ClipxferError
from ..fewshot.predict import encoder_for_head
from ..heads.metalearned import apply_adapter, load_meta
from ..heads.transductive import fit_transductive
from ..heads.zeroshot import ZeroShotHead, fit_zeroshot
from ..metalearn.episodes import check_episode_pool, prototype_logits, sample_episode
from ..metalearn.train import resolve_classes
from ..paths import atomic_write_bytes
from ..vector_math import l2_normalize

METHODS = ("zeroshot", "prototypes", "meta", "transductive")
EPISODE_COLUMNS = ["method", "ways", "shots", "episode", "accuracy"]


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


def novel_pool(dataset: LabelledImages, classes: list[int], max_per_class: int, seed: int) -> np.ndarray:
    """Test-split rows of the novel ``classes``, at most ``max_per_class`` each (drawn with ``seed``)."""
    _, test = partition_train_test(dataset)
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(test[dataset.labels[test] == c])[:max_per_class] for c in classes]
    return np.sort(np.concatenate(rows))


def run_episodes(
    data: str | os.PathLike | LabelledImages,
    novel: Sequence[str] | str | None = None,
    encoder: Encoder | None = None,
    model: str | None = None,
    meta: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    ways: int = 5,
    shots: Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 300,
    max_per_class: int = 100,
    templates: str = "simple",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    device: str | None = None,
    precision: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``methods`` (default: all that apply) on ``episodes`` N-way K-shot episodes per
    shot count, drawn from the test images of the ``novel`` classes of ``data``.

    Without ``encoder``, the model is ``model`` (default: the one the ``meta`` head was made with,
    in the precision its id names) on ``device`` in ``precision``.

    Returns ``(summary, per_episode)``; the summary has ``method, ways, shots, episodes,
    accuracy, ci95, diff, diff_ci95``. With ``out`` writes episodes.csv and episodes.md there.
    """
    dataset = data if isinstance(data, LabelledImages) else load_dataset(data)
    classes = resolve_classes(dataset, novel)
    if encoder is None:
        encoder = (encoder_for_head(meta, model, device, precision) if meta is not None
                   else load_encoder(model, device=device, precision=precision))
    methods = list(methods) if methods else [m for m in METHODS if m != "meta" or meta is not None]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ClipxferError(f"unknown episode method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if "meta" in methods and meta is None:
        raise ClipxferError("episode method 'meta' needs a meta-trained head: pass --meta PATH")
    meta_head = load_meta(meta, encoder.id) if meta is not None else None
    names = [dataset.classnames[c] for c in classes]
    if meta_head is not None and set(meta_head.classnames) & set(names):
        print(f"warning: novel classes {', '.join(sorted(set(meta_head.classnames) & set(names)))} were meta-training "
              "base classes: the meta numbers are not novel-class numbers", file=sys.stderr)
    rows = novel_pool(dataset, classes, max_per_class, seed)
    labels = np.searchsorted(classes, dataset.labels[rows])
    for k in shots:
        check_episode_pool(labels, ways, k, queries, f"episodes ({dataset.name}, {k} shots)")
    encoding = encode_dataset(encoder, dataset.subset(rows), progress=progress)
    raw = l2_normalize(encoding.features)
    adapted = l2_normalize(apply_adapter(meta_head.weights, encoding.features)) if meta_head is not None else None
    zeroshot = fit_zeroshot(encoder, names, load_templates(templates))
    records = []
    for k in shots:
        rng = np.random.default_rng([seed, k])
        batch = [sample_episode(labels, np.unique(labels), ways, k, queries, rng) for _ in range(episodes)]
        for number, e in enumerate(batch):
            for method in methods:
                predicted = _predict(method, e, ways, raw, adapted, encoding, zeroshot)
                records.append((method, ways, k, number, float((predicted == e.query_labels).mean())))
    per_episode = pd.DataFrame(records, columns=EPISODE_COLUMNS)
    summary = summarize_episodes(per_episode)
    summary.attrs.update({"model": encoder.id, "dataset": dataset.name, "novel": names, "queries": queries,
                          "num_images": int(len(rows)), "meta": str(meta) if meta else ""})  # fmt: skip
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "episodes.csv", per_episode.to_csv(index=False).encode())
        atomic_write_bytes(folder / "episodes.md", episodes_markdown(summary).encode())
    return summary, per_episode


def _predict(method, episode, ways, raw, adapted, encoding: ImageEncoding, zeroshot: ZeroShotHead) -> np.ndarray:
    if method == "prototypes":
        return prototype_logits(raw[episode.support], episode.support_labels, raw[episode.query], ways).argmax(1)
    if method == "meta":
        return prototype_logits(adapted[episode.support], episode.support_labels, adapted[episode.query], ways).argmax(1)
    sub = ZeroShotHead(zeroshot.model_id, [zeroshot.classnames[c] for c in episode.classes],
                       {"class_weights": zeroshot.weights["class_weights"][episode.classes]}, zeroshot.config)  # fmt: skip
    query = take(encoding, episode.query)
    if method == "zeroshot":
        return sub.predict(query)
    head = fit_transductive(sub, query, take(encoding, episode.support), episode.support_labels)
    return head.predict(query)


def summarize_episodes(per_episode: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and 95% interval per method and shots, and the paired difference to prototypes."""
    rows = []
    for (ways, k), group in per_episode.groupby(["ways", "shots"], sort=True):
        base = group[group["method"] == "prototypes"].set_index("episode")["accuracy"]
        for method, scores in group.groupby("method", sort=False):
            mean, half = interval(scores["accuracy"].to_numpy())
            diff = diff_half = float("nan")
            if len(base) and method != "prototypes":
                paired = scores.set_index("episode")["accuracy"] - base
                diff, diff_half = interval(paired.dropna().to_numpy())
            rows.append({"method": method, "ways": int(ways), "shots": int(k), "episodes": int(len(scores)),
                         "accuracy": mean, "ci95": half, "diff": diff, "diff_ci95": diff_half})  # fmt: skip
    return pd.DataFrame(rows)


def episodes_markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table (accuracy +- 95% CI; paired difference to prototypes)."""
    meta = summary.attrs
    lines = ["# Episodes benchmark", "",
             f"Model `{meta.get('model', '')}`, {meta.get('dataset', '')} novel classes "
             f"{', '.join(meta.get('novel', []))}, {meta.get('queries', '')} queries per class; "
             "accuracy +- 95% CI over episodes; diff = paired difference to raw prototypes on the same episodes.", "",
             "| method | ways | shots | episodes | accuracy | diff vs prototypes |", "|---|---:|---:|---:|---|---|"]  # fmt: skip
    for r in summary.itertuples():
        diff = "" if np.isnan(r.diff) else f"{r.diff:+.3f} +- {r.diff_ci95:.3f}"
        lines.append(f"| {r.method} | {r.ways} | {r.shots} | {r.episodes} | {r.accuracy:.3f} +- {r.ci95:.3f} | {diff} |")
    return "\n".join(lines) + "\n"
