"""anomalib's PatchCore on the texture set with the same lite features (EfficientNet-Lite0
stages 2 and 4, our packaged weights), for a side-by-side with clipxfer's detector.

Run in a separate virtual environment that has anomalib (it pulls lightning, kornia, opencv...):
    python -m venv --system-site-packages /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    PYTHONPATH=. /tmp/anomalib-venv/bin/python benchmarks/anomalib_patchcore.py /tmp/tex --shots 16 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from clipxfer.anomaly.detector import split_good
from clipxfer.anomaly.evaluate import detection_metrics, load_labelled_folder, read_mask
from clipxfer.anomaly.patches import whole_image
from clipxfer.bench.anomaly import find_categories
from clipxfer.encoders.lite import _import_image_packages, load_efficientnet_lite0
from clipxfer.images import find_images


def pixels(paths, size=224):
    batch = np.stack([whole_image(p, size)[0] for p in paths]).astype(np.float32) / 255.0
    return (torch.from_numpy(batch).permute(0, 3, 1, 2) - 0.5) / 0.5  # lite's normalisation


def main():
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1,2,3")
    args = parser.parse_args()
    timm, weights = _import_image_packages()
    source = load_efficientnet_lite0(timm, weights).state_dict()
    for category in find_categories(args.data):
        train = list(find_images(category / "train" / "good"))
        test = load_labelled_folder(category / "test")
        test_pixels = pixels(test.paths)
        masks = np.stack([read_mask(m, 224) for m in test.masks])
        has_mask = np.array([m is not None for m in test.masks])
        local = np.array([k == "good" or has_mask[i] for i, k in enumerate(test.kinds)])
        for seed in [int(s) for s in args.seeds.split(",")]:
            torch.manual_seed(seed)
            model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0", pre_trained=False)
            extractor = model.feature_extractor.feature_extractor
            missing, _ = extractor.load_state_dict(source, strict=False)
            assert not missing, missing
            started = time.perf_counter()
            fit_rows, _ = split_good(len(train), args.shots, seed)
            model.train()
            with torch.no_grad():
                model(pixels([train[i] for i in fit_rows]))
            model.subsample_embedding(0.1)
            model.eval()
            with torch.no_grad():
                out = model(test_pixels)
            seconds = time.perf_counter() - started
            scores = out.pred_score.numpy().ravel()
            maps = out.anomaly_map.squeeze(1).numpy()
            metrics = detection_metrics(scores[local], test.is_defect[local], np.inf, maps[local], masks[local])
            print(f"{category.name} shots={args.shots} seed={seed} bank={len(model.memory_bank)} "
                  f"image_auroc={metrics['image_auroc']:.3f} pixel_auroc={metrics['pixel_auroc']:.3f} "
                  f"aupro={metrics['aupro']:.3f} seconds={seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
