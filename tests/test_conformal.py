"""Split conformal prediction: hand-worked thresholds and sets, guarantees over many random splits of
real data, and the --conformal / --reject options of classify and predict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.calibrate import (
    ClassifierCalibration,
    conformal_quantile,
    coverage,
    false_alarm_threshold,
    min_calibration_size,
    prediction_sets,
    ranked_mass,
    set_scores,
)
from clipxfer.cli import main
from clipxfer.errors import ClipxferError

from .conftest import random_images, write_tinted_folder


def test_quantile_is_the_ceil_n_plus_1_rank():
    scores = np.arange(1, 11) / 10  # 0.1 .. 1.0
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.9)  # rank ceil(11 * 0.8) = 9
    assert conformal_quantile(scores, 0.5) == pytest.approx(0.6)  # rank ceil(5.5) = 6
    assert math.isinf(conformal_quantile(scores, 0.05))  # rank 11 > 10: no finite threshold
    assert min_calibration_size(0.1) == 9 and min_calibration_size(0.01) == 99
    assert conformal_quantile(np.arange(9), 0.1) == 8  # exactly enough


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan"), "lots"])
def test_bad_alpha_is_one_line(alpha):
    with pytest.raises(ClipxferError, match="must be"):
        conformal_quantile(np.arange(10), alpha)


def test_ranked_mass_and_sets_hand_worked():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    mass, rank = ranked_mass(probs)
    np.testing.assert_allclose(mass, [[0.5, 0.8, 1.0], [1.0, 0.9, 0.7]])
    np.testing.assert_array_equal(rank, [[1, 2, 3], [3, 2, 1]])
    np.testing.assert_allclose(set_scores(mass, rank, probs, "raps", lam=0.1, k_reg=1), [[0.5, 0.9, 1.2], [1.2, 1.0, 0.7]])
    np.testing.assert_allclose(set_scores(mass, rank, probs, "lac"), [[0.5, 0.7, 0.8], [0.9, 0.8, 0.3]])
    np.testing.assert_array_equal(prediction_sets(probs, 0.75, "lac"), [[True, True, False], [False, False, True]])
    sets = prediction_sets(probs, 0.8)
    np.testing.assert_array_equal(sets, [[True, True, False], [False, False, True]])
    # Below the top class's own mass the set still holds the top class: never empty.
    np.testing.assert_array_equal(prediction_sets(probs, 0.1), [[True, False, False], [False, False, True]])
    calibration = ClassifierCalibration.from_probs(probs, np.array([1, 1]), "hand")
    np.testing.assert_allclose(calibration.mass, [0.8, 0.9])
    np.testing.assert_allclose(calibration.prob, [0.3, 0.2])
    np.testing.assert_array_equal(calibration.rank, [2, 2])
    again = ClassifierCalibration.from_config(json.loads(json.dumps(calibration.to_config())), "x")
    np.testing.assert_allclose(again.mass, calibration.mass)


def test_damaged_calibration_is_one_line():
    with pytest.raises(ClipxferError, match="damaged"):
        ClassifierCalibration.from_config({"prob": [0.1], "mass": [0.1, "x"], "rank": [1]}, "head.safetensors")


def _empirical_false_alarm(scores: np.ndarray, n_calibration: int, alpha: float, rounds: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(rounds):
        order = rng.permutation(len(scores))
        threshold = false_alarm_threshold(scores[order[:n_calibration]], alpha)
        rates.append(float((scores[order[n_calibration:]] > threshold).mean()))
    return float(np.mean(rates))


def test_false_alarm_rate_holds_over_random_splits():
    """Continuous scores: the expected false-alarm rate lies in [alpha - 1/(n+1), alpha]."""
    scores = np.random.default_rng(3).gamma(2.0, size=2000)
    for alpha, n in ((0.1, 49), (0.05, 199)):
        rate = _empirical_false_alarm(scores, n, alpha, rounds=400, seed=1)
        assert alpha - 1 / (n + 1) - 0.01 <= rate <= alpha + 0.01, (alpha, n, rate)


@pytest.mark.slow
def test_coverage_holds_on_fashion_mnist_with_lite(lite, fashion_test_1000):
    """Real data and a real (weak) classifier: lite's zero-shot head on 1,000 Fashion-MNIST images,
    400 random calibration/test splits, APS and RAPS at two levels."""
    from clipxfer.datasets.features import encode_dataset
    from clipxfer.datasets.prompts import load_templates
    from clipxfer.heads.zeroshot import fit_zeroshot

    encoding = encode_dataset(lite, fashion_test_1000)
    head = fit_zeroshot(lite, fashion_test_1000.classnames, load_templates("simple"))
    probs, labels = head.predict_proba(encoding), fashion_test_1000.labels
    rng = np.random.default_rng(0)
    n_cal = 300
    for score in ("aps", "raps", "lac"):
        mean_sizes = []
        for alpha in (0.1, 0.2):
            covered, sizes = [], []
            for _ in range(400):
                order = rng.permutation(len(labels))
                cal, test = order[:n_cal], order[n_cal:]
                calibration = ClassifierCalibration.from_probs(probs[cal], labels[cal], "split")
                sets = prediction_sets(probs[test], calibration.threshold(alpha, score), score)
                covered.append(coverage(sets, labels[test]))
                sizes.append(sets.sum(axis=1).mean())
            mean = float(np.mean(covered))
            # The guarantee is >= 1 - alpha (0.01 is sampling slack). Without APS's randomisation
            # term the sets are conservative, so there is no matching upper bound to test.
            assert mean >= 1 - alpha - 0.01, (score, alpha, mean)
            mean_sizes.append(float(np.mean(sizes)))
        # Informative sets: far from all 10 classes, and smaller when more error is allowed.
        assert mean_sizes[0] < 0.8 * len(fashion_test_1000.classnames) and mean_sizes[1] < mean_sizes[0], mean_sizes


CLASSES = ["bird", "fish", "tree"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 12 tinted noise images: tiny separates them, so sets are small."""
    root = tmp_path_factory.mktemp("labelled")
    return write_tinted_folder(root, CLASSES, per_class=12, seed=10)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_predict_sets_from_the_heads_validation_split(tmp_path, folder):
    head = tmp_path / "probe.safetensors"
    trained = invoke("probe", folder, "--shots", 3, "--model", "tiny", "--device", "cpu", "--out", head, "--json")
    assert trained.exit_code == 0, trained.output
    result = invoke("predict", head, folder, "--conformal", 0.25, "--reject", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    conformal = report["conformal"]
    assert conformal["calibration_source"].startswith("validation split") and conformal["calibration_size"] == 9
    for item in report["predictions"]:
        assert item["label"] in item["set"] and set(item["set"]) <= set(CLASSES)
        assert item["decision"] == (item["set"][0] if len(item["set"]) == 1 else "unknown")
    bad = invoke("predict", head, folder, "--conformal", 2)
    assert bad.exit_code == 2 and "--conformal must be in (0, 1)" in bad.output
    text = invoke("predict", head, folder, "--conformal", 0.25, "--calibrate", folder)
    assert text.exit_code == 0, text.output
    assert "calibrated on" in text.output and "(36 images)" in text.output


def test_classify_labelled_folder_calibrates_on_half_and_measures_the_other(folder):
    result = invoke("classify", folder, "--model", "tiny", "--device", "cpu", "--conformal", 0.2, "--reject", "--json")
    assert result.exit_code == 0, result.output
    conformal = json.loads(result.output)["conformal"]
    assert conformal["calibration_size"] == 18 and conformal["evaluation"]["n"] == 18
    assert 0.0 <= conformal["evaluation"]["coverage"] <= 1.0 and conformal["reject"] is True
    assert 1.0 <= conformal["mean_set_size"] <= len(CLASSES)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--conformal", "1.5"], "--conformal must be in (0, 1)"),
        (["--reject"], "--calibrate and --reject go with --conformal ALPHA"),
    ],
)
def test_classify_conformal_errors_are_one_line(folder, args, message):
    result = invoke("classify", folder, "--model", "tiny", "--device", "cpu", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_unlabelled_folder_without_calibration_data_is_one_line(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, image in enumerate(random_images(3)):
        Image.fromarray(image).save(loose / f"{i}.png")
    result = invoke("classify", loose, "--classes", "a,b", "--model", "tiny", "--device", "cpu", "--conformal", 0.1)
    assert result.exit_code == 2 and "--calibrate DATA" in result.output
