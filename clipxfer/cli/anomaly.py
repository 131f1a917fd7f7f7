"""``clipxfer anomaly fit|score|textures``: defect detection from good images only."""

from __future__ import annotations

import csv
import sys

import click

from .common import emit_json, force_option, load_model, model_options
from .group import main


@main.group()
def anomaly():
    """Find and locate defects, learning from good images only (inspect).

    Example: clipxfer anomaly fit good/ --shots 16 --out det.safetensors
    """


@anomaly.command("fit")
@click.argument("good_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Detector file to write (.safetensors).")
@force_option
@click.option("--shots", default=16, show_default=True, type=click.IntRange(min=0),
              help="Good images the detector learns from; all others set the threshold. 0 = zero-shot (text only).")
@click.option("--false-alarm-rate", default=0.05, show_default=True, type=float,
              help="Share of good parts that may be flagged (split-conformal guarantee).")
@click.option("--method", type=click.Choice(["auto", "patchcore", "zeroshot", "combined"]), default="auto", show_default=True,
              help="auto: combined for open_clip ViTs with shots, patchcore for lite, zeroshot with --shots 0.")
@click.option("--object", "object_name", default="object", show_default=True, help="What the part is, for the zero-shot prompts.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draw of shots and of the coreset.")
@click.option("--json", "as_json", is_flag=True, help="Print the detector's metadata as JSON.")
@model_options
def fit(good_dir, out, force, shots, false_alarm_rate, method, object_name, seed, as_json, model, device, precision):
    """Fit an anomaly detector on the good images in GOOD_DIR.

    PatchCore (Roth et al., 2022): a coreset memory bank of locally aggregated multi-scale patch
    features from --shots good images, searched with faiss. Zero-shot (WinCLIP state prompts, open_clip
    ViTs only) needs no shots; combined averages both. The remaining good images are held out to set
    the threshold by split conformal prediction: at most --false-alarm-rate of good parts are flagged
    (when good parts are exchangeable with them); a warning says when there are too few.

    Example: clipxfer anomaly fit good/ --shots 16 --out det.safetensors
    """
    from ..anomaly import fit_detector
    from ..calibrate import check_alpha
    from ..encoders.artifacts import claim_output
    from ..errors import ClipxferError
    from ..images import find_images

    check_alpha(false_alarm_rate, "--false-alarm-rate")
    out = claim_output(out, force, "detector")  # before any fitting
    good = list(find_images(good_dir))
    if not good:
        raise ClipxferError(f"{good_dir}: no images found")
    encoder = load_model(model, device, precision)
    detector = fit_detector(encoder, good, shots, false_alarm_rate, method, object_name, seed, progress=True)
    path = detector.save(out)
    if as_json:
        emit_json({"detector": str(path), **detector.metadata()})
        return
    config = detector.config
    threshold = "none (too few held-out good images)" if config["threshold"] is None else f"{config['threshold']:.4g}"
    click.echo(
        f"{path}: {config['method']} detector, {config['shots']} shots, model {detector.model_id}\n"
        f"threshold {threshold} for a false-alarm rate of {config['false_alarm_rate']:g}, "
        f"calibrated on {config['calibration_size']} held-out good images"
        + (f"; memory bank {config['bank_size']} patches" if "bank_size" in config else "")
    )


@anomaly.command("score")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--detector", "detector_path", required=True, type=click.Path(dir_okay=False), help="Detector file (anomaly fit).")
@click.option("--heatmaps", type=click.Path(file_okay=False),
              help="Write an overlay PNG per image here (same layout, NAME.EXT.png); a new or empty folder when it "
                   "overlaps FOLDER.")
@click.option("--roc", type=click.Path(dir_okay=False), help="Labelled FOLDER: write the ROC figure here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (keys below).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows: path,score,decision[,label].")
@click.option("--model", default=None, metavar="SPEC", help="Encoder; default: the detector's own (another is refused).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
def score(folder, detector_path, heatmaps, roc, as_json, as_csv, model, device, precision):
    """Score the images in FOLDER: anomaly score, decision ok|defect, heat maps.

    A labelled FOLDER (good/ plus one folder per defect kind, optional ground_truth/<kind>/ masks) is
    also evaluated: image AUROC and AP, pixel AUROC and AUPRO (with masks), and the false-alarm and
    miss rates at the detector's threshold.

    \b
    --json prints an object with the keys:
      detector, model, method, threshold, false_alarm_rate   the detector's settings
      n, n_defect                   images scored, images decided defect (null without a threshold)
      results                       [{path, score, decision[, label]}]; decision is ok, defect, or
                                    unknown for every image when the detector has no threshold
      metrics                       labelled only (else null): image_auroc, image_ap, pixel_auroc, aupro,
                                    false_alarm_rate, miss_rate, threshold, n_good, n_defect, per_kind_image_auroc
      heatmaps, roc, skipped        folder and figure written (or null), unreadable files

    Example: clipxfer anomaly score test/ --detector det.safetensors --heatmaps maps/
    """
    from ..anomaly import load_detector, score_folder
    from ..encoders.ids import spec_for_id
    from ..encoders.registry import precision_for_id
    from ..errors import ClipxferError

    if as_json and as_csv:
        raise ClipxferError("choose one of --json and --csv")
    detector = load_detector(detector_path)
    # As a head or an index: `auto` loads the precision the detector's model id names (float or int8).
    encoder = load_model(model or spec_for_id(detector.model_id), device, precision_for_id(detector.model_id, precision))
    result = score_folder(detector, encoder, folder, heatmaps, roc, progress=True)
    rows = result.rows()
    n_defect = int(result.decisions.sum()) if result.calibrated else None
    if as_json:
        emit_json({
            "detector": detector_path, "model": detector.model_id, "method": detector.method,
            "threshold": detector.config["threshold"], "false_alarm_rate": detector.config["false_alarm_rate"],
            "n": len(rows), "n_defect": n_defect, "results": rows, "metrics": result.metrics,
            "heatmaps": heatmaps, "roc": roc, "skipped": result.skipped,
        })  # fmt: skip
        return
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return
    for row in rows:
        click.echo(f"{row['decision']:<6} {row['score']:10.4f}  {row['path']}" + (f"  [{row['label']}]" if "label" in row else ""))
    if result.calibrated:
        click.echo(f"{len(rows)} images, {n_defect} defect at threshold {result.threshold:.4g}")
    else:
        click.echo(f"{len(rows)} images, decisions unknown: the detector has no calibrated threshold")
    if result.metrics:
        m = result.metrics
        fields = ["image_auroc", "image_ap", "pixel_auroc", "aupro", "false_alarm_rate", "miss_rate"]
        click.echo("  ".join(f"{name} {m[name]:.3f}" for name in fields if m.get(name) is not None))
    if heatmaps:
        click.echo(f"wrote {len(result.heatmaps)} overlays under {heatmaps}")


@anomaly.command("textures")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-good", default=120, show_default=True, type=click.IntRange(min=1), help="Good training images per texture.")
@click.option("--test-good", default=60, show_default=True, type=click.IntRange(min=1), help="Good test images per texture.")
@click.option("--per-defect", default=12, show_default=True, type=click.IntRange(min=1), help="Test images per defect kind.")
def textures(out, seed, train_good, test_good, per_defect):
    """Build the seeded defect set from scikit-image's texture photos (brick, grass, gravel) in OUT,
    in MVTec-AD's layout: train/good, test/good, test/<defect>, ground_truth/<defect> masks.

    Example: clipxfer anomaly textures textures/ --seed 0
    """
    from ..anomaly import build_texture_set

    build_texture_set(out, train_good=train_good, test_good=test_good, per_local=per_defect, per_global=per_defect, seed=seed)
    click.echo(f"wrote {out}: brick, grass, gravel (train/good, test/, ground_truth/) and defects.json")
