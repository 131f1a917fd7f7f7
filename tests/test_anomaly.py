"""Anomaly detection: dense patch features, coreset, detectors (patchcore, zeroshot, combined),
split-conformal thresholds on real texture photos, metrics, the texture set and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipxfer.anomaly import build_detector, build_texture_set, fit_detector, load_detector
from clipxfer.anomaly.coreset import greedy_coreset
from clipxfer.anomaly.evaluate import aupro, detection_metrics
from clipxfer.anomaly.patches import encode_dense
from clipxfer.calibrate import false_alarm_threshold
from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.images import find_images


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """A small brick defect set: 40 good training crops, 8 good and 3 per defect kind in test."""
    return build_texture_set(
        tmp_path_factory.mktemp("tex"), textures=("brick",), train_good=40, test_good=8, per_local=3, per_global=2, seed=3
    )


def test_encode_patches_tiny_and_lite(tiny, lite):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, tiny.input_size, tiny.input_size, 3), dtype=np.uint8)
    dense = tiny.encode_patches(pixels)
    grid = tiny.input_size // 8
    assert [m.shape for m in dense.maps] == [(2, grid, grid, 64)]
    assert dense.joint.shape == (2, grid, grid, tiny.dim)
    np.testing.assert_allclose(np.linalg.norm(dense.joint, axis=-1), 1.0, atol=1e-5)
    # Independent path: open_clip's own forward with output_tokens, tokens through the projection.
    visual = tiny.model.visual
    visual.output_tokens = True
    try:
        with torch.inference_mode():
            _, tokens = visual(tiny.pixels_to_tensor(pixels))
            expected = torch.nn.functional.normalize(tokens @ visual.proj, dim=-1).reshape(2, grid, grid, -1).numpy()
    finally:
        visual.output_tokens = False
    np.testing.assert_allclose(dense.joint, expected, atol=1e-5)
    pixels = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    maps = lite.encode_patches(pixels)
    assert [m.shape for m in maps.maps] == [(1, 28, 28, 40), (1, 14, 14, 112)]
    assert maps.joint is None


def test_greedy_coreset_covers_better_than_random():
    rng = np.random.default_rng(0)
    # Two dense clusters and a few far outliers: k-centre must pick the outliers.
    points = np.concatenate([rng.normal(0, 0.1, (500, 8)), rng.normal(5, 0.1, (500, 8)), rng.normal(20, 1, (5, 8))])
    chosen = greedy_coreset(points.astype(np.float32), 20, seed=1)
    assert len(set(chosen.tolist())) == 20
    assert set(range(1000, 1005)) <= set(chosen.tolist())
    np.testing.assert_array_equal(chosen, greedy_coreset(points.astype(np.float32), 20, seed=1))

    def cover(rows):
        return np.min(np.linalg.norm(points[:, None] - points[rows][None], axis=-1), axis=1).max()

    assert cover(chosen) < cover(rng.choice(len(points), 20, replace=False))


def test_aupro_and_metrics():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:12, 10:14] = True
    perfect = masks.astype(np.float32) + np.random.default_rng(0).uniform(0, 0.5, masks.shape)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-6)
    inverted = 1.0 - perfect
    assert aupro(inverted, masks) < 0.05
    metrics = detection_metrics(np.array([0.1, 0.2, 0.9, 0.3]), np.array([False, False, True, True]), 0.25, perfect, masks)
    assert metrics["image_auroc"] == 1.0
    assert metrics["false_alarm_rate"] == 0.0 and metrics["miss_rate"] == 0.0
    assert metrics["pixel_auroc"] == 1.0


def test_texture_set_is_reproducible_with_masks(tmp_path):
    a = build_texture_set(tmp_path / "a", textures=("gravel",), train_good=2, test_good=1, per_local=1, per_global=1, seed=7)
    b = build_texture_set(tmp_path / "b", textures=("gravel",), train_good=2, test_good=1, per_local=1, per_global=1, seed=7)
    files_a = sorted(p.relative_to(a) for p in find_images(a))
    assert files_a == sorted(p.relative_to(b) for p in find_images(b))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    kinds = json.loads((a / "defects.json").read_text())["kinds"]
    for kind, group in kinds.items():
        mask = a / "gravel" / "ground_truth" / kind / "000_mask.png"
        assert mask.is_file() == (group == "local")
        if mask.is_file():
            pixels = np.argwhere(np.asarray(Image.open(mask).convert("L")) > 127)
            assert 0.001 < len(pixels) / 250**2 < 0.1, kind
            assert np.ptp(pixels, axis=0).max() < 160, kind  # local: one compact place, not scattered


def test_fit_save_load_score_and_refuse_other_model(tiny, textures, tmp_path):
    good = list(find_images(textures / "brick" / "train" / "good"))
    detector = fit_detector(tiny, good, shots=4, false_alarm_rate=0.1, method="patchcore", seed=2)
    config = detector.config
    assert config["calibration_size"] == len(good) - 4 and config["shots"] == 4 and config["false_alarm_rate"] == 0.1
    assert math.isfinite(detector.threshold)
    path = detector.save(tmp_path / "det")
    assert path.suffix == ".safetensors"
    loaded = load_detector(path, tiny.id)
    assert loaded.config == json.loads(json.dumps(config))
    test = list(find_images(textures / "brick" / "test"))[:6]
    patches = encode_dense(tiny, test)
    np.testing.assert_allclose(loaded.score(patches).scores, detector.score(patches).scores, rtol=1e-6)
    with pytest.raises(ClipxferError, match="fitted with model"):
        load_detector(path, "lite:something-else")
    with pytest.raises(ClipxferError, match="not a clipxfer"):
        (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
        load_detector(tmp_path / "bad.safetensors")


def test_too_few_calibration_images_warns_and_flags_nothing(tiny, textures, capsys):
    good = list(find_images(textures / "brick" / "train" / "good"))[:10]
    detector = fit_detector(tiny, good, shots=4, false_alarm_rate=0.01, method="patchcore")
    assert "needs at least 99" in capsys.readouterr().err
    assert detector.config["threshold"] is None
    assert not detector.decide(np.array([1e9])).any()


def test_zeroshot_and_combined_with_tiny(tiny, textures):
    good = list(find_images(textures / "brick" / "train" / "good"))
    zeroshot = fit_detector(tiny, good, shots=0, false_alarm_rate=0.1, object_name="brick wall")
    assert zeroshot.method == "zeroshot" and "memory_bank" not in zeroshot.arrays
    assert zeroshot.arrays["text_states"].shape == (2, tiny.dim)
    combined = fit_detector(tiny, good, shots=4, false_alarm_rate=0.1, method="combined")
    assert combined.method == "combined"
    assert combined.config["patchcore_scale"] > 0 and combined.config["zeroshot_scale"] > 0
    scores = combined.score(encode_dense(tiny, good[:3])).scores
    assert np.isfinite(scores).all()


def test_lite_refuses_zeroshot(lite):
    with pytest.raises(ClipxferError, match="open_clip ViT"):
        build_detector(lite, None, "zeroshot", has_joint=False)


def test_false_alarm_rate_holds_over_random_splits(tiny, textures):
    """Split conformal on real good texture images: over many random calibration/test splits the
    mean false-alarm rate is at most alpha (and not far below: at least alpha - 1/(n+1)), up to
    sampling error."""
    good = list(find_images(textures / "brick" / "train" / "good"))
    detector = build_detector(tiny, encode_dense(tiny, good[:4]), "patchcore", seed=0)
    rest = good[4:] + list(find_images(textures / "brick" / "test" / "good"))
    scores = detector.score(encode_dense(tiny, rest)).scores
    rng = np.random.default_rng(0)
    alpha, n_cal, splits = 0.1, 29, 2000
    rates = []
    for _ in range(splits):
        order = rng.permutation(len(scores))
        threshold = false_alarm_threshold(scores[order[:n_cal]], alpha)
        rates.append(np.mean(scores[order[n_cal:]] > threshold))
    mean, error = np.mean(rates), np.std(rates) / np.sqrt(splits)
    assert mean <= alpha + 3 * error
    assert mean >= alpha - 1 / (n_cal + 1) - 3 * error


def test_cli_fit_score_heatmaps_json_csv(tiny, textures, tmp_path):
    runner = CliRunner()
    det = tmp_path / "det.safetensors"
    fit = runner.invoke(main, ["anomaly", "fit", str(textures / "brick" / "train" / "good"), "--shots", "4",
                               "--method", "patchcore", "--false-alarm-rate", "0.1", "--out", str(det), "--model", "tiny",
                               "--device", "cpu", "--json"])  # fmt: skip
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.stdout)["config"]["calibration_size"] == 36
    test_dir = textures / "brick" / "test"
    maps = tmp_path / "maps"
    result = runner.invoke(main, ["anomaly", "score", str(test_dir), "--detector", str(det), "--heatmaps", str(maps),
                                  "--roc", str(tmp_path / "roc.png"), "--device", "cpu", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    n_images = len(list(find_images(test_dir)))
    assert report["n"] == n_images and {r["decision"] for r in report["results"]} <= {"ok", "defect"}
    metrics = report["metrics"]
    assert 0 <= metrics["image_auroc"] <= 1 and metrics["pixel_auroc"] is not None and metrics["aupro"] is not None
    assert set(metrics["per_kind_image_auroc"]) == {"scratch", "hole", "stain", "missing_thread", "colour_spot", "speckle",
                                                    "faint_scratch", "colour_shift", "blur", "coarse", "grain_scale",
                                                    "orientation", "period"}  # fmt: skip
    overlays = sorted(find_images(maps))
    assert len(overlays) == n_images and Image.open(overlays[0]).size == (250, 250)
    assert (tmp_path / "roc.png").is_file()
    table = runner.invoke(main, ["anomaly", "score", str(test_dir / "hole"), "--detector", str(det), "--device", "cpu", "--csv"])
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0] == "path,score,decision" and len(table.stdout.splitlines()) == 4
    other = runner.invoke(main, ["anomaly", "score", str(test_dir), "--detector", str(det), "--model", "lite"])
    assert other.exit_code == 2 and "fitted with model" in other.output


def test_bench_task_anomaly_rows_groups_and_resume(textures, tmp_path):
    runner = CliRunner()
    args = ["bench", "--task", "anomaly", "--data", str(textures), "--model", "tiny", "--shots", "1,2", "--seeds", "1",
            "--out", str(tmp_path)]  # fmt: skip
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "anomaly_results.csv")
    kinds = ["scratch", "hole", "stain", "missing_thread", "colour_spot", "speckle", "faint_scratch", "colour_shift",
             "blur", "coarse", "grain_scale", "orientation", "period"]  # fmt: skip
    groups = sorted(["global", "local", *kinds])
    assert sorted(zip(table["shots"], table["group"])) == [(k, g) for k in (1, 2) for g in groups]
    local = table[table["group"] == "local"]
    assert local["pixel_auroc"].notna().all() and table[table["group"] == "global"]["pixel_auroc"].isna().all()
    assert table[table["group"] == "speckle"]["pixel_auroc"].notna().all()
    assert table[table["group"] == "period"]["pixel_auroc"].isna().all()
    # 40 good parts: the shots, 9 validation parts (synthetic flaws choose resolution and members), the rest calibrate
    assert (local["n_defect"] == 21).all() and (table["calibration_size"] == 40 - table["shots"] - 9).all()
    assert set(table["resolution"]) <= {32, 56} and table["members"].notna().all()
    summary = (tmp_path / "anomaly_summary.md").read_text()
    assert "| brick | auto | local | 1 |" in summary and "| brick | auto | speckle | 2 |" in summary
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and len(pd.read_csv(tmp_path / "anomaly_results.csv")) == 2 * len(groups)


def test_score_loads_the_precision_the_detector_names(textures, tmp_path, monkeypatch):
    """A detector fitted with an int8 encoder scores where `auto` would load a float one: the
    detector's model id decides, as for heads and indexes."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    det = tmp_path / "det.safetensors"
    fit = runner.invoke(main, ["anomaly", "fit", str(textures / "brick" / "train" / "good"), "--shots", "2",
                               "--method", "patchcore", "--out", str(det), "--model", "tiny", "--device", "cpu",
                               "--precision", "int8", "--json"])  # fmt: skip
    assert fit.exit_code == 0, fit.output
    assert load_detector(det).model_id.endswith("@int8")
    monkeypatch.setenv("CLIPXFER_RUNTIME", "torch")  # `auto` alone would load float torch here
    scored = runner.invoke(main, ["anomaly", "score", str(textures / "brick" / "test" / "hole"), "--detector", str(det),
                                  "--device", "cpu", "--json"])  # fmt: skip
    assert scored.exit_code == 0, scored.output
