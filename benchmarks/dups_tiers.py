"""``clipxfer dups`` copy tier: precision and recall on real photos with generated copies and real
look-alikes, with the lite encoder.

Collection: scikit-image's sample photos plus Fashion-MNIST test images (many per class: different
photos of one kind of garment, the real look-alikes). Copies: one per original in a seeded subset,
made with edits *other* than the ones the copy threshold is learned from (see ``held_out_copy``:
stronger resizing, grayscale after a crop, hue rotation, contrast). A copy-tier pair is correct when it
joins an original and its own copy; recall is the share of copies paired with their original.

    python benchmarks/dups_tiers.py --fashion 200 --copies 60
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clipxfer.datasets.labelled import fashion_mnist  # noqa: E402
from clipxfer.encoders import cached_encoder  # noqa: E402
from clipxfer.index import Index  # noqa: E402
from clipxfer.sample_photos import export_sample_photos  # noqa: E402


def held_out_copy(img: Image.Image, kind: int) -> Image.Image:
    """Copy edits not used for learning the threshold."""
    img = img.convert("RGB")
    small = min(img.size) < 64
    if kind == 0:  # heavy downscale (upscale for thumbnails) + JPEG
        factor = 3.0 if small else 1 / 3
        img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BICUBIC)
        return _jpeg(img, 60)
    if kind == 1:  # small crop, then grayscale
        dx, dy = round(img.width * 0.04), round(img.height * 0.04)
        return ImageOps.grayscale(img.crop((dx, dy, img.width - dx, img.height - dy))).convert("RGB")
    if kind == 2:  # hue rotation + JPEG
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + 40) % 256
        return _jpeg(Image.fromarray(hsv, "HSV").convert("RGB"), 70)
    factor = 1.4 if small else 0.7  # resize + contrast
    img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.LANCZOS)
    return ImageEnhance.Contrast(img).enhance(1.3)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def build_collection(folder: Path, fashion: int, copies: int, seed: int) -> tuple[dict[str, str], dict[str, int]]:
    """Write originals and copies; returns copy name -> original name and Fashion-MNIST name -> class."""
    originals = [Path(p) for p in export_sample_photos(folder)]
    data = fashion_mnist().split("test")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data), fashion, replace=False)
    classes = {}
    for row in rows:
        path = folder / f"fm-{row:05d}.png"
        Image.fromarray(np.asarray(data.sources[row])).save(path)
        originals.append(path)
        classes[path.name] = int(data.labels[row])
    copy_of = {}
    for n, i in enumerate(rng.choice(len(originals), min(copies, len(originals)), replace=False)):
        source = originals[i]
        target = folder / f"copy-{n:03d}-{source.stem}.jpg"
        held_out_copy(Image.open(source), n % 4).save(target, quality=92)
        copy_of[target.name] = source.name
    return copy_of, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=int, default=200, help="Fashion-MNIST test images in the collection")
    parser.add_argument("--copies", type=int, default=60, help="originals that get a generated copy")
    parser.add_argument("--lookalike-threshold", type=float, default=0.9)
    parser.add_argument("--learn-from", type=int, default=None, help="images copied to learn the copy rule")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    encoder = cached_encoder("lite", "cpu", None)
    with tempfile.TemporaryDirectory() as tmp:
        folder, index_path = Path(tmp) / "photos", Path(tmp) / "index"
        folder.mkdir()
        copy_of, classes = build_collection(folder, args.fashion, args.copies, args.seed)
        Index.update(folder, encoder, path=index_path, workers=0)
        with Index.open(index_path) as idx:
            report = idx.duplicate_groups(args.lookalike_threshold, encoder, args.learn_from, seed=args.seed)
    truth = {frozenset((c, o)) for c, o in copy_of.items()}
    tiers = {}
    for tier in ("exact", "copy", "lookalike"):
        pairs = {frozenset((a.path.name, b.path.name)) for g in report.groups if g.tier == tier
                 for a, b in combinations(g.members, 2)}
        same_class = sum(1 for p in pairs if len(p & classes.keys()) == 2 and len({classes[n] for n in p}) == 1)
        tiers[tier] = {"groups": sum(g.tier == tier for g in report.groups), "pairs": len(pairs),
                       "true_copy_pairs": len(pairs & truth), "fashion_same_class_pairs": same_class}
    found = tiers["copy"]["true_copy_pairs"]
    print(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "model": encoder.id,
        "images": len(copy_of) + 19 + args.fashion,
        "copies": len(copy_of),
        "copy_threshold": round(report.copy_threshold, 4),
        "copy_margin": round(report.copy_margin, 4),
        "learned_from": report.learned_from,
        "space": report.space,
        "images_compared": report.images_compared,
        "copy_precision": round(found / tiers["copy"]["pairs"], 4) if tiers["copy"]["pairs"] else None,
        "copy_recall": round(found / len(truth), 4),
        "tiers": tiers,
    }, indent=1))


if __name__ == "__main__":
    main()
