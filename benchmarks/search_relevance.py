"""Relevance cutoff: ``--min-relevance`` (a per-query null, clipxfer.index.relevance) against a fixed
cosine threshold, on labelled real data with the lite encoder.

Collections: scikit-learn digits (1,797 images), the first 3,000 Fashion-MNIST test images, and
``photos``: scikit-image's 19 sample photos, each with PHOTO_COPIES seeded edited copies (crops keeping
50-90 % of each side, resizing, JPEG, recolouring, a mirror) -- a collection where the encoder is
meaningful for image queries; its classes are the source photos. Queries: each class name as text
("a photo of a {class}.") and, per class, 10 seeded images of that class as image queries (searching
the other images). A hit is correct when it has the query's class. Every query
ranks the whole collection; a cutoff keeps a prefix of the ranking. Reported per collection and query
kind: precision of all kept hits pooled (micro), mean recall per query, queries that kept nothing.

The fixed threshold is tuned on each *other* collection (same query kind): the lowest cosine at which
the pooled precision there reaches 0.9 -- what a user tuning a threshold on one library gets on the next.
``absent`` rows: text queries for the other collection's classes, which have no correct hit; fewer kept is better.

    python benchmarks/search_relevance.py --levels 0.9 0.95 0.99
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clipxfer.datasets.features import encode_dataset  # noqa: E402
from clipxfer.datasets.labelled import fashion_mnist, sklearn_digits  # noqa: E402
from clipxfer.encoders import cached_encoder  # noqa: E402
from clipxfer.index.duplicates import copy_variants  # noqa: E402
from clipxfer.index.relevance import DEFAULT_MIN_RELEVANCE, NULL_SAMPLE, query_nulls  # noqa: E402
from clipxfer.sample_photos import export_sample_photos  # noqa: E402

TEMPLATE = "a photo of a {}."
IMAGE_QUERIES_PER_CLASS = 10
PHOTO_COPIES = 20


def edited_copies(img: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """``count`` seeded edits of ``img``: a crop keeping 50-90 % of each side, then one of the copy edits
    ``dups`` learns from (resize, JPEG, small crop, recolour), sometimes mirrored."""
    out = []
    for _ in range(count):
        keep = rng.uniform(0.5, 0.9, size=2)
        width, height = round(img.width * keep[0]), round(img.height * keep[1])
        left, top = int(rng.integers(0, img.width - width + 1)), int(rng.integers(0, img.height - height + 1))
        edited = copy_variants(img.crop((left, top, left + width, top + height)), rng)[int(rng.integers(0, 4))]
        out.append(ImageOps.mirror(edited) if rng.random() < 0.5 else edited)
    return out


def photo_collection(encoder, folder, seed):
    """The sample photos and their edited copies: (classnames, labels, embeddings)."""
    rng = np.random.default_rng(seed)
    images, labels, names = [], [], []
    for label, path in enumerate(sorted(export_sample_photos(folder))):
        original = Image.open(path).convert("RGB")
        names.append(path.stem)
        images += [original, *edited_copies(original, PHOTO_COPIES, rng)]
        labels += [label] * (PHOTO_COPIES + 1)
    return names, np.array(labels), encoder.embed_images(images).embeddings
TARGET_PRECISION = 0.9


def collections(encoder, seed):
    digits = sklearn_digits()
    fashion = fashion_mnist().split("test").subset(range(3000))
    for dataset in (digits, fashion):
        yield dataset.name, dataset.classnames, dataset.labels, encode_dataset(encoder, dataset).embeddings
    with tempfile.TemporaryDirectory() as folder:
        yield ("photos", *photo_collection(encoder, folder, seed))


def queries(encoder, classnames, labels, embeddings, seed, absent_names):
    """(kind, query vector, query class, row to leave out or -1) for text and image queries, and
    ``absent`` text queries naming the other collection's classes (every hit is wrong)."""
    texts = encoder.encode_texts([TEMPLATE.format(name) for name in classnames])
    out = [("text", vector, c, -1) for c, vector in enumerate(texts)]
    absent = encoder.encode_texts([TEMPLATE.format(name) for name in absent_names])
    out += [("absent", vector, -1, -1) for vector in absent]
    rng = np.random.default_rng(seed)
    for c in range(len(classnames)):
        for row in rng.choice(np.flatnonzero(labels == c), IMAGE_QUERIES_PER_CLASS, replace=False):
            out.append(("image", embeddings[row], c, int(row)))
    return out


def rankings(items, labels, embeddings):
    """Per query: scores sorted descending, correctness of each ranked item, relevant count, relevance."""
    ranked = []
    for kind, vector, cls, leave_out in items:
        keep = np.arange(len(labels)) != leave_out
        scores = embeddings[keep] @ vector
        correct = labels[keep] == cls
        order = np.argsort(-scores, kind="stable")
        sample = embeddings[keep][np.linspace(0, keep.sum() - 1, min(NULL_SAMPLE, keep.sum())).astype(int)]
        null = query_nulls(vector[None], sample, int(keep.sum()))[0]
        ranked.append((kind, scores[order], correct[order], int(correct.sum()), null.relevance(scores[order])))
    return ranked


def evaluate(ranked, kind, keep_count):
    """Pooled precision, mean recall and empty queries when query i keeps ``keep_count(i, ...)`` hits."""
    tp = kept = 0
    recalls, empty = [], 0
    for i, (k, scores, correct, relevant, relevance) in enumerate(ranked):
        if k != kind:
            continue
        n = keep_count(scores, relevance)
        tp += int(correct[:n].sum())
        kept += n
        recalls.append(correct[:n].sum() / relevant if relevant else 0.0)
        empty += n == 0
    return {"precision": round(tp / kept, 4) if kept else None, "recall": round(float(np.mean(recalls)), 4),
            "kept": kept, "n_queries": len(recalls), "empty_queries": empty}


def by_threshold(threshold):
    return lambda scores, relevance: int(np.sum(scores >= threshold))


def by_relevance(level):
    return lambda scores, relevance: int(np.sum(relevance >= level))


def tune_threshold(ranked, kind):
    """The lowest cosine whose pooled precision reaches TARGET_PRECISION on ``ranked``."""
    scores = np.concatenate([s for k, s, *_ in ranked if k == kind])
    correct = np.concatenate([c for k, _, c, *_ in ranked if k == kind])
    order = np.argsort(-scores, kind="stable")
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    good = np.flatnonzero(precision >= TARGET_PRECISION)
    return float(scores[order][good[-1]]) if len(good) else float(scores.max() + 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.9, DEFAULT_MIN_RELEVANCE, 0.99])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    encoder = cached_encoder("lite", "cpu", None)
    ranked, loaded = {}, list(collections(encoder, args.seed))
    for name, classnames, labels, embeddings in loaded:
        absent = next(c for n, c, *_ in loaded if n != name)
        ranked[name] = rankings(queries(encoder, classnames, labels, embeddings, args.seed, absent), labels, embeddings)
    names = list(ranked)
    rows = []
    for name in names:
        for kind in ("text", "image", "absent"):
            for other in (n for n in names if n != name):
                threshold = tune_threshold(ranked[other], "text" if kind == "absent" else kind)
                rows.append({"collection": name, "queries": kind,
                             "cutoff": f"cosine >= {threshold:.4f} (tuned on {other})",
                             **evaluate(ranked[name], kind, by_threshold(threshold))})
            for level in args.levels:
                label = f"min-relevance {level}" + (" (default)" if level == DEFAULT_MIN_RELEVANCE else "")
                rows.append({"collection": name, "queries": kind, "cutoff": label,
                             **evaluate(ranked[name], kind, by_relevance(level))})
    print(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "model": encoder.id,
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
