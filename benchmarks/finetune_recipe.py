"""Choosing the fine-tuning recipe on held-out TRAINING images (never the test split).

lite on Fashion-MNIST, one K-shot draw per seed; each setting is scored on a development set of
``--dev`` images drawn from the training pool outside the draw, next to the linear probe
(the LP stage) on the same images; with several seeds the means come last. Run:
  OMP_NUM_THREADS=1 python benchmarks/finetune_recipe.py --shots 16 --seeds 1,2,3 --dev 500 'strategy=top' 'strategy=partial,lr=3e-4'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from clipxfer.datasets.features import encode_dataset
from clipxfer.datasets.labelled import load_dataset
from clipxfer.datasets.splits import partition_train_test
from clipxfer.encoders import load_encoder
from clipxfer.fewshot.task import prepare_task
from clipxfer.finetune.settings import FinetuneSettings
from clipxfer.finetune.train import finetune_encoder
from clipxfer.heads.linear import linear_logits
from clipxfer.heads.probe import ProbeHead

#: Seed of the development-set draw: the same images for every recipe compared on one K-shot draw.
DEV_SEED = 1234


def draw_dev_set(task, pool: np.ndarray, size: int) -> np.ndarray:
    """``size`` rows of the training ``pool`` outside ``task``'s draw (training and validation
    images), sorted: the development set recipes are chosen on, never the test split."""
    used = set(task.split.train) | set(task.split.val)
    rest = np.array([i for i in pool if i not in used])
    return np.sort(np.random.default_rng(DEV_SEED).choice(rest, size=size, replace=False))


def parse(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1", help="comma-separated draw seeds")
    parser.add_argument("--dev", type=int, default=500)
    args = parser.parse_args()
    dataset = load_dataset("fashion-mnist")
    encoder = load_encoder("lite")
    pool, _ = partition_train_test(dataset)
    scores: dict[str, list[float]] = {"probe": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        task = prepare_task(encoder, dataset, args.shots, seed, max_test=10)
        dev = draw_dev_set(task, pool, args.dev)
        dev_set = dataset.subset(dev)
        probe = ProbeHead.fit(task.data)
        base_dev = encode_dataset(encoder, dev_set)
        scores["probe"].append(float((probe.predict(base_dev) == dev_set.labels).mean()))
        print(f"seed {seed} probe dev acc {scores['probe'][-1]:.4f} (val {probe.config['val_accuracy']:.3f})", flush=True)
        images = ([dataset.sources[i] for i in task.split.train], [dataset.sources[i] for i in task.split.val])
        for text in args.settings:
            settings = FinetuneSettings(**parse(text))
            started = time.perf_counter()
            result = finetune_encoder(task.data, images[0], images[1], settings)
            seconds = time.perf_counter() - started
            dev_encoding = encode_dataset(result.encoder, dev_set, use_cache=False)
            acc = float((linear_logits(result.tensors, dev_encoding).argmax(1) == dev_set.labels).mean())
            scores.setdefault(text, []).append(acc)
            curve = " ".join(f"{h['val_accuracy']:.2f}" for h in result.history)
            print(f"seed {seed} {text}: dev acc {acc:.4f}  alpha {result.alpha}  best epoch {result.best_epoch}/"
                  f"{result.epochs_run}  val {result.val_accuracy:.3f}  curve [{curve}]  {seconds:.0f} s", flush=True)
    for text, values in scores.items():
        print(f"mean dev acc {np.mean(values):.4f} ({' '.join(f'{v:.4f}' for v in values)})  {text}")

if __name__ == "__main__":
    sys.exit(main())
