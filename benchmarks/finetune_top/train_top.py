"""One-off experiment (issue 13) behind the ``top`` recipe: train lite's last stage(s) + conv_head + bn2
on cached activations of the frozen stages (clean, flipped and VIEWS augmented views per image), then score
the SGD head and refitted probes on 500 held-out TRAINING-pool images (never test). Caches go to /tmp.
Run: OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/finetune_top/train_top.py SHOTS SEEDS VIEWS CONFIG...
  e.g. ... train_top.py 16 1,2,3 4 '{"stages":1,"lr":1e-3,"use_val":1}'   (see benchmarks/RESULTS.md)"""

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipxfer.datasets.labelled import load_dataset
from clipxfer.datasets.splits import partition_train_test
from clipxfer.encoders import load_encoder
from clipxfer.encoders.base import ImageEncoding
from clipxfer.fewshot.task import prepare_task
from clipxfer.finetune.model import head_logits, working_copy
from clipxfer.finetune.pixels import augment_batch, decode_pixels
from clipxfer.heads.linear import PARTS
from clipxfer.heads.probe import ProbeHead
from clipxfer.vector_math import l2_normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared dev-set draw
from finetune_recipe import draw_dev_set  # noqa: E402

torch.set_num_threads(1)
shots = int(sys.argv[1])
seeds = [int(s) for s in sys.argv[2].split(",")]
views = int(sys.argv[3])
configs = sys.argv[4:]
dataset = load_dataset("fashion-mnist")
encoder = load_encoder("lite")
pool, _ = partition_train_test(dataset)
CUT = 5  # cache output of blocks[:5]


def build(task, dev, src, work, m, prefix, seed):
    tr_px = decode_pixels([src[i] for i in task.split.train], 224)
    va_px = decode_pixels([src[i] for i in task.split.val], 224)
    gen = torch.Generator().manual_seed(seed)
    tr_views = [prefix(tr_px), prefix(tr_px[:, :, ::-1].copy())]
    va_views = [prefix(va_px), prefix(va_px[:, :, ::-1].copy())]
    for _ in range(views):
        tr_views.append(prefix(augment_batch(tr_px, gen, 0.6).numpy()))
        va_views.append(prefix(augment_batch(va_px, gen, 0.6).numpy()))
    return tr_views, va_views, prefix(decode_pixels([src[i] for i in dev], 224))


def run_seed(seed):
    task = prepare_task(encoder, dataset, shots, seed, max_test=10)
    dev = draw_dev_set(task, pool, 500)
    src = dataset.sources
    work, _, m = working_copy(encoder)

    @torch.no_grad()
    def prefix(px):
        out = []
        for i in range(0, len(px), 64):
            x = m.bn1(m.conv_stem(work.pixels_to_tensor(px[i : i + 64])))
            for st in m.blocks[:CUT]:
                x = st(x)
            out.append(x)
        return torch.cat(out)

    t0 = time.time()
    cpath = f"/tmp/ft13cache_{shots}_{seed}_{views}.pt"
    import os

    if os.path.exists(cpath):
        tr_views, va_views, dv0 = torch.load(cpath)
        tr0, va0 = tr_views[0], va_views[0]
    else:
        tr_views, va_views, dv0 = build(task, dev, src, work, m, prefix, seed)
        torch.save((tr_views, va_views, dv0), cpath)
        tr0, va0 = tr_views[0], va_views[0]
    dlab = dataset.labels[dev]
    print(f"seed {seed} cache {time.time() - t0:.0f}s", flush=True)
    state0 = {k: v.clone() for k, v in m.state_dict().items()}

    def suffix(x, start=CUT):
        for st in m.blocks[start:]:
            x = st(x)
        pooled = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return work._image_outputs((pooled, m.get_classifier()(pooled)))

    @torch.no_grad()
    def enc(x):
        e, f = [], []
        for i in range(0, len(x), 100):
            a, b = suffix(x[i : i + 100])
            e.append(a.float())
            f.append(b.float())
        return ImageEncoding(l2_normalize(torch.cat(e).numpy()), torch.cat(f).numpy())

    def probe_of(tr, va, prior="auto"):
        return ProbeHead.fit(replace(task.data, encoder=work, train=tr, val=va), prior=prior)

    global TL, VL
    TL, VL = task.data.train_labels, task.data.val_labels
    base = probe_of(enc(tr0), enc(va0))
    res = heads(enc(tr0), enc(va0), enc(dv0), dlab, probe_of)
    print(
        f"seed {seed} base: " + " ".join(f"{k} {v:.4f}" for k, v in res.items()),
        flush=True,
    )
    for cfg in configs:
        o = json.loads(cfg)
        m.load_state_dict(state0)
        for p in m.parameters():
            p.requires_grad_(False)
        stages = o.get("stages", 1)  # how many last stages move besides conv_head/bn2
        names = [
            n
            for n, _ in m.named_parameters()
            if n.startswith(("conv_head.", "bn2."))
            or any(n.startswith(f"blocks.{k}.") for k in range(7 - stages, 7))
        ]
        if o.get("bn_only"):
            names = [n for n in names if ".bn" in n or n.startswith("bn2.")]
        params = [m.get_parameter(n).requires_grad_(True) for n in names]
        start = {n: m.get_parameter(n).detach().clone() for n in names}
        use_val = o.get("use_val", 0)
        X = torch.cat(tr_views + (va_views if use_val else []))
        ntr, nva = len(tr0), len(va0)
        y1 = torch.as_tensor(task.data.train_labels)
        y2 = torch.as_tensor(task.data.val_labels)
        Y = torch.cat([y1] * len(tr_views) + ([y2] * len(va_views) if use_val else []))
        head0 = {
            k: torch.tensor(v, dtype=torch.float32)
            for k, v in base.weights.items()
            if k in PARTS
        }
        head = {k: v.clone().requires_grad_(True) for k, v in head0.items()}
        opt = torch.optim.AdamW(
            [
                {"params": params, "lr": o.get("lr", 1e-3), "weight_decay": 0.0},
                {
                    "params": list(head.values()),
                    "lr": o.get("hlr", 1e-2),
                    "weight_decay": 0.0,
                },
            ]
        )
        bs, E = 32, o.get("epochs", 10)
        # an "epoch" = one pass over the images (one random view each)
        steps = E * math.ceil((ntr + (nva if use_val else 0)) / bs)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, steps=steps: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )
        g = torch.Generator().manual_seed(seed)
        t0 = time.time()
        for s in range(steps):
            rows = torch.randint(len(X), (bs,), generator=g)
            e, f = suffix(X[rows])
            loss = F.cross_entropy(
                head_logits(head, e, f), Y[rows], label_smoothing=o.get("ls", 0.1)
            )
            if o.get("l2sp", 0):
                loss = loss + o["l2sp"] * sum(
                    (m.get_parameter(n) - w).pow(2).sum() for n, w in start.items()
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        tt = time.time() - t0
        dv, trn, van = enc(dv0), enc(tr0), enc(va0)
        sgd_acc = float(
            (
                head_logits(
                    {k: v.detach() for k, v in head.items()},
                    torch.as_tensor(dv.embeddings),
                    torch.as_tensor(dv.features),
                )
                .argmax(1)
                .numpy()
                == dlab
            ).mean()
        )
        res = heads(trn, van, dv, dlab, probe_of)
        print(
            f"seed {seed} {cfg}: sgd {sgd_acc:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in res.items())
            + f" loss {float(loss):.3f} train {tt:.0f}s",
            flush=True,
        )


from clipxfer.heads.linear import probe_inputs
from clipxfer.heads.probe import fit_logistic


def heads(tr, va, dv, dlab, probe_of):
    out = {}
    out["auto"] = float((probe_of(tr, va).predict(dv) == dlab).mean())
    out["none"] = float((probe_of(tr, va, "none").predict(dv) == dlab).mean())
    x = np.concatenate([probe_inputs(tr), probe_inputs(va)]).astype(np.float64)
    y = np.concatenate([TL, VL])
    xd = probe_inputs(dv).astype(np.float64)
    for l2 in (1e-4, 1e-3, 1e-2):
        p = fit_logistic(x, y, 10, l2)
        out[f"all{l2:g}"] = float(
            ((xd @ p["W"].numpy().T + p["b"].numpy()).argmax(1) == dlab).mean()
        )
    return out


for seed in seeds:
    run_seed(seed)
