"""Building a zero-shot head: 1000 ImageNet classes x 80 templates, against open_clip's own
``build_zero_shot_classifier`` on fp32, in one process.

    python benchmarks/text_head.py --model ViT-B-32:random [--classes 1000] [--baseline-classes 25] --json

Reports seconds for our first build (one batched pass: prompts sorted by length, padding after
the longest prompt of each batch trimmed, the encoder's precision), the cached rebuild, and
prompts/s of both, with the ratio. open_clip's loop is timed on fewer classes (its per-prompt
rate does not depend on the class count) to keep the run short on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--baseline-classes", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["CLIPXFER_CACHE"] = tempfile.mkdtemp(prefix="clipxfer-text-bench-")  # start uncached

    import open_clip
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from clipxfer.datasets.prompts import load_templates
    from clipxfer.encoders import load_encoder
    from clipxfer.heads.zeroshot import fit_zeroshot

    encoder = load_encoder(args.model, device=args.device)
    classes = list(IMAGENET_CLASSNAMES[: args.classes])
    templates = load_templates("openai_imagenet")
    prompts = len(classes) * len(templates)

    started = time.perf_counter()
    fit_zeroshot(encoder, classes, templates)
    first = time.perf_counter() - started
    started = time.perf_counter()
    fit_zeroshot(encoder, classes, templates)
    cached = time.perf_counter() - started

    result = {
        "model": encoder.id,
        "device": str(encoder.device),
        "precision": str(encoder.dtype).removeprefix("torch."),
        "classes": len(classes),
        "templates": len(templates),
        "first_build_s": round(first, 2),
        "cached_build_s": round(cached, 4),
        "prompts_per_s": round(prompts / first, 1),
    }
    if hasattr(encoder, "model"):  # open_clip: time open_clip's own loop on an fp32 copy
        model_name = encoder.model_name
        pretrained = encoder.pretrained if encoder.pretrained not in (None, "random") else None
        baseline = open_clip.create_model(model_name, pretrained=pretrained).eval().to(encoder.device)
        tokenizer = open_clip.get_tokenizer(model_name)
        few = list(IMAGENET_CLASSNAMES[: args.baseline_classes])
        started = time.perf_counter()
        with torch.no_grad():
            open_clip.build_zero_shot_classifier(baseline, tokenizer, few, OPENAI_IMAGENET_TEMPLATES, device=encoder.device)
        base_seconds = time.perf_counter() - started
        base_rate = len(few) * len(OPENAI_IMAGENET_TEMPLATES) / base_seconds
        result.update(
            baseline_classes=len(few),
            baseline_prompts_per_s=round(base_rate, 1),
            baseline_projected_s=round(prompts / base_rate, 1),
            ratio=round(result["prompts_per_s"] / base_rate, 2),
        )
    print(json.dumps(result, indent=2) if args.json else result)


if __name__ == "__main__":
    main()
