"""One-off experiment (issue 13): probes on the pooled outputs of lite's late stages, scored on 500
held-out TRAINING-pool images (never test). Run: OMP_NUM_THREADS=1 taskset -c 1 python
benchmarks/finetune_top/layer_probes.py SEED SHOTS   (see benchmarks/RESULTS.md)"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from clipxfer.datasets.labelled import load_dataset
from clipxfer.datasets.splits import partition_train_test
from clipxfer.encoders import load_encoder
from clipxfer.encoders.base import ImageEncoding
from clipxfer.fewshot.task import prepare_task
from clipxfer.finetune.model import working_copy
from clipxfer.finetune.pixels import decode_pixels
from clipxfer.heads.probe import ProbeHead
from clipxfer.vector_math import l2_normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared dev-set draw
from finetune_recipe import draw_dev_set  # noqa: E402

torch.set_num_threads(1)
dataset = load_dataset("fashion-mnist")
encoder = load_encoder("lite")
pool, _ = partition_train_test(dataset)
seed = int(sys.argv[1])
shots = int(sys.argv[2])
task = prepare_task(encoder, dataset, shots, seed, max_test=10)
dev = draw_dev_set(task, pool, 500)
src = dataset.sources
work, _, m = working_copy(encoder)


@torch.no_grad()
def layerfeats(px):
    out = {}
    for i in range(0, len(px), 64):
        x = m.bn1(m.conv_stem(work.pixels_to_tensor(px[i : i + 64])))
        d = {}
        for k, st in enumerate(m.blocks):
            x = st(x)
            if k >= 3:
                d[f"b{k}"] = x.float().mean((2, 3))
        x = m.bn2(m.conv_head(x))
        d["head"] = x.float().mean((2, 3))
        for k, v in d.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


t0 = time.time()
tr = layerfeats(decode_pixels([src[i] for i in task.split.train], 224))
va = layerfeats(decode_pixels([src[i] for i in task.split.val], 224))
dv = layerfeats(decode_pixels([src[i] for i in dev], 224))
print(f"feats {time.time() - t0:.0f}s", flush=True)


def probe(keys):
    def enc(d):  # the probe reads only the features (prior "none"); the embeddings are placeholders
        features = np.concatenate([l2_normalize(d[k]) for k in keys], 1)
        return ImageEncoding(np.zeros((len(features), 384), np.float32), features)

    p = ProbeHead.fit(replace(task.data, encoder=work, train=enc(tr), val=enc(va)), prior="none")
    return float((p.predict(enc(dv)) == dataset.labels[dev]).mean())


for keys in (
    ["head"],
    ["b6"],
    ["b5"],
    ["b4"],
    ["b3"],
    ["b5", "head"],
    ["b4", "b5", "head"],
    ["b4", "b6"],
):
    print(keys, f"{probe(keys):.4f}", flush=True)
