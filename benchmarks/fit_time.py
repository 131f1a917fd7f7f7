"""Fit time of each few-shot method on cached features, and CoOp seconds per training step.

    python benchmarks/fit_time.py [--classes 10 100] [--shots 16] [--dim 384 --feature-dim 1280]
        [--coop-models tiny lite] [--coop-steps 5] [--methods probe lpp clap] [--transclip-images 10000] [--json]

Features are synthetic (Gaussian clusters, ``lite``-shaped: 384-d embeddings, 1280-d backbone
features) because fit time depends on shapes, not on content; the zero-shot head has random
class weights. Validation is 4 images per class, as ``draw_few_shot`` gives at 16 shots. CoOp
is timed through the real text towers (it needs one) on a few steps after one warm-up step,
with class names ``class 0 .. class N-1``. Everything runs on CPU unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.encoders.base import ImageEncoding  # noqa: E402
from clipxfer.heads import HEAD_TYPES  # noqa: E402
from clipxfer.heads.base import FewShotData  # noqa: E402
from clipxfer.heads.zeroshot import ZeroShotHead, fit_zeroshot  # noqa: E402
from clipxfer.vector_math import l2_normalize

METHODS = [("probe", "probe", {}), ("tip", "tip", {}), ("tipf", "tip", {"finetune": True}), ("mix", "mix", {}),
           ("lpp", "lpp", {}), ("clap", "clap", {})]


def synthetic_data(classes: int, shots: int, dim: int, feature_dim: int, seed: int = 0, encoder=None) -> FewShotData:
    """Clustered unit embeddings plus non-negative 'backbone' features, lite-shaped."""
    rng = np.random.default_rng(seed)
    means = l2_normalize(rng.normal(size=(classes, dim)))
    lift = rng.normal(size=(dim, feature_dim)).astype(np.float32)

    def draw(per_class):
        labels = np.repeat(np.arange(classes), per_class)
        emb = l2_normalize(means[labels] + 0.05 * rng.normal(size=(len(labels), dim)))
        return ImageEncoding(emb, np.maximum(emb @ lift, 0)), labels

    train, train_labels = draw(shots)
    val, val_labels = draw(4)
    names = [f"class {i}" for i in range(classes)]
    if encoder is None:
        zeroshot = ZeroShotHead("synthetic", names, {"class_weights": l2_normalize(rng.normal(size=(classes, dim)))},
                                {"logit_scale": 100.0, "templates": ["{}"]})
        encoder = SimpleNamespace(id="synthetic")
    else:
        zeroshot = fit_zeroshot(encoder, names, ["a photo of a {}."])
    return FewShotData(encoder, names, train, train_labels, val, val_labels, zeroshot, shots, seed, "")


def time_methods(classes: int, shots: int, dim: int, feature_dim: int, only: list[str] | None = None) -> list[dict]:
    rows = []
    data = synthetic_data(classes, shots, dim, feature_dim)
    for name, method, options in METHODS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        HEAD_TYPES[method].fit(data, **options)
        rows.append({"method": name, "classes": classes, "shots": shots, "fit_seconds": round(time.perf_counter() - start, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def time_transclip(images: int, classes: int, shots: int, dim: int, feature_dim: int) -> list[dict]:
    """TransCLIP over a batch of ``images`` on top of the zero-shot head: label-free (one run) and
    with ``shots`` per class (one run per gamma, validation images in the batch). The kNN graph
    (faiss, exact) is timed apart."""
    from clipxfer.heads.transclip import TransCLIPHead, knn_affinity

    data = synthetic_data(classes, shots, dim, feature_dim)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, size=images)
    batch = synthetic_data(classes, 1, dim, feature_dim, seed=0).train  # the same class means (seed 0)
    means_emb = batch.embeddings
    emb = l2_normalize(means_emb[labels] + 0.05 * rng.normal(size=(images, dim)))
    lift = np.random.default_rng(0).normal(size=(dim, feature_dim)).astype(np.float32)
    encoding = ImageEncoding(emb, np.maximum(emb @ lift, 0))
    rows = []
    start = time.perf_counter()
    knn_affinity(l2_normalize(encoding.features), 3)
    rows.append({"method": "transclip kNN graph", "images": images, "seconds": round(time.perf_counter() - start, 3)})
    for name, head in (("zeroshot+trans", TransCLIPHead.wrap(data.zeroshot)),
                       (f"zeroshot+trans, {shots} shots", TransCLIPHead.wrap(data.zeroshot, data))):
        start = time.perf_counter()
        head.predict(encoding)
        rows.append({"method": name, "images": images, "classes": classes,
                     "seconds": round(time.perf_counter() - start, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def time_coop(spec: str, classes: int, shots: int, steps: int, device: str) -> dict:
    from clipxfer.encoders import load_encoder

    encoder = load_encoder(spec, device=device, precision="fp32" if spec == "tiny" else None)
    data = synthetic_data(classes, shots, encoder.dim, encoder.feature_dim, encoder=encoder)
    HEAD_TYPES["coop"].fit(data, max_steps=1, eval_every=1000)  # warm-up (allocations, lazy init)
    start = time.perf_counter()
    # eval_every > steps: only the final validation pass runs, as in a long run's amortised cost.
    head = HEAD_TYPES["coop"].fit(data, max_steps=steps, eval_every=steps)
    seconds = time.perf_counter() - start
    row = {"method": "coop", "model": spec, "classes": classes, "shots": shots, "steps": head.config["steps_run"],
           "seconds_per_step": round(seconds / head.config["steps_run"], 3), "batch_size": head.config["batch_size"]}
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--feature-dim", type=int, default=1280)
    parser.add_argument("--coop-models", nargs="*", default=["tiny", "lite"])
    parser.add_argument("--coop-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", default=None, help="Only these fit methods (default all).")
    parser.add_argument("--transclip-images", type=int, default=0, help="Also time TransCLIP over this many images.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = []
    for classes in args.classes:
        rows += time_methods(classes, args.shots, args.dim, args.feature_dim, args.methods)
    coop = [time_coop(spec, classes, args.shots, args.coop_steps, args.device)
            for spec in args.coop_models for classes in args.classes]
    trans = [r for classes in args.classes for r in time_transclip(args.transclip_images, classes, args.shots, args.dim,
                                                                      args.feature_dim)] if args.transclip_images else []
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps({"meta": meta, "fit": rows, "coop": coop, "transclip": trans}, indent=2))
        return
    print("| method | classes | shots | fit s |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['classes']} | {row['shots']} | {row['fit_seconds']:.2f} |")
    if trans:
        print("\n| TransCLIP | images | classes | s |\n|---|---:|---:|---:|")
        for row in trans:
            print(f"| {row['method']} | {row['images']} | {row.get('classes', '')} | {row['seconds']:.2f} |")
    print("\n| CoOp text tower | classes | s/step (batch 32) |\n|---|---:|---:|")
    for row in coop:
        print(f"| {row['model']} | {row['classes']} | {row['seconds_per_step']:.3f} |")


if __name__ == "__main__":
    main()
