"""One-off experiment (issue 13): BatchNorm re-estimation (AdaBN) on the labelled images, then the probe
refitted on the re-normalised features, scored on 500 held-out TRAINING-pool images (never test).
Run: OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/finetune_top/adabn.py SHOTS SEEDS DEV CONFIG...
  e.g. ... adabn.py 16 1 500 base '{"adabn":1}' '{"adabn":1,"copies":4}'   (see benchmarks/RESULTS.md)"""

import json
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
from clipxfer.finetune.pixels import augment_batch, decode_pixels
from clipxfer.heads.probe import ProbeHead
from clipxfer.vector_math import l2_normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared dev-set draw
from finetune_recipe import draw_dev_set  # noqa: E402

torch.set_num_threads(1)
shots = int(sys.argv[1])
seeds = [int(s) for s in sys.argv[2].split(",")]
ndev = int(sys.argv[3])
configs = sys.argv[4:]
dataset = load_dataset("fashion-mnist")
encoder = load_encoder("lite")
pool, _ = partition_train_test(dataset)


@torch.no_grad()
def feats(work, px, bs=64):
    E, Fe = [], []
    for i in range(0, len(px), bs):
        e, f = work._forward_images(work.pixels_to_tensor(px[i : i + bs]))
        E.append(e.float())
        Fe.append(f.float())
    return ImageEncoding(l2_normalize(torch.cat(E).numpy()), torch.cat(Fe).numpy())


@torch.no_grad()
def adabn(root, px, copies, crop, gen, bs=64, mix=1.0):
    bns = [m for m in root.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    batches = [px] + [augment_batch(px, gen, crop).numpy() for _ in range(copies)]
    allpx = np.concatenate(batches)
    order = torch.randperm(len(allpx), generator=gen).numpy()
    for i in range(0, len(allpx), bs):
        rows = order[i : i + bs]
        work._forward_images(work.pixels_to_tensor(allpx[rows]))
    for m, (mu, var) in zip(bns, old):
        m.eval()
        m.momentum = 0.1
        if mix != 1.0:
            m.running_mean.copy_(mu + mix * (m.running_mean - mu))
            m.running_var.copy_(var + mix * (m.running_var - var))


for seed in seeds:
    task = prepare_task(encoder, dataset, shots, seed, max_test=10)
    dev = draw_dev_set(task, pool, ndev)
    src = dataset.sources
    t0 = time.time()
    tr_px = decode_pixels([src[i] for i in task.split.train], 224)
    va_px = decode_pixels([src[i] for i in task.split.val], 224)
    dv_px = decode_pixels([src[i] for i in dev], 224)
    dlab = dataset.labels[dev]
    print(f"decode {time.time() - t0:.0f}s", flush=True)
    for cfg in configs:
        opts = json.loads(cfg) if cfg.startswith("{") else {}
        work, _, root = working_copy(encoder)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.time()
        if opts.get("adabn"):
            src_px = (
                np.concatenate([tr_px, va_px]) if opts.get("use_val", True) else tr_px
            )
            adabn(
                root,
                src_px,
                opts.get("copies", 0),
                opts.get("crop", 0.6),
                gen,
                mix=opts.get("mix", 1.0),
            )
        ta = time.time() - t0
        t0 = time.time()
        tr, va, dv = feats(work, tr_px), feats(work, va_px), feats(work, dv_px)
        tf = time.time() - t0
        probe = ProbeHead.fit(replace(task.data, encoder=work, train=tr, val=va))
        acc = float((probe.predict(dv) == dlab).mean())
        vacc = probe.config["val_accuracy"]
        print(
            f"seed {seed} {cfg}: dev {acc:.4f} val {vacc:.3f} prior {probe.config.get('chosen_prior')} l2 {probe.config['l2']:.2g} adabn {ta:.0f}s feats {tf:.0f}s",
            flush=True,
        )
