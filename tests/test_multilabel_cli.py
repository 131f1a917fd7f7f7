"""Multi-label end to end on real images (mosaics of scikit-learn digits): the manifest's ``a|b`` label
column, ``probe|predict|classify --multi-label``, per-label conformal sets, ``bench --task multilabel``
and ``/api/classify`` with a multi-label head."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.cli import main
from clipxfer.datasets.labelled import load_dataset
from clipxfer.datasets.mosaic import make_mosaics, write_mosaics
from clipxfer.errors import ClipxferError
from clipxfer.heads.multilabel import conformal_label_thresholds, label_calibration, zeroshot_label_probabilities


@pytest.fixture(scope="module")
def digit_mosaics(tmp_path_factory):
    """A multi-label manifest of 2x2 digit mosaics: train, val and test mosaics from disjoint digit images."""
    digits = load_dataset("digits")
    order = np.random.default_rng(0).permutation(len(digits))
    pools = {"train": order[:600], "val": order[600:1200], "test": order[1200:]}
    parts = {"train": make_mosaics(digits, 40, 1, pools["train"]), "val": make_mosaics(digits, 60, 2, pools["val"]),
             "test": make_mosaics(digits, 30, 3, pools["test"])}
    folder = tmp_path_factory.mktemp("mosaics")
    return write_mosaics(parts, folder), parts


def write_manifest(folder, rows):
    from PIL import Image

    for name, _ in rows:
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(folder / name)
    (folder / "m.csv").write_text("path,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
    return folder / "m.csv"


def test_manifest_label_column_holds_several_labels(tmp_path, digit_mosaics):
    manifest = write_manifest(tmp_path, [("a.png", "cat| dog"), ("b.png", "dog"), ("c.png", "bird|cat|cat")])
    data = load_dataset(manifest, multi_label=True)
    assert data.classnames == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(data.targets, [[0, 1, 1], [0, 0, 1], [1, 1, 0]])
    assert data.subset([2]).targets.tolist() == [[1, 1, 0]]
    with pytest.raises(ClipxferError, match=r"row 2: label 'cat\| dog' holds '\|'.*--multi-label"):
        load_dataset(manifest)  # a single-label read refuses the separator in a class name
    path, parts = digit_mosaics
    back = load_dataset(path, parts["train"].classnames, multi_label=True)
    np.testing.assert_array_equal(back.targets[back.splits == "train"], parts["train"].targets)
    assert set(back.splits) == {"train", "val", "test"}


def test_mosaics_command_writes_a_seeded_multi_label_folder(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        written = runner.invoke(main, ["mosaics", "digits", str(tmp_path / name), "--train", "6", "--val", "4",
                                       "--test", "3", "--seed", "5"])
        assert written.exit_code == 0, written.output
    first, second = (load_dataset(tmp_path / n / "manifest.csv", multi_label=True) for n in ("a", "b"))
    np.testing.assert_array_equal(first.targets, second.targets)
    assert list(first.splits).count("test") == 3 and first.targets.sum(1).min() >= 1
    refused = runner.invoke(main, ["mosaics", str(tmp_path / "a" / "manifest.csv"), str(tmp_path / "c")])
    assert refused.exit_code == 2 and "built-in" in refused.output


def test_conformal_label_thresholds_by_hand_and_their_miss_rate():
    scores = np.arange(1, 20) / 20.0  # 19 positives of one label: at alpha 0.1, floor(0.1 * 20) = 2nd smallest
    targets = np.ones((19, 1), np.uint8)
    calibration = label_calibration(targets, scores[:, None], ["a"], "hand")
    assert conformal_label_thresholds(calibration, ["a"], 0.1)[0] == pytest.approx(0.1)
    assert conformal_label_thresholds(calibration, ["a"], 0.01)[0] == 0.0  # too few positives: always in
    rng = np.random.default_rng(0)  # exchangeable positives: the miss rate stays near alpha or below
    misses = []
    for _ in range(400):
        draw = rng.beta(2, 1, size=(50, 1))
        threshold = conformal_label_thresholds(label_calibration(np.ones((49, 1)), draw[:49], ["a"], "r"), ["a"], 0.2)
        misses.append(draw[49, 0] < threshold[0])
    assert np.mean(misses) <= 0.2 + 3 * np.sqrt(0.2 * 0.8 / 400)


def test_zeroshot_label_probabilities_pass_labels_above_chance():
    logits = np.log(np.array([[0.45, 0.45, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    probs = zeroshot_label_probabilities(logits)
    assert (probs[0] >= 0.5).tolist() == [True, True, False, False]  # two objects split the softmax, both pass
    np.testing.assert_allclose(probs[1], 0.5)  # uniform: exactly at the threshold


def test_probe_predict_classify_and_bench_multi_label(digit_mosaics, tiny, tmp_path):
    manifest, parts = digit_mosaics
    runner = CliRunner()
    head = tmp_path / "ml.safetensors"
    fitted = runner.invoke(main, ["probe", str(manifest), "--multi-label", "--shots", "4", "--model", "tiny",
                                  "--out", str(head)])
    assert fitted.exit_code == 0, fitted.output
    assert "validation mAP" in fitted.output and "per-label AP on test" in fitted.output and head.is_file()
    again = runner.invoke(main, ["probe", str(manifest), "--multi-label", "--shots", "4", "--model", "tiny",
                                 "--out", str(head)])
    assert again.exit_code == 2 and "--force" in again.output  # nothing stored is overwritten
    as_json = json.loads(runner.invoke(main, ["probe", str(manifest.parent), "--multi-label", "--shots", "4",
                                              "--model", "tiny", "--no-save", "--json"]).output)  # the mosaic folder
    assert set(as_json["probe"]) >= {"map", "per_label_ap", "micro_f1", "macro_f1"} and as_json["num_test"] == 30
    assert as_json["dataset"] == manifest.parent.name
    assert set(as_json["conformal"]["per_label_miss_rate"]) <= set(parts["test"].classnames)

    test_folder = manifest.parent / "test"
    predicted = runner.invoke(main, ["predict", str(head), str(test_folder), "--multi-label", "--conformal", "0.2",
                                     "--json"])
    assert predicted.exit_code == 0, predicted.output
    result = json.loads(predicted.output)
    assert result["multi_label"] and len(result["predictions"]) == 30
    first = result["predictions"][0]
    assert set(first["probabilities"]) == set(parts["test"].classnames)
    thresholds = result["thresholds"]
    assert first["labels"] == [n for n, p in first["probabilities"].items() if p >= thresholds[n]]
    assert all(set(row["set"]) <= set(parts["test"].classnames) for row in result["predictions"])
    out = tmp_path / "preds.csv"
    assert runner.invoke(main, ["predict", str(head), str(test_folder), "--out", str(out)]).exit_code == 0
    assert "p:zero" in out.read_text().splitlines()[0]

    classified = runner.invoke(main, ["classify", str(test_folder), "--classes", ",".join(parts["test"].classnames),
                                      "--multi-label", "--model", "tiny", "--json"])
    assert classified.exit_code == 0, classified.output
    summary = json.loads(classified.output)
    row = summary["predictions"][0]
    assert summary["multi_label"] and row["labels"] == [n for n, p in row["probabilities"].items() if p >= 0.5]
    refused = runner.invoke(main, ["classify", str(test_folder), "--classes", "a,b", "--multi-label",
                                   "--transductive"])
    assert refused.exit_code == 2 and "--transductive" in refused.output

    single = tmp_path / "single.safetensors"
    assert runner.invoke(main, ["classify", str(test_folder), "--classes", "a,b", "--model", "tiny", "--save-head",
                                str(single)]).exit_code == 0
    wrong = runner.invoke(main, ["predict", str(single), str(test_folder), "--multi-label"])
    assert wrong.exit_code == 2 and "single-label head" in wrong.output

    config = tmp_path / "ml.toml"
    config.write_text(f'task = "multilabel"\nmodel = "tiny"\nshots = [2]\nseeds = [1]\n'
                      f'[[datasets]]\nsource = "{manifest}"\nname = "digit-mosaics"\n')
    bench = runner.invoke(main, ["bench", str(config), "--out", str(tmp_path / "bench")])
    assert bench.exit_code == 0, bench.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "bench" / "multilabel_results.csv")
    assert list(table["method"]) == ["zeroshot", "probe"] and table["map"].between(0, 1).all()
    assert table["conformal_set_size"].isna().tolist() == [True, False]  # sets for the calibrated probe only
    assert "label miss rate" in (tmp_path / "bench" / "multilabel_summary.md").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace('task = "multilabel"', 'task = "multilabel"\nmethods = ["tip"]'))
    refused = runner.invoke(main, ["bench", str(bad)])
    assert refused.exit_code == 2 and "choose from zeroshot, probe" in refused.output


@pytest.mark.slow  # fits a lite head on digit mosaics and serves the lite sample-photo index
def test_serve_classify_with_a_multi_label_head(sample_photo_index, sample_photos_dir, lite, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipxfer.fewshot.multilabel import run_multilabel
    from clipxfer.serve import ServeConfig, create_app

    result = run_multilabel("digits", 1, 0, encoder=lite, out=tmp_path / "ml", test_count=10)
    config = ServeConfig(index=sample_photo_index, heads=[result["head"]], labels=tmp_path / "l.json")
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        data = (sample_photos_dir / "chelsea.jpg").read_bytes()
        answer = client.post("/api/classify", files={"file": ("c.jpg", data, "image/jpeg")}, params={"alpha": 0.2})
        listed = client.get("/api/heads").json()
    assert [head["multi_label"] for head in listed] == [True]
    assert answer.status_code == 200, answer.text
    body = answer.json()
    prediction = body["predictions"][0]
    assert body["multi_label"] and body["conformal"]["method"] == "label-conditional"
    assert prediction["labels"] == [n for n, p in prediction["probabilities"].items()
                                    if p >= prediction["thresholds"][n]]
    assert set(prediction["set"]) <= set(body["classes"])
