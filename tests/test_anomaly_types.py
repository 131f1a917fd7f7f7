"""Defect-type classification (`anomaly fit-types` / `anomaly classify`): the head reads anomaly-map
statistics and patch features through a detector fitted on good parts, is one checked file, and bad
input is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.anomaly import build_texture_set, fit_detector
from clipxfer.anomaly.defect_types import (
    GROUPS,
    fit_defect_types,
    fit_linear,
    fit_on_groups,
    labelled_type_folders,
    load_defect_types,
    type_features,
)  # fmt: skip
from clipxfer.anomaly.patches import DensePatches, encode_dense
from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.images import find_images

KINDS = ("good", "speckle", "scratch", "grain_scale")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny):
    """A brick zoo, a detector fitted on its good parts, and labelled folders (3 + 3 per kind)."""
    base = tmp_path_factory.mktemp("types")
    zoo = build_texture_set(base / "zoo", textures=("brick",), train_good=24, test_good=6, per_local=6, per_global=6,
                            seed=7) / "brick"  # fmt: skip
    for split, rows in (("train", slice(0, 3)), ("test", slice(3, 6))):
        for kind in KINDS:
            (base / split / kind).mkdir(parents=True)
            for path in sorted((zoo / "test" / kind).iterdir())[rows]:
                shutil.copy(path, base / split / kind / path.name)
    detector = fit_detector(tiny, list(find_images(zoo / "train" / "good")), shots=4, false_alarm_rate=0.2,
                            method="fused", members=["patchcore", "gaussian"], resolution=32)  # fmt: skip
    detector.save(base / "det")
    return base, detector


def test_features_follow_the_anomaly_map(tiny, parts):
    """A single odd patch (a flaw one cell wide) raises the map's maximum, is the peak patch and
    survives max pooling."""
    _, detector = parts
    part = encode_dense(tiny, [next(find_images(parts[0] / "test" / "good"))], resolution=detector.map_size)
    flawed = part.local.copy()
    odd = flawed[0, 1, 2] + 5 * np.abs(flawed).max()
    flawed[0, 1, 2] = odd
    before = type_features(detector, part)
    after = type_features(detector, DensePatches(flawed, part.joint, part.sizes))
    assert set(after) == set(GROUPS) and after["map_stats"].shape == (1, 1 + 5 + 1)  # patchcore: score + 5 map statistics; gaussian: score
    assert after["map_stats"][0, 1] > before["map_stats"][0, 1]  # the patchcore map's maximum
    np.testing.assert_allclose(after["peak_patch"][0], odd, rtol=1e-6)
    np.testing.assert_allclose(after["max_pooled"][0], np.maximum(before["max_pooled"][0], odd), rtol=1e-6)


def test_cross_validated_fit_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 6
    x = np.concatenate([centre + rng.normal(size=(4, 8)) for centre in centres])
    labels = np.repeat(np.arange(3), 4)
    weights, bias, choice = fit_linear(x, labels, 3, seed=1)
    assert ((x @ weights.T + bias).argmax(axis=1) == labels).all()
    assert choice["l2"] in [float(v) for v in choice["cv_log_loss"]] or f"{choice['l2']:g}" in choice["cv_log_loss"]


def test_cli_fit_types_and_classify_round_trip(parts, tiny):
    base, detector = parts
    runner = CliRunner()
    out = base / "types.safetensors"
    fitted = runner.invoke(main, ["anomaly", "fit-types", str(base / "train"), "--detector", str(base / "det.safetensors"),
                                  "--out", str(out), "--device", "cpu", "--json"])  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    meta = json.loads(fitted.stdout)
    assert meta["classes"] == sorted(KINDS) and meta["config"]["shots"] == {kind: 3 for kind in sorted(KINDS)}
    again = runner.invoke(main, ["anomaly", "fit-types", str(base / "train"), "--detector", str(base / "det.safetensors"),
                                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert again.exit_code == 2 and "--force" in again.output  # nothing stored is overwritten
    classified = runner.invoke(main, ["anomaly", "classify", str(base / "test"), "--types", str(out), "--device", "cpu",
                                      "--json"])  # fmt: skip
    assert classified.exit_code == 0, classified.output
    report = json.loads(classified.stdout)
    rows, metrics = report["results"], report["metrics"]
    assert len(rows) == 12 and {row["label"] for row in rows} == set(KINDS)
    assert metrics["n"] == 12 and set(metrics["per_type_accuracy"]) == set(KINDS)
    assert metrics["accuracy"] == pytest.approx(np.mean([row["type"] == row["label"] for row in rows]), abs=1e-6)
    head = load_defect_types(out, tiny.id)
    # the encoder the command loads (its precision as `auto` resolves it on this CPU)
    from clipxfer.encoders.registry import load_encoder_for_id

    encoder = load_encoder_for_id(head.model_id, device="cpu")
    patches = encode_dense(encoder, [row["path"] for row in rows], resolution=head.map_size)
    probabilities = head.probabilities(patches)
    np.testing.assert_allclose(probabilities.max(axis=1), [row["probability"] for row in rows], atol=1e-5)
    assert [head.classes[i] for i in probabilities.argmax(axis=1)] == [row["type"] for row in rows]


def test_bad_input_is_one_line(parts, tiny, tmp_path):
    base, _ = parts
    (tmp_path / "one" / "good").mkdir(parents=True)
    shutil.copy(next(find_images(base / "train" / "good")), tmp_path / "one" / "good" / "a.png")
    with pytest.raises(ClipxferError, match="1 subfolder"):
        labelled_type_folders(tmp_path / "one")
    shutil.copy(next(find_images(base / "train" / "good")), tmp_path / "one" / "loose.png")
    with pytest.raises(ClipxferError, match="images at the top"):
        labelled_type_folders(tmp_path / "one")
    good = list(find_images(base / "train" / "good")) + list(find_images(base / "test" / "good"))
    global_only = fit_detector(tiny, good, shots=3, false_alarm_rate=0.4, method="gaussian", resolution=32)
    global_only.save(tmp_path / "gauss")
    runner = CliRunner()
    refused = runner.invoke(main, ["anomaly", "fit-types", str(base / "train"), "--detector",
                                   str(tmp_path / "gauss.safetensors"), "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert refused.exit_code == 2 and "needs a detector with an anomaly map" in refused.output
    from clipxfer.encoders.artifacts import read_artifact_metadata, read_artifact_tensors, write_artifact

    path = fit_defect_types(tiny, parts[1], labelled_type_folders(base / "train")).save(tmp_path / "head")
    meta, arrays = read_artifact_metadata(path, "head"), read_artifact_tensors(path, "head")
    for name, change, message in (
        ("weights", lambda a, m: a.update(weights=a["weights"][:, :5]), "array 'weights'"),
        ("classes", lambda a, m: m.update(classes=["good", "good", "x", "y"]), "classes"),
        ("detector", lambda a, m: a.pop("detector.memory_bank"), "memory_bank"),
        ("scale", lambda a, m: a.update(feature_scale=-a["feature_scale"]), "feature_scale"),
    ):  # fmt: skip
        broken_arrays, broken_meta = dict(arrays), json.loads(json.dumps(meta))
        change(broken_arrays, broken_meta)
        write_artifact(tmp_path / name, broken_arrays, broken_meta, "head")
        result = runner.invoke(main, ["anomaly", "classify", str(base / "test"), "--types",
                                      str(tmp_path / f"{name}.safetensors"), "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, name


def test_cross_validation_chooses_the_groups_that_carry_the_classes():
    """Classes told apart by one group only, every other group noise: the chosen set holds that group,
    and a set without it is not chosen (its cross-validated log-loss is worse)."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 8)
    groups = {name: rng.normal(size=(len(labels), 6)) for name in GROUPS}
    groups["mean_pooled"] = groups["mean_pooled"] + 4 * np.eye(3, 6)[labels]
    fitted = fit_on_groups(groups, labels, 3, seed=0)
    assert "mean_pooled" in fitted["names"]
    losses = fitted["choice"]["cv_log_loss_by_groups"]
    assert losses["+".join(fitted["names"])] == min(losses.values())
    assert fitted["weights"].shape == (3, 6 * len(fitted["names"]))
    # The separating group alone beats the full set padded with three groups of noise.
    assert losses["mean_pooled"] < losses["+".join(GROUPS)]


def test_a_head_on_fewer_groups_saves_loads_and_reads_only_them(parts, tiny, tmp_path, monkeypatch):
    base, detector = parts
    import clipxfer.anomaly.defect_types as defect_types

    monkeypatch.setattr(defect_types, "GROUP_SETS", (("map_stats", "mean_pooled"),))
    head = fit_defect_types(tiny, detector, labelled_type_folders(base / "train"))
    assert head.groups == ["map_stats", "mean_pooled"]
    loaded = load_defect_types(head.save(tmp_path / "few"), tiny.id)
    assert loaded.groups == head.groups
    patches = encode_dense(tiny, list(find_images(base / "test")), resolution=detector.map_size)
    np.testing.assert_allclose(loaded.probabilities(patches), head.probabilities(patches), rtol=1e-5, atol=1e-6)
    from clipxfer.encoders.artifacts import read_artifact_metadata, read_artifact_tensors, write_artifact

    meta, arrays = read_artifact_metadata(tmp_path / "few.safetensors", "head"), read_artifact_tensors(tmp_path / "few.safetensors", "head")
    meta["config"]["groups"]["colour_histogram"] = 3
    write_artifact(tmp_path / "odd", arrays, meta, "head")
    with pytest.raises(ClipxferError, match="feature groups"):
        load_defect_types(tmp_path / "odd.safetensors")
