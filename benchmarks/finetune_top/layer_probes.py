"""One-off experiment (issue 13): probes on the pooled outputs of lite's late stages, scored on 500
held-out TRAINING-pool images (never test). Run: OMP_NUM_THREADS=1 taskset -c 1 python
benchmarks/finetune_top/layer_probes.py SEED SHOTS   (see benchmarks/RESULTS.md)"""

import sys
import time

import numpy as np
import torch

from clipxfer.data import load_dataset
from clipxfer.encoders import load_encoder
from clipxfer.encoders.base import ImageEncoding, l2_normalize
from clipxfer.finetune.train import decode_pixels, working_copy
from clipxfer.heads.base import FewShotData
from clipxfer.heads.probe import ProbeHead
from clipxfer.sampling import partition_train_test
from clipxfer.transfer import prepare_task

torch.set_num_threads(1)
dataset = load_dataset("fashion-mnist")
encoder = load_encoder("lite")
pool, _ = partition_train_test(dataset)
seed = int(sys.argv[1])
shots = int(sys.argv[2])
task = prepare_task(encoder, dataset, shots, seed, max_test=10)
used = set(task.split.train) | set(task.split.val)
rest = np.array([i for i in pool if i not in used])
dev = np.sort(np.random.default_rng(1234).choice(rest, size=500, replace=False))
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
    f = lambda d: np.concatenate([l2_normalize(d[k]) for k in keys], 1)
    enc = lambda d: ImageEncoding(
        task.data.train.embeddings[:0].reshape(0, 384)
        if False
        else np.zeros((len(d[keys[0]]), 384), np.float32),
        f(d),
    )
    data = FewShotData(
        encoder=work,
        classnames=task.data.classnames,
        train=enc(tr),
        train_labels=task.data.train_labels,
        val=enc(va),
        val_labels=task.data.val_labels,
        zeroshot=task.data.zeroshot,
        shots=shots,
        seed=seed,
    )
    p = ProbeHead.fit(data, prior="none")
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
