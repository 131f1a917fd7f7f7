"""Anomaly detector files and ``anomaly score`` under hostile input: heat maps never overwrite the
scored images and never share a name, damaged or tampered detector files are one line each, and a
detector without a calibrated threshold says so instead of calling every part ok."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.anomaly import fit_detector, load_detector
from clipxfer.cli import main
from clipxfer.encoders.artifacts import read_artifact_metadata, read_artifact_tensors, write_artifact
from clipxfer.errors import ClipxferError

from .conftest import random_images


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Ten good 'parts': smooth grey images with a little noise."""
    root = tmp_path_factory.mktemp("good")
    for i, image in enumerate(random_images(10, seed=5)):
        Image.fromarray((128 + image // 16).astype(np.uint8)).save(root / f"{i}.png")
    return sorted(root.glob("*.png"))


@pytest.fixture(scope="module")
def detector_file(tiny, good, tmp_path_factory):
    detector = fit_detector(tiny, good, shots=2, false_alarm_rate=0.2, method="patchcore")
    assert detector.config["threshold"] is not None
    return detector.save(tmp_path_factory.mktemp("det") / "det.safetensors")


def _scored_folder(root):
    """``part.jpg`` and ``part.png`` side by side, and a ``sub/part.png``."""
    (root / "sub").mkdir(parents=True)
    images = random_images(3, seed=9)
    Image.fromarray(images[0]).save(root / "part.jpg")
    Image.fromarray(images[1]).save(root / "part.png")
    Image.fromarray(images[2]).save(root / "sub" / "part.png")
    return root


def _snapshot(root):
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _score(*args):
    return CliRunner().invoke(main, ["anomaly", "score", *map(str, args), "--device", "cpu"])


def test_heatmaps_into_the_scored_folder_are_refused_and_nothing_is_overwritten(detector_file, tmp_path):
    folder = _scored_folder(tmp_path / "parts")
    before = _snapshot(folder)
    for heatmaps in (folder, folder / "sub", tmp_path):  # the folder itself, inside it, above it
        result = _score(folder, "--detector", detector_file, "--heatmaps", heatmaps)
        assert result.exit_code == 2, result.output
        assert "--heatmaps" in result.output and "choose a new folder" in result.output
        assert result.output.count("\n") == 1, result.output
        assert _snapshot(folder) == before


def test_heatmaps_mirror_subfolders_and_keep_every_name(detector_file, tmp_path):
    folder = _scored_folder(tmp_path / "parts")
    before = _snapshot(folder)
    maps = tmp_path / "maps"
    result = _score(folder, "--detector", detector_file, "--heatmaps", maps, "--json")
    assert result.exit_code == 0, result.output
    written = sorted(str(path.relative_to(maps)) for path in maps.rglob("*.png"))
    assert written == ["part.jpg.png", "part.png.png", "sub/part.png.png"]
    assert _snapshot(folder) == before
    # A new folder inside the scored one is fine (nothing of the user's is there to lose).
    inside = folder / "maps"
    result = _score(folder, "--detector", detector_file, "--heatmaps", inside)
    assert result.exit_code == 0, result.output
    assert len(list(inside.rglob("*.png"))) == 3 and _snapshot(folder) != before


def _tampered(detector_file, tmp_path, name, change):
    """A copy of the detector with ``change(meta)`` applied to its metadata."""
    meta = read_artifact_metadata(detector_file, "detector")
    change(meta)
    return write_artifact(tmp_path / name, read_artifact_tensors(detector_file, "detector"), meta, "detector")


@pytest.mark.parametrize("threshold", [math.nan, -math.inf, math.inf])
def test_a_non_finite_threshold_is_refused(detector_file, tmp_path, threshold):
    path = _tampered(detector_file, tmp_path, "t.safetensors", lambda m: m["config"].update(threshold=threshold))
    with pytest.raises(ClipxferError, match="threshold .* not a finite number"):
        load_detector(path)


CHANGES = {
    "threshold-string": (lambda m: m["config"].update(threshold="0.5"), "threshold '0.5'"),
    "size-negative": (lambda m: m["config"].update(input_size=-5), "input_size -5"),
    "size-huge": (lambda m: m["config"].update(input_size=100000), "input_size 100000"),
    "size-float": (lambda m: m["config"].update(input_size=32.5), "input_size 32.5"),
    "method-unknown": (lambda m: m["config"].update(method="magic"), "unknown method 'magic'"),
    "config-missing": (lambda m: m.pop("config"), "no config"),
    "config-list": (lambda m: m.update(config=[1, 2]), "no config"),
    "rate-missing": (lambda m: m["config"].pop("false_alarm_rate"), "false_alarm_rate None"),
    "model-missing": (lambda m: m.pop("model_id"), "no model id"),
    "needs-text": (lambda m: m["config"].update(method="combined", logit_scale=100.0, patchcore_scale=1.0,
                                                zeroshot_scale=1.0), "array 'text_states'"),
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_tampered_detector_config_is_one_line(detector_file, tmp_path, name):
    change, message = CHANGES[name]
    path = _tampered(detector_file, tmp_path, f"{name}.safetensors", change)
    folder = _scored_folder(tmp_path / "parts")
    result = _score(folder, "--detector", path)
    assert result.exit_code == 2, result.output
    assert "damaged anomaly detector" in result.output and message in result.output, result.output
    assert result.output.count("\n") == 1, result.output


def test_a_non_finite_memory_bank_is_refused(detector_file, tmp_path):
    meta = read_artifact_metadata(detector_file, "detector")
    arrays = read_artifact_tensors(detector_file, "detector")
    arrays["memory_bank"][0, 0] = np.nan
    path = write_artifact(tmp_path / "nan.safetensors", arrays, meta, "detector")
    with pytest.raises(ClipxferError, match="memory_bank.*not finite"):
        load_detector(path)


def test_a_detector_without_threshold_says_decisions_are_unknown(tiny, good, tmp_path):
    detector = fit_detector(tiny, good[:2], shots=1, false_alarm_rate=0.05, method="patchcore")
    assert detector.config["threshold"] is None
    path = detector.save(tmp_path / "one.safetensors")
    folder = _scored_folder(tmp_path / "parts")
    result = CliRunner().invoke(main, ["anomaly", "score", str(folder), "--detector", str(path), "--device", "cpu",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {row["decision"] for row in report["results"]} == {"unknown"}
    assert report["n_defect"] is None and report["threshold"] is None
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no calibrated threshold" in warnings[0]
    text = CliRunner().invoke(main, ["anomaly", "score", str(folder), "--detector", str(path), "--device", "cpu"])
    assert text.exit_code == 0 and "decisions unknown" in text.stdout and " ok " not in text.stdout


def test_a_copy_of_a_good_detector_still_loads(detector_file, tmp_path):
    """The checks accept every detector 'anomaly fit' writes."""
    shutil.copy(detector_file, tmp_path / "copy.safetensors")
    loaded = load_detector(tmp_path / "copy.safetensors")
    assert math.isfinite(loaded.threshold)
