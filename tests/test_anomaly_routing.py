"""One detector for many part types (`anomaly fit DIR` with one subfolder per type): the layout is
detected and said in one line, each part is routed to its type and decided by that type's detector,
`anomaly score` works on the file unchanged, and a damaged file is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.anomaly import build_texture_set, load_any_detector
from clipxfer.anomaly.patches import encode_dense, take_patches
from clipxfer.anomaly.routing import part_type_folders, route
from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.images import find_images

FIT = ["--shots", "4", "--false-alarm-rate", "0.2", "--members", "patchcore,gaussian", "--resolution", "32",
       "--model", "tiny", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_texture_set(tmp_path_factory.mktemp("zoo"), train_good=24, test_good=3, per_local=1, per_global=1, seed=6)


@pytest.fixture(scope="module")
def routed(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("routed") / "det.safetensors"
    result = CliRunner().invoke(main, ["anomaly", "fit", str(zoo), *FIT, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, result


def test_layout_is_detected_from_the_folders(zoo, tmp_path):
    types = part_type_folders(zoo)
    assert list(types) == ["brick", "grass", "gravel"]
    # MVTec's layout: a type's good images are its train/good, never its test defects
    assert types["brick"] == list(find_images(zoo / "brick" / "train" / "good"))
    assert part_type_folders(zoo / "brick" / "train" / "good") is None  # images at the top: one type
    one = tmp_path / "one"
    shutil.copytree(zoo / "brick" / "train" / "good", one / "only")
    assert part_type_folders(one) is None  # one subfolder: one type


def test_cli_fits_one_routed_detector_and_score_works_on_it(zoo, routed, tmp_path):
    out, result = routed
    assert "3 part types, one subfolder each (brick, grass, gravel)" in result.stderr
    config = json.loads(result.stdout)["config"]
    assert config["method"] == "routed" and [t["name"] for t in config["types"]] == ["brick", "grass", "gravel"]
    routing = config["routing"]
    assert {entry["held_out"] for entry in routing["per_type"].values()} == {20}
    assert 0 <= routing["held_out_accuracy"] <= 1 and routing["held_out_median_margin"] >= 0
    scored = CliRunner().invoke(main, ["anomaly", "score", str(zoo / "grass" / "test"), "--detector", str(out),
                                       "--device", "cpu", "--json"])  # fmt: skip
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    assert report["method"] == "routed" and report["threshold"] == 0.0
    rows = report["results"]
    assert {row["type"] for row in rows} <= {"brick", "grass", "gravel"} and all(row["route_margin"] >= 0 for row in rows)
    assert all((row["decision"] == "defect") == (row["score"] > 0) for row in rows)
    assert report["metrics"]["image_auroc"] is not None


def test_each_part_is_decided_by_its_routed_type(zoo, routed, tiny):
    detector = load_any_detector(routed[0], tiny.id)
    paths = [path for name in ("brick", "grass", "gravel") for path in list(find_images(zoo / name / "test"))[:6]]
    patches = encode_dense(tiny, paths, resolution=detector.map_size)
    names, margins = detector.routes(patches)
    scores = detector.score(patches).scores
    for name in set(names):
        rows = [i for i, routed_to in enumerate(names) if routed_to == name]
        own = detector.types[name]
        expected = own.decide(own.score(take_patches(patches, rows)).scores)
        np.testing.assert_array_equal(detector.decide(scores[rows]), expected)
    # a part whose pooled features equal a type's prototype goes to that type with a positive margin
    local = np.broadcast_to(detector.prototypes[1], (1, 2, 2, detector.prototypes.shape[1]))
    chosen, margin = route(local, detector.prototypes)
    assert chosen[0] == 1 and margin[0] > 0


def test_layout_options_and_bad_inputs_are_one_line(zoo, routed, tmp_path):
    runner = CliRunner()
    flat = runner.invoke(main, ["anomaly", "fit", str(zoo / "brick" / "train" / "good"), *FIT, "--layout", "types",
                                "--out", str(tmp_path / "x")])  # fmt: skip
    assert flat.exit_code == 2 and "--layout types needs two or more subfolders" in flat.output
    single = runner.invoke(main, ["anomaly", "fit", str(zoo / "brick"), *FIT, "--layout", "single", "--out",
                                  str(tmp_path / "one"), "--json"])  # fmt: skip
    assert single.exit_code == 0 and json.loads(single.stdout)["config"]["method"] == "fused"
    from clipxfer.encoders.artifacts import read_artifact_metadata, read_artifact_tensors, write_artifact

    meta, arrays = read_artifact_metadata(routed[0], "detector"), read_artifact_tensors(routed[0], "detector")
    broken = dict(arrays, route_prototypes=arrays["route_prototypes"][:2])
    write_artifact(tmp_path / "bad", broken, meta, "detector")
    with pytest.raises(ClipxferError, match="route_prototypes"):
        load_any_detector(tmp_path / "bad.safetensors")
    meta["config"]["types"][1]["config"]["threshold"] = None
    write_artifact(tmp_path / "bad2", arrays, meta, "detector")
    scored = runner.invoke(main, ["anomaly", "score", str(zoo / "brick" / "test"), "--detector",
                                  str(tmp_path / "bad2.safetensors"), "--device", "cpu"])  # fmt: skip
    assert scored.exit_code == 2 and "type grass has no calibrated threshold" in scored.output
