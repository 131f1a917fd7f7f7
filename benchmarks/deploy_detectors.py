"""Detector bundles against the toolkit: fit detectors as `clipxfer anomaly fit` does (``--methods auto``
is its default: calibrated fusion, members and working resolution chosen on validation parts), export
each fp32, and compare `Bundle.predict` with `AnomalyDetector.score` on the test parts of the seeded
texture set (`clipxfer anomaly textures`): image scores (max relative difference), maps (max absolute
difference), decisions.

    python benchmarks/deploy_detectors.py --model lite --texture brick --methods auto patchcore gaussian

Writes JSON to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite")
    parser.add_argument("--texture", default="brick")
    parser.add_argument("--methods", nargs="+", default=["auto"])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--good", type=int, default=60, help="good training parts (shots + validation + calibration)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy_detectors.json")
    args = parser.parse_args()

    from clipxfer.anomaly import fit_detector
    from clipxfer.anomaly.patches import encode_dense
    from clipxfer.anomaly.textures import build_texture_set
    from clipxfer.encoders import load_encoder
    from clipxfer.export import ExportSettings, export_artifact
    from clipxfer.images import find_images
    from clipxfer.runtime import Bundle

    work = Path(tempfile.mkdtemp(prefix="deploy-detectors-"))
    root = build_texture_set(work / "set", (args.texture,), train_good=args.good, test_good=10, per_local=2,
                             per_global=2) / args.texture  # fmt: skip
    good = sorted(find_images(root / "train" / "good"))
    test = sorted(find_images(root / "test"))
    encoder = load_encoder(args.model, "cpu", "fp32")
    rows = []
    for method in args.methods:
        detector = fit_detector(encoder, good, shots=args.shots, method=method)
        path = detector.save(work / f"{method}.safetensors")
        bundle_dir = work / f"{method}-bundle"
        export_artifact(ExportSettings(path, bundle_dir))
        expected = detector.score(encode_dense(encoder, test, resolution=detector.map_size))
        answer = Bundle.load(bundle_dir).predict(test)
        relative = np.abs(answer.scores - expected.scores) / np.maximum(np.abs(expected.scores), 1e-12)
        rows.append({
            "model": encoder.id, "asked": method, "method": detector.method, "members": detector.members,
            "resolution": detector.map_size, "tiles": json.loads((bundle_dir / "detector.json").read_text())["tiles"],
            "bundle_mb": round(folder_size(bundle_dir) / 1e6, 1), "test_parts": len(test),
            "max_score_rel_diff": float(relative.max()), "max_score_abs_diff": float(np.abs(answer.scores - expected.scores).max()),
            "max_map_abs_diff": float(np.abs(answer.maps - expected.maps).max()),
            "same_decisions": int(np.sum(answer.defect == detector.decide(expected.scores))),
            "flagged": int(answer.defect.sum()),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"texture": args.texture, "rows": rows}, indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
