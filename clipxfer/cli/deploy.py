"""``clipxfer export`` (a head or detector -> a torch-free bundle) and ``clipxfer watch`` (the
runtime's hot folder, ``clipxfer-run watch``)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json
from .group import main


@main.command("export")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--format", "fmt", type=click.Choice(["openvino", "onnx"]), default="openvino", show_default=True,
              help="Graph format (onnx is refused: OpenVINO saves only its IR).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="int8: nncf post-training quantization (classifiers only).")
@click.option("--conformal", "alpha", type=float, default=None,
              help="Conformal level of the bundle's prediction sets (default 0.1 when the head holds a calibration).")
@click.option("--conformal-score", type=click.Choice(["aps", "raps", "lac"]), default="aps", show_default=True)
@click.option("--reject", is_flag=True, help="Decide 'unknown' when a prediction set holds several classes.")
@click.option("--calibration-images", type=click.Path(file_okay=False, exists=True), default=None,
              help="Images to calibrate int8 on (default: the training images the manifest beside the head "
                   "names, else scikit-image's sample photos with a warning).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(artifact, out, fmt, precision, alpha, conformal_score, reject, calibration_images, as_json):
    """Export a saved head or anomaly detector as one bundle folder that runs without torch
    (clipxfer-run, clipxfer watch): the image tower with its preprocessing and the head or
    detector folded into one OpenVINO graph, class names, calibration and a SHA-256 manifest.

    Example: clipxfer export probe.safetensors --out probe-bundle/ --precision int8
    """
    from ..export import ExportSettings, export_artifact

    manifest = export_artifact(ExportSettings(Path(artifact), Path(out), fmt, precision, alpha, conformal_score, reject,
                                              Path(calibration_images) if calibration_images else None))  # fmt: skip
    if as_json:
        emit_json(manifest)
        return
    size = sum((Path(out) / name).stat().st_size for name in manifest["files"])
    click.echo(f"wrote {out}: {manifest['kind']} ({manifest['method']}, {manifest['precision']}), "
               f"{size / 1e6:.1f} MB; run it with: clipxfer-run {out} IMAGES...")  # fmt: skip


@main.command("watch")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--bundle", required=True, type=click.Path(file_okay=False), help="A folder made by 'clipxfer export'.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Results JSON lines (default FOLDER/results.jsonl).")
@click.option("--move-to", nargs=2, type=click.Path(file_okay=False), default=None, help="OK_DIR NG_DIR for answered parts.")
@click.option("--ok-class", multiple=True, help="A classifier's good class, for --move-to (repeatable).")
@click.option("--settle", type=float, default=0.5, show_default=True, help="Seconds a file's size must hold still.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between scans without events.")
@click.option("--polling", is_flag=True, help="Scan only, no inotify.")
@click.option("--once", is_flag=True, help="Inspect what is there, then stop.")
def watch(folder, bundle, out, move_to, ok_class, settle, interval, polling, once):
    """Inspect each image landing in FOLDER with an exported bundle, one JSON line per part; restart-safe
    (the same as 'clipxfer-run watch', which needs no torch).

    Example: clipxfer watch incoming/ --bundle det-bundle/ --move-to ok/ ng/
    """
    from ..runtime.cli import main as run_main

    argv = ["watch", folder, "--bundle", bundle, "--settle", str(settle), "--interval", str(interval)]
    argv += ["--out", out] if out else []
    argv += ["--move-to", *move_to] if move_to else []
    argv += [item for name in ok_class for item in ("--ok-class", name)]
    argv += ["--polling"] if polling else []
    argv += ["--once"] if once else []
    run_main(argv)
