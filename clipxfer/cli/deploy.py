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
              help="Images to calibrate int8 on (default: scikit-image's sample photos).")
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


@main.command("watch", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def watch(folder, options):
    """Inspect each image landing in FOLDER with a bundle, one JSON line per part (the same as
    'clipxfer-run watch', which needs no torch): --bundle DIR [--out results.jsonl]
    [--move-to OK_DIR NG_DIR] [--ok-class NAME] [--settle S] [--polling] [--once].

    Example: clipxfer watch incoming/ --bundle det-bundle/ --move-to ok/ ng/
    """
    from ..runtime.cli import main as run_main

    run_main(["watch", folder, *options])
