"""int8 quality gate: the same benchmark cells with a float and an int8 encoder, and their cosine.

    python benchmarks/int8_quality.py --model lite --data fashion-mnist --shots 16 --seeds 1,2,3 \
        --max-test 1000 --out /tmp/int8-quality

Runs ``zeroshot`` and ``probe`` through the bench runner (the code path of ``clipxfer bench``) once
with ``--reference`` (default torch:fp32) and once with ``--candidate`` (default openvino:int8), and
compares the encoded images (test and drawn training items) and probe features row by row. The gate of issue 12: accuracy
within 0.01 of the reference and embedding cosine >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipxfer.bench.config import BenchConfig, DatasetSpec  # noqa: E402
from clipxfer.bench.run import prepare_dataset, run_bench
from clipxfer.encoders import load_encoder  # noqa: E402


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--shots", default="16")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--reference", default="torch:fp32")
    parser.add_argument("--candidate", default="openvino:int8")
    parser.add_argument("--out", type=Path, default=Path("/tmp/int8-quality"))
    args = parser.parse_args()

    config = BenchConfig(
        datasets=(DatasetSpec(args.data, max_test=args.max_test),),
        methods=("zeroshot", "probe"),
        shots=tuple(int(s) for s in args.shots.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        model=args.model,
    )
    report = {"model": args.model, "data": args.data, "max_test": args.max_test}
    encodings = {}
    for role, request in (("reference", args.reference), ("candidate", args.candidate)):
        encoder = load_encoder(args.model, device="cpu", precision=request)
        table = run_bench(config, args.out / role, encoder=encoder)
        accuracy = table.groupby("method")["accuracy"].agg(["mean", "std"]).round(4)
        report[role] = {"request": request, "id": encoder.id, "accuracy": accuracy.to_dict(orient="index")}
        if getattr(encoder, "image_runtime", None) is not None:
            report[role]["openvino_cache"] = {k: v for k, v in encoder.image_runtime.metadata.items() if k != "sha256"}
        encodings[role] = prepare_dataset(config.datasets[0], config, encoder).encoding  # cached on disk by run_bench
    for kind in ("embeddings", "features"):
        cos = cosine_rows(getattr(encodings["reference"], kind), getattr(encodings["candidate"], kind))
        report[f"{kind}_cosine"] = {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4),
                                    "p01": round(float(np.quantile(cos, 0.01)), 4)}
    ref, cand = report["reference"]["accuracy"], report["candidate"]["accuracy"]
    report["accuracy_drop"] = {m: round(ref[m]["mean"] - cand[m]["mean"], 4) for m in ref}
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
