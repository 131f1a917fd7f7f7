"""The detector suite behind `anomaly fit`: the grown defect zoo, the synthetic validation flaws,
tiling at a working resolution, the gaussian detector, calibrated (Bonferroni) fusion and its
false-alarm guarantee over random splits of real good parts, and settings chosen without test defects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.anomaly import build_detector, build_texture_set, fit_detector, load_detector
from clipxfer.anomaly.fusion import fuse, member_calibration
from clipxfer.anomaly.gaussian import fit_gaussian, gaussian_scores, pooled_statistics
from clipxfer.anomaly.patches import encode_dense
from clipxfer.anomaly.synthetic import FLAWS, synthetic_flaw
from clipxfer.anomaly.textures import GLOBAL, LOCAL, SIZE, good_crop, match_moments, texture_photo
from clipxfer.anomaly.tiling import encode_tiled, stitch, tile_starts
from clipxfer.cli import main
from clipxfer.encoders import PatchFeatures
from clipxfer.errors import ClipxferError
from clipxfer.images import find_images


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    """40 good brick training crops and a small test set with every kind of the zoo."""
    return build_texture_set(
        tmp_path_factory.mktemp("zoo"), textures=("brick",), train_good=40, test_good=8, per_local=2, per_global=2, seed=5
    ) / "brick"


def test_zoo_texture_changes_keep_mean_and_contrast_and_point_defects_are_small():
    photo, tint = texture_photo("gravel"), (0.95, 0.92, 0.85)
    rng = np.random.default_rng(0)
    for kind in ("grain_scale", "orientation", "period"):
        image = good_crop(photo, tint, rng)
        changed = GLOBAL[kind](image, rng, photo=photo, tint=tint)
        np.testing.assert_allclose(changed.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=0.01, err_msg=kind)
        np.testing.assert_allclose(changed.std(axis=(0, 1)), image.std(axis=(0, 1)), atol=0.01, err_msg=kind)
        assert np.abs(changed - image).mean() > 0.05, kind  # the grain did change
    for _ in range(5):
        image, mask = LOCAL["speckle"](good_crop(photo, tint, rng), rng)
        ys, xs = np.nonzero(mask)
        assert 1 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 0.05 * SIZE + 2
        _, line = LOCAL["faint_scratch"](good_crop(photo, tint, rng), rng)
        assert 40 <= line.sum() <= 120 * 4 + 20
    toy = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    matched = match_moments(toy * 0.3 + 0.5, toy)
    np.testing.assert_allclose(matched.std(axis=(0, 1)), toy.std(axis=(0, 1)), atol=1e-5)


def test_synthetic_flaws_are_seeded_by_part_and_change_it(brick):
    part = next(find_images(brick / "train" / "good"))
    original = np.asarray(Image.open(part).convert("RGB"))
    for kind in FLAWS:
        flawed = synthetic_flaw(part, kind, key=3)
        assert flawed.shape == original.shape and flawed.dtype == np.uint8
        np.testing.assert_array_equal(flawed, synthetic_flaw(part, kind, key=3))
        assert np.abs(flawed.astype(int) - original).sum() > 0, kind
        assert not np.array_equal(flawed, synthetic_flaw(part, kind, key=4)), kind


class _PixelEncoder:
    """A stand-in encoder whose 'features' are the pixels at stride 4: tiling must give back the
    very features a direct encoding at the working resolution would."""

    id, input_size = "test:pixels", 16

    def encode_patches(self, pixels):
        return PatchFeatures([pixels[:, ::4, ::4].astype(np.float32)], None)


def test_tiles_stitch_back_to_the_direct_grid():
    assert tile_starts(16, 16, 4) == [0]
    starts = tile_starts(40, 16, 4)
    assert starts[0] == 0 and starts[-1] == 24 and all(s % 4 == 0 for s in starts)
    assert all(b - a <= 16 * 0.75 for a, b in zip(starts, starts[1:]))  # at least 25% overlap
    pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    encoder = _PixelEncoder()
    local, joint = encode_tiled(encoder, pixels, lambda enc, crops: (enc.encode_patches(crops).maps[0], None))
    assert joint is None
    np.testing.assert_allclose(local, pixels[:, ::4, ::4].astype(np.float32), rtol=1e-6)
    # stitch alone: tiles of a constant give the constant everywhere they cover
    tiles = np.ones((4, 4, 4, 2), np.float32)
    np.testing.assert_allclose(stitch(tiles, [0, 12], 4, 7), 1.0)


def test_gaussian_is_ledoit_wolf_mahalanobis_on_pooled_statistics():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    shots = rng.normal(0, 1, (16, 5, 5, 6)).astype(np.float32)
    arrays, config = fit_gaussian(shots)
    fitted = LedoitWolf().fit(pooled_statistics(shots).astype(np.float64))
    queries = np.concatenate([rng.normal(0, 1, (4, 5, 5, 6)), rng.normal(0, 1.6, (4, 5, 5, 6))]).astype(np.float32)
    expected = np.sqrt(fitted.mahalanobis(pooled_statistics(queries).astype(np.float64)))
    np.testing.assert_allclose(gaussian_scores(queries, **{k.split("_")[1]: v for k, v in arrays.items()}), expected, rtol=1e-4)
    assert config["gaussian_dim"] == 12 and 0 <= config["gaussian_shrinkage"] <= 1
    # a uniform change of spread (every position a little): the pooled statistics see it at once
    assert gaussian_scores(queries, arrays["gaussian_mean"], arrays["gaussian_precision"])[4:].min() > expected[:4].max()


def _false_alarm_over_splits(outputs: dict, alpha: float, n_cal: int, splits: int, seed: int) -> tuple[float, float]:
    """Mean and standard error, over random calibration/test splits of good parts, of the share of
    test goods the fused (Bonferroni) decision flags."""
    rng = np.random.default_rng(seed)
    count = len(next(iter(outputs.values()))[0])
    rates = []
    for _ in range(splits):
        order = rng.permutation(count)
        cal, rest = order[:n_cal], order[n_cal:]
        calibration = member_calibration({m: (s[cal], None) for m, (s, _) in outputs.items()}, alpha)
        fused, _ = fuse({m: (s[rest], None) for m, (s, _) in outputs.items()}, calibration, 4)
        # the fused decision is exactly "some member past its own alpha/m threshold"
        anyone = np.any([s[rest] > calibration[m]["threshold"] for m, (s, _) in outputs.items()], axis=0)
        np.testing.assert_array_equal(fused > 0, anyone)
        rates.append(np.mean(fused > 0))
    return float(np.mean(rates)), float(np.std(rates) / np.sqrt(splits))


def test_fused_false_alarm_rate_holds_over_random_splits_of_real_textures(tiny, brick):
    """Real good brick crops: patchcore + gaussian fused at alpha 0.1 flag at most 0.1 of new good
    parts on average over many splits, and not far below each member's alpha / 2 (it is not vacuous)."""
    good = list(find_images(brick / "train" / "good")) + list(find_images(brick / "test" / "good"))
    shots, rest = good[:4], good[4:]
    detector = build_detector(tiny, encode_dense(tiny, shots), "fused", seed=0, members=["patchcore", "gaussian"])
    outputs = detector.member_outputs(encode_dense(tiny, rest))
    alpha, n_cal = 0.1, 29
    mean, error = _false_alarm_over_splits(outputs, alpha, n_cal, 2000, seed=0)
    assert mean <= alpha + 3 * error
    assert mean >= alpha / 2 - 1 / (n_cal + 1) - 3 * error


def test_fused_false_alarm_rate_holds_on_digits_as_parts():
    """Real good 'parts' of another kind: sklearn's 8x8 digits, the zeros as good parts, pixel
    statistics as two members; the guarantee does not depend on the detectors being any good."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    zeros = digits.images[digits.target == 0].astype(np.float32)
    local = zeros[..., None]
    arrays, _ = fit_gaussian(local[:10])
    outputs = {
        "gaussian": (gaussian_scores(local[10:], arrays["gaussian_mean"], arrays["gaussian_precision"]), None),
        "patchcore": (np.abs(local[10:] - local[:10].mean(axis=0)).reshape(len(local) - 10, -1).max(axis=1), None),
    }
    alpha, n_cal = 0.1, 59
    mean, error = _false_alarm_over_splits(outputs, alpha, n_cal, 2000, seed=1)
    assert mean <= alpha + 3 * error
    assert mean >= alpha / 2 - 1 / (n_cal + 1) - 3 * error


def test_fit_auto_is_fused_chosen_on_held_out_goods_and_round_trips(tiny, brick, tmp_path):
    good = list(find_images(brick / "train" / "good"))
    detector = fit_detector(tiny, good, shots=4, false_alarm_rate=0.2, seed=2)
    config = detector.config
    assert detector.method == "fused" and set(detector.members) <= {"patchcore", "gaussian", "zeroshot"}
    selection = config["selection"]
    assert selection["by"] == "synthetic" and selection["validation_size"] == 9
    # the validation parts are not calibration parts: 40 - 4 shots - 9 validation
    assert config["calibration_size"] == 27
    assert detector.map_size in {row["resolution"] for row in selection["table"]} == {32, 56}
    calibration = config["member_calibration"]
    assert set(calibration) == set(detector.members) and config["threshold"] == 0.0
    path = detector.save(tmp_path / "fused")
    loaded = load_detector(path, tiny.id)
    test = list(find_images(brick / "test"))[:5]
    patches = encode_dense(tiny, test, resolution=detector.map_size)
    first, again = detector.score(patches), loaded.score(patches)
    np.testing.assert_allclose(again.scores, first.scores, rtol=1e-6)
    assert first.maps.shape == (5, detector.map_size, detector.map_size)
    # explicit members and resolution: nothing left to choose but the members' thresholds
    fixed = fit_detector(tiny, good, shots=4, false_alarm_rate=0.2, method="fused", members=["gaussian", "patchcore"],
                         resolution=56, seed=2)  # fmt: skip
    assert fixed.members == ["patchcore", "gaussian"] and fixed.map_size == 56 and "selection" not in fixed.config
    assert fixed.config["calibration_size"] == 36


def test_auto_with_few_held_out_parts_keeps_a_threshold(tiny, brick):
    """8 held-out parts cannot give two members a threshold at 0.2 / 2 (9 needed): auto keeps patchcore alone."""
    good = list(find_images(brick / "train" / "good"))[:12]
    detector = fit_detector(tiny, good, shots=4, false_alarm_rate=0.2, seed=1)
    assert detector.members == ["patchcore"] and detector.calibrated and "selection" not in detector.config


def test_bad_settings_are_one_line_errors(tiny, brick):
    good = list(find_images(brick / "train" / "good"))
    with pytest.raises(ClipxferError, match="--resolution 'huge'"):
        fit_detector(tiny, good, shots=4, resolution="huge")
    with pytest.raises(ClipxferError, match="--resolution 8"):
        fit_detector(tiny, good, shots=4, resolution=8)
    with pytest.raises(ClipxferError, match="unknown fused detector"):
        fit_detector(tiny, good, shots=4, method="fused", members=["padim"], resolution=32)


def test_cli_fit_with_real_defects_and_score_at_resolution(tiny, brick, tmp_path):
    runner = CliRunner()
    det = tmp_path / "det.safetensors"
    fit = runner.invoke(main, ["anomaly", "fit", str(brick / "train" / "good"), "--shots", "4", "--false-alarm-rate",
                               "0.2", "--defects", str(brick / "test" / "hole"), "--out", str(det), "--model", "tiny",
                               "--device", "cpu", "--json"])  # fmt: skip
    assert fit.exit_code == 0, fit.output
    config = json.loads(fit.stdout)["config"]
    assert config["method"] == "fused" and config["selection"]["by"] == "defects"
    scored = runner.invoke(main, ["anomaly", "score", str(brick / "test"), "--detector", str(det), "--device", "cpu",
                                  "--json", "--heatmaps", str(tmp_path / "maps")])  # fmt: skip
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    kinds = set(report["metrics"]["per_kind_image_auroc"])
    assert {"speckle", "faint_scratch", "grain_scale", "orientation", "period"} <= kinds
    assert Image.open(next(find_images(tmp_path / "maps"))).size == (250, 250)
    wrong = runner.invoke(main, ["anomaly", "fit", str(brick / "train" / "good"), "--method", "patchcore", "--members",
                                 "gaussian", "--out", str(det), "--model", "tiny"])  # fmt: skip
    assert wrong.exit_code == 2 and "--members" in wrong.output


FUSED_CHANGES = {
    "member-unknown": (lambda c: c.update(members=["patchcore", "padim"]), "members ['patchcore', 'padim']"),
    "member-twice": (lambda c: c.update(members=["patchcore", "patchcore"]), "members ['patchcore', 'patchcore']"),
    "calibration-missing": (lambda c: c.pop("member_calibration"), "member_calibration does not name"),
    "calibration-nan": (lambda c: c["member_calibration"]["gaussian"].update(threshold=float("nan")),
                        "member_calibration of gaussian"),
    "map-small": (lambda c: c.update(map_size=8), "map_size 8"),
    "map-huge": (lambda c: c.update(map_size=10**6), "map_size 1000000"),
    "sigma-zero": (lambda c: c.update(smoothing_sigma=0), "smoothing_sigma 0"),
}


@pytest.mark.parametrize("name", sorted(FUSED_CHANGES))
def test_a_tampered_fused_detector_is_one_line(tiny, brick, tmp_path, name):
    from clipxfer.encoders.artifacts import read_artifact_metadata, read_artifact_tensors, write_artifact

    shots = encode_dense(tiny, list(find_images(brick / "train" / "good"))[:3])
    detector = build_detector(tiny, shots, "fused", members=["patchcore", "gaussian"])
    detector.calibrate(encode_dense(tiny, list(find_images(brick / "train" / "good"))[3:13]), 0.5)
    path = detector.save(tmp_path / "fused")
    assert load_detector(path).members == ["patchcore", "gaussian"]
    meta = read_artifact_metadata(path, "detector")
    change, message = FUSED_CHANGES[name]
    change(meta["config"])
    tampered = write_artifact(tmp_path / "bad", read_artifact_tensors(path, "detector"), meta, "detector")
    with pytest.raises(ClipxferError, match="damaged anomaly detector") as error:
        load_detector(tampered)
    assert message in str(error.value) and "\n" not in str(error.value)
    arrays = read_artifact_tensors(path, "detector")
    arrays["gaussian_precision"] = arrays["gaussian_precision"][:-1]
    with pytest.raises(ClipxferError, match="gaussian_precision"):
        load_detector(write_artifact(tmp_path / "bad2", arrays, read_artifact_metadata(path, "detector"), "detector"))
