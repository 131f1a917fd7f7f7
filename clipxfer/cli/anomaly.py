"""``clipxfer anomaly fit|score|textures``: defect detection from good images only."""

from __future__ import annotations

import click

from .common import emit_csv, emit_json, force_option, load_model, model_options
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
@click.option("--method", type=click.Choice(["auto", "fused", "patchcore", "gaussian", "zeroshot", "combined"]), default="auto",
              show_default=True, help="auto: fused (calibrated fusion of the detectors validation picks) with shots, "
                                      "zeroshot with --shots 0.")
@click.option("--members", default=None, metavar="LIST",
              help="Fused detectors, e.g. patchcore,gaussian (default: chosen by validation from patchcore, gaussian, "
                   "zeroshot).")
@click.option("--resolution", default="auto", show_default=True, metavar="N|native|auto",
              help="Working size parts are squashed to (tiled at the encoder's input above it). auto: the input or "
                   "~1.7x it, chosen by validation (fused); the input for other methods.")
@click.option("--defects", "defects_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Real defect images: choose settings on them instead of synthetic flaws (never used to calibrate).")
@click.option("--object", "object_name", default="object", show_default=True, help="What the part is, for the zero-shot prompts.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draw of shots and of the coreset.")
@click.option("--layout", type=click.Choice(["auto", "single", "types"]), default="auto", show_default=True,
              help="types: one subfolder of good images per part type (routed detector); single: all images below "
                   "GOOD_DIR are one type; auto: types when GOOD_DIR holds no image itself and 2+ subfolders with images.")
@click.option("--json", "as_json", is_flag=True, help="Print the detector's metadata as JSON.")
@model_options
def fit(good_dir, out, force, shots, false_alarm_rate, method, members, resolution, defects_dir, object_name, seed, layout,
        as_json, model, device, precision):
    """Fit an anomaly detector on the good images in GOOD_DIR.

    Detectors: patchcore (local: nearest good patch), gaussian (global: Mahalanobis distance of pooled
    feature statistics), zeroshot (WinCLIP prompts, open_clip ViTs). The default fuses them: each gets
    a conformal threshold at --false-alarm-rate / members on held-out good images, and a part is a
    defect when any member is past its threshold, so at most --false-alarm-rate of good parts are
    flagged (when good parts are exchangeable with the held-out ones). Members and resolution are
    chosen on a few other held-out goods with synthetic flaws pasted in (or --defects).

    With one subfolder per part type (GOOD_DIR/TYPE/, or GOOD_DIR/TYPE/train/good/), one detector is
    fitted per type and each part is routed to the type whose shots' pooled patch features it is
    nearest to; that type's detector and threshold decide (see --layout).

    Example: clipxfer anomaly fit good/ --shots 16 --out det.safetensors
    """
    from ..anomaly import fit_detector
    from ..anomaly.routing import fit_routed_detector, part_type_folders
    from ..calibrate import check_alpha
    from ..encoders.artifacts import claim_output
    from ..errors import ClipxferError
    from ..images import find_images

    check_alpha(false_alarm_rate, "--false-alarm-rate")
    chosen = [m.strip() for m in members.split(",") if m.strip()] if members else None
    if chosen and method not in ("auto", "fused"):
        raise ClipxferError(f"--members names the detectors of a fused detector: use it with --method auto or fused, not {method}")
    out = claim_output(out, force, "detector")  # before any fitting
    types = part_type_folders(good_dir) if layout != "single" else None
    if layout == "types" and types is None:
        raise ClipxferError(f"{good_dir}: --layout types needs two or more subfolders of good images and no image at the top")
    if types is not None:
        if defects_dir:
            raise ClipxferError("--defects is for one part type: fit each type on its own to choose settings on real defects")
        click.echo(f"{good_dir}: {len(types)} part types, one subfolder each ({', '.join(types)}): fitting one routed "
                   "detector (--layout single fits them as one type)", err=True)
        encoder = load_model(model, device, precision)
        routed = fit_routed_detector(encoder, types, shots, false_alarm_rate, method, seed, progress=True,
                                     resolution=resolution, members=chosen)  # fmt: skip
        path = routed.save(out)
        if as_json:
            emit_json({"detector": str(path), **routed.metadata()})
            return
        routing = routed.config["routing"]
        click.echo(f"{path}: routed detector over {len(types)} part types ({routed.map_size} px), {shots} shots each, "
                   f"model {routed.model_id}")
        for name, detector in routed.types.items():
            click.echo(f"  {name}: {detector.config['method']} ({'+'.join(detector.members)}), calibrated on "
                       f"{detector.config['calibration_size']} held-out good images")
        if routing["held_out_accuracy"] is not None:
            click.echo(f"routing: {routing['held_out_accuracy']:.3f} of held-out good parts went to their own type "
                       f"(median margin {routing['held_out_median_margin']:.3g})")
        return
    good = list(find_images(good_dir))
    if not good:
        raise ClipxferError(f"{good_dir}: no images found")
    defects = list(find_images(defects_dir)) if defects_dir else None
    if defects_dir and not defects:
        raise ClipxferError(f"{defects_dir}: no images found")
    encoder = load_model(model, device, precision)
    detector = fit_detector(encoder, good, shots, false_alarm_rate, method, object_name, seed, progress=True,
                            resolution=resolution, defects=defects, members=chosen)  # fmt: skip
    path = detector.save(out)
    if as_json:
        emit_json({"detector": str(path), **detector.metadata()})
        return
    config = detector.config
    threshold = "none (too few held-out good images)" if config["threshold"] is None else f"{config['threshold']:.4g}"
    click.echo(
        f"{path}: {config['method']} detector ({'+'.join(detector.members)}, {detector.map_size} px), "
        f"{config['shots']} shots, model {detector.model_id}\n"
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
      results                       [{path, score, decision[, type, route_margin][, label]}]; decision is ok,
                                    defect, or unknown for every image when the detector has no threshold;
                                    type and route_margin for a routed (many part types) detector
      metrics                       labelled only (else null): image_auroc, image_ap, pixel_auroc, aupro,
                                    false_alarm_rate, miss_rate, threshold, n_good, n_defect, per_kind_image_auroc
      heatmaps, roc, skipped        folder and figure written (or null), unreadable files

    Example: clipxfer anomaly score test/ --detector det.safetensors --heatmaps maps/
    """
    from ..anomaly import score_folder
    from ..anomaly.routing import load_any_detector
    from ..encoders.registry import load_encoder_for_id
    from ..errors import ClipxferError

    if as_json and as_csv:
        raise ClipxferError("choose one of --json and --csv")
    detector = load_any_detector(detector_path)
    # As a head or an index: `auto` loads the precision the detector's model id names (float or int8).
    encoder = load_encoder_for_id(detector.model_id, model, device, precision)
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
        emit_csv(rows)
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


@anomaly.command("fit-types")
@click.argument("labelled_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--detector", "detector_path", required=True, type=click.Path(dir_okay=False),
              help="Detector fitted on good parts (anomaly fit): its maps are the evidence.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Defect-type head to write (.safetensors).")
@force_option
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the cross-validation folds.")
@click.option("--json", "as_json", is_flag=True, help="Print the head's metadata as JSON.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def fit_types(labelled_dir, detector_path, out, force, seed, as_json, device):
    """Fit a defect-type classifier on LABELLED_DIR: one subfolder of examples per type (good, scratch,
    texture change...). It reads anomaly-map statistics and patch features (max-pooled, mean-pooled and
    where the map peaks) through the detector, so a flaw a few pixels across still counts.

    Example: clipxfer anomaly fit-types labelled/ --detector det.safetensors --out types.safetensors
    """
    from ..anomaly.defect_types import check_type_detector, fit_defect_types, labelled_type_folders
    from ..anomaly.detector import progress_bar
    from ..anomaly.routing import load_any_detector
    from ..encoders.artifacts import claim_output
    from ..encoders.registry import load_encoder_for_id

    out = claim_output(out, force, "defect-type head")
    detector = check_type_detector(load_any_detector(detector_path))
    types = labelled_type_folders(labelled_dir)
    encoder = load_encoder_for_id(detector.model_id, device=device)
    bar = progress_bar(sum(map(len, types.values())), True)
    head = fit_defect_types(encoder, detector, types, seed, progress=bar.update if bar else None)
    if bar:
        bar.close()
    path = head.save(out)
    if as_json:
        emit_json({"head": str(path), **head.metadata()})
        return
    shots = ", ".join(f"{name} {count}" for name, count in head.config["shots"].items())
    click.echo(f"{path}: defect-type head over {len(head.classes)} types ({shots}), detector "
               f"{'+'.join(detector.members)} at {detector.map_size} px; features {'+'.join(head.groups)} and "
               f"L2 {head.config['l2']:g} chosen by cross-validation on the examples")


@anomaly.command("classify")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--types", "types_path", required=True, type=click.Path(dir_okay=False), help="Defect-type head (anomaly fit-types).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: results [{path, type, probability[, label]}], metrics.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows: path,type,probability[,label].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def classify(folder, types_path, as_json, as_csv, device):
    """Name the defect type of each image in FOLDER. When FOLDER has one subfolder per known type, those
    are the labels: accuracy overall and per type is printed too.

    Example: clipxfer anomaly classify parts/ --types types.safetensors
    """
    from ..anomaly.defect_types import classify_folder, load_defect_types
    from ..encoders.registry import load_encoder_for_id
    from ..errors import ClipxferError

    if as_json and as_csv:
        raise ClipxferError("choose one of --json and --csv")
    head = load_defect_types(types_path)
    encoder = load_encoder_for_id(head.model_id, device=device)
    rows, metrics = classify_folder(head, encoder, folder, progress=True)
    if as_json:
        emit_json({"types": types_path, "model": head.model_id, "classes": head.classes, "results": rows,
                   "metrics": metrics})  # fmt: skip
        return
    if as_csv:
        emit_csv(rows)
        return
    for row in rows:
        click.echo(f"{row['type']:<16} {row['probability']:.3f}  {row['path']}" + (f"  [{row['label']}]" if "label" in row else ""))
    if metrics:
        per_type = "  ".join(f"{name} {value:.3f}" for name, value in metrics["per_type_accuracy"].items())
        click.echo(f"accuracy {metrics['accuracy']:.3f} on {metrics['n']} labelled images; per type: {per_type}")


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
