"""Deploy figures: bundle size per method and precision, agreement of bundles with `clipxfer predict`,
runtime-only install size, and (with --speed, on a quiet machine) cold start and single-image latency.

    python benchmarks/deploy.py --model lite --methods probe tip lpp clap mix zeroshot --test 200
    python benchmarks/deploy.py --model ViT-B-32:random --methods probe --test 50
    python benchmarks/deploy.py --model lite --methods probe --speed --runtime-venv /path/to/runtime-venv

Heads are fitted on 40 Fashion-MNIST test images (4 per class, from rows 0-39) with 40 more for
validation (rows 40-79) and compared on the next ``--test`` rows. int8 bundles calibrate as export does
by default: on the fitting images the manifest beside each head names (``--calibration manifest``).
Cold start is process start to the first answer, for `clipxfer-run BUNDLE one.png` (in ``--runtime-venv`` when given: a venv with only numpy,
pillow, openvino and clipxfer --no-deps) and for `python -m clipxfer predict HEAD folder-of-one`.
Latency is `Bundle.predict([one path])` (decode included) over ``--repeats`` calls after 5 warm-ups,
throughput batches of 16. Writes JSON to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def write_fit_images(images, work: Path) -> Path:
    """The 80 fitting rows (train 0-39, val 40-79) as files and a drawn manifest in the format training
    commands write beside a head (path,label,split): what ``export --precision int8`` calibrates on."""
    import csv

    folder = work / "fit"
    folder.mkdir()
    rows = []
    for i, pixels in enumerate(images.subset(range(80)).sources):
        Image.fromarray(np.asarray(pixels)).save(folder / f"{i:03d}.png")
        rows.append((f"fit/{i:03d}.png", images.classnames[images.labels[i]], "train" if i < 40 else "val"))
    manifest = work / "fit.manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    return manifest


def fit_heads(model: str, methods: list[str], work: Path, test_rows: int, with_manifest: bool):
    from clipxfer.calibrate.sets import calibrate_on
    from clipxfer.datasets.labelled import fashion_mnist
    from clipxfer.datasets.prompts import load_templates
    from clipxfer.encoders import load_encoder
    from clipxfer.heads.base import FewShotData
    from clipxfer.heads.fitting import fit_head
    from clipxfer.heads.zeroshot import fit_zeroshot

    images = fashion_mnist().split("test")
    encoder = load_encoder(model, "cpu", "fp32")
    train, val = images.subset(range(40)), images.subset(range(40, 80))
    test = images.subset(range(80, 80 + test_rows))
    folder = work / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(test.sources):
        Image.fromarray(np.asarray(pixels)).save(folder / f"{i:04d}.png")
    train_enc, val_enc = encoder.embed_images(list(train.sources)), encoder.embed_images(list(val.sources))
    zeroshot = fit_zeroshot(encoder, images.classnames, load_templates("simple"))
    data = FewShotData(encoder, images.classnames, train_enc, train.labels, val_enc, val.labels, zeroshot, 4, 0)
    manifest = write_fit_images(images, work) if with_manifest else None
    heads = {}
    for method in methods:
        head = fit_head(method, data)
        head.config["calibration"] = calibrate_on(head, val_enc, val.labels, "val").to_config()
        heads[method] = head.save(work / f"{method}.safetensors")
        if manifest:  # beside the head, as `clipxfer probe ...` leaves it
            (work / f"{method}.manifest.csv").write_bytes(manifest.read_bytes())
    return encoder, heads, folder


def timed_run(command: list[str], env=None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def speed(bundle_dir: Path, head: Path, image: Path, repeats: int, runtime_venv: Path | None) -> dict:
    from clipxfer.runtime import Bundle

    python = str(runtime_venv / "bin" / "python") if runtime_venv else sys.executable
    env = {**os.environ, "PYTHONPATH": "" if runtime_venv else str(ROOT)}
    one = Path(tempfile.mkdtemp()) / "one"
    one.mkdir()
    (one / image.name).write_bytes(image.read_bytes())
    cold_runtime = min(timed_run([python, "-m", "clipxfer.runtime.cli", str(bundle_dir), str(image)], env)
                       for _ in range(3))  # fmt: skip
    cold_full = min(timed_run([sys.executable, "-m", "clipxfer", "predict", str(head), str(one)],
                              {**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(3))  # fmt: skip
    bundle = Bundle.load(bundle_dir)
    for _ in range(5):
        bundle.predict([image])
    latencies = []
    for _ in range(repeats):
        started = time.perf_counter()
        bundle.predict([image])
        latencies.append(1000 * (time.perf_counter() - started))
    batch = [image] * 16
    started = time.perf_counter()
    for _ in range(10):
        bundle.predict(batch)
    throughput = 160 / (time.perf_counter() - started)
    return {"cold_start_runtime_s": round(cold_runtime, 2), "cold_start_predict_s": round(cold_full, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1), "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "throughput_img_s": round(throughput, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite")
    parser.add_argument("--methods", nargs="+", default=["probe", "tip", "lpp", "clap", "mix", "zeroshot"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--test", type=int, default=200, help="test images compared with clipxfer predict")
    parser.add_argument("--calibration", choices=["manifest", "photos", "data"], default="manifest",
                        help="int8 calibration images: export's default (the 80 fitting images, named by the manifest "
                             "beside each head), scikit-image's sample photos (no manifest), or the 80 fitting images "
                             "as --calibration-images")
    parser.add_argument("--speed", action="store_true", help="also cold start and latency (quiet machine only)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--runtime-venv", type=Path, default=None, help="a venv with only the runtime installed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = parser.parse_args()
    os.environ.setdefault("CLIPXFER_RUNTIME", "torch")  # the toolkit side of the comparison runs torch fp32

    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.fewshot.predict import predict
    from clipxfer.runtime import Bundle

    work = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    encoder, heads, folder = fit_heads(args.model, args.methods, work, args.test, args.calibration == "manifest")
    paths = sorted(folder.glob("*.png"))
    calibration = None
    if args.calibration == "data":  # the training and validation rows, never the test rows
        from clipxfer.datasets.labelled import fashion_mnist

        calibration = work / "calibration"
        calibration.mkdir()
        for i, pixels in enumerate(fashion_mnist().split("test").subset(range(80)).sources):
            Image.fromarray(np.asarray(pixels)).save(calibration / f"{i:03d}.png")
    rows = []
    for method, head in heads.items():
        _, table, probs = predict(head, folder, encoder=encoder)
        for precision in args.precisions:
            bundle_dir = work / f"{method}-{precision}"
            export_artifact(ExportSettings(head, bundle_dir, precision=precision, calibration_images=calibration))
            answer = Bundle.load(bundle_dir).predict(paths)
            row = {"model": encoder.id, "method": method, "precision": precision, "int8_calibration": args.calibration,
                   "bundle_mb": round(folder_size(bundle_dir) / 1e6, 2), "images": len(paths),
                   "top1_agreement": round(float(np.mean(np.array(answer.labels) == table.label.values)), 4),
                   "max_prob_diff": float(np.abs(answer.probs - probs).max())}  # fmt: skip
            if args.speed:
                row.update(speed(bundle_dir, head, paths[0], args.repeats, args.runtime_venv))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {"rows": rows, "full_venv_mb": round(folder_size(Path(sys.prefix)) / 1e6),
              "runtime_venv_mb": round(folder_size(args.runtime_venv) / 1e6) if args.runtime_venv else None}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2g}" if k == "max_prob_diff" else str(row[k]) for k in keys) + " |")
    print(f"full venv {result['full_venv_mb']} MB; runtime venv {result['runtime_venv_mb']} MB")


if __name__ == "__main__":
    main()
