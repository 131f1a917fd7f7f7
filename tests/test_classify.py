"""classify: the Python API and the command, end to end on small folders with the tiny model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.classify.run import classify_folder, folder_label
from clipxfer.cli import main
from clipxfer.datasets.prompts import load_templates
from clipxfer.errors import ClipxferError
from clipxfer.heads import load_head
from clipxfer.heads.zeroshot import fit_zeroshot

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _write_folder(root, per_class: int = 3, labelled: bool = True):
    """Solid colour images with a little noise, one subfolder per colour when ``labelled``."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.integers(-20, 21, size=(36, 44, 3)), 0, 255).astype(np.uint8)
            folder = root / name if labelled else root
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def colour_folder(tmp_path):
    return _write_folder(tmp_path / "colours")


def run(*args):
    result = CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)
    return result


def test_labelled_folder_api_matches_a_hand_computation(tiny, colour_folder):
    result = classify_folder(tiny, colour_folder, templates="simple")
    assert result.labelled and result.classnames == ["blue", "green", "red"] and len(result.paths) == 9
    head = fit_zeroshot(tiny, ["blue", "green", "red"], load_templates("simple"))
    # Encoded by hand (the run may have read cached features made with other threads): equal up to float order.
    expected = head.predict_proba(tiny.embed_images(result.paths))
    np.testing.assert_allclose(result.probs, expected, atol=1e-5)
    labels = np.array([["blue", "green", "red"].index(p.split("/")[-2]) for p in result.paths])
    np.testing.assert_array_equal(result.labels, labels)
    assert result.report["accuracy"] == pytest.approx(np.mean(result.probs.argmax(1) == labels))
    assert sum(result.report["support"].values()) == 9
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cli_labelled_folder_json_out_plot(tiny, colour_folder, tmp_path):
    out, plot = tmp_path / "preds.csv", tmp_path / "cm.png"
    result = run("classify", colour_folder, "--model", "tiny", "--precision", "fp32", "--top-k", "2",
                 "--out", out, "--plot", plot, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 9 and summary["labelled"] is True and summary["classes"] == ["blue", "green", "red"]
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["balanced_accuracy"] <= 1.0
    assert 0.0 <= summary["ece"] <= 1.0 and summary["macro_f1"] is not None
    assert np.asarray(summary["confusion_matrix"]).sum() == 9 and "predictions" not in summary
    assert summary["out"] == str(out) and summary["plot"] == str(plot)
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "label", "pred_1", "prob_1", "pred_2", "prob_2"] and len(table) == 9
    assert (table["prob_1"] >= table["prob_2"]).all()
    assert summary["accuracy"] == pytest.approx((table["label"] == table["pred_1"]).mean())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_text_output_and_saved_head(tiny, colour_folder, tmp_path):
    result = run("classify", colour_folder, "--model", "tiny", "--templates", "textures",
                 "--save-head", tmp_path / "zs.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.output
    for expected in ("accuracy", "balanced accuracy", "macro-F1", "ECE (15 bins)", "per-class recall", "confusion matrix"):
        assert expected in result.stdout
    head = load_head(tmp_path / "zs.safetensors")
    assert head.classnames == ["blue", "green", "red"] and head.config["templates"] == load_templates("textures")


def test_unlabelled_folder_gives_predictions(tiny, tmp_path):
    folder = _write_folder(tmp_path / "loose", per_class=1, labelled=False)
    result = run("classify", folder, "--model", "tiny", "--classes", "red,green,blue", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["labelled"] is False and summary["accuracy"] is None and summary["n"] == 3
    assert len(summary["predictions"]) == 3 and len(summary["predictions"][0]["top"]) == 3
    assert sum(summary["predicted_counts"].values()) == 3
    text = run("classify", folder, "--model", "tiny", "--classes", "red,green,blue", "--top-k", "1")
    assert text.exit_code == 0 and "pred_1" in text.stdout and "blue_0.png" in text.stdout


def test_given_classes_on_a_labelled_folder_keep_labels_and_add_distractors(tiny, colour_folder, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\npurple\n")
    descriptions = tmp_path / "d.csv"
    descriptions.write_text("class,description\npurple,a mix of red and blue\n")
    result = run("classify", colour_folder, "--model", "tiny", "--classes", classes, "--descriptions", descriptions, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["labelled"] and summary["classes"] == ["red", "green", "blue", "purple"]
    assert summary["support"] == {"red": 3, "green": 3, "blue": 3, "purple": 0} and summary["num_descriptions"] == 1
    # Subfolders that are not among the classes: predictions only.
    other = run("classify", colour_folder, "--model", "tiny", "--classes", "cat,dog", "--json")
    assert json.loads(other.stdout)["labelled"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "cat"], "found 1 class"),
        (["--templates", "nosuchset", "--classes", "a,b"], "unknown template set 'nosuchset'"),
        (["--plot", "cm.png", "--classes", "a,b"], "no confusion matrix"),
    ],
)
def test_cli_errors_are_one_line(tiny, tmp_path, args, message):
    folder = _write_folder(tmp_path / "loose", per_class=1, labelled=False)
    result = run("classify", folder, "--model", "tiny", *args)
    lines = result.stderr.strip().split("\n")  # progress bars may come first
    assert result.exit_code == 2 and lines[-1].startswith("error: ") and message in lines[-1]
    assert sum("error" in line for line in lines) == 1


def test_folder_errors(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipxferError, match="no images found"):
        classify_folder(tiny, tmp_path / "empty")
    with pytest.raises(ClipxferError, match="no images found"):
        classify_folder(tiny, tmp_path / "empty", classes=["a", "b"])
    loose = _write_folder(tmp_path / "loose", per_class=1, labelled=False)
    with pytest.raises(ClipxferError, match="no class subfolders; give --classes"):
        classify_folder(tiny, loose)
    with pytest.raises(ClipxferError, match="not a folder"):
        classify_folder(tiny, tmp_path / "missing")
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a cat\n")
    with pytest.raises(ClipxferError, match="has no"):
        classify_folder(tiny, loose, classes=["a", "b"], templates=str(bad))
    result = run("classify", "--model", "tiny")
    assert result.exit_code == 2 and "FOLDER of images or --index" in result.stderr


def test_prompts_command():
    listing = run("prompts", "--json")
    names = [entry["name"] for entry in json.loads(listing.stdout)]
    assert {"simple", "openai_imagenet", "industrial", "medical", "satellite", "textures", "documents"} <= set(names)
    shown = run("prompts", "satellite")
    assert shown.exit_code == 0 and shown.stdout.splitlines()[0] == "a satellite photo of {}."
    assert "openai_imagenet" in run("prompts").stdout


def test_folder_label():
    assert folder_label("/data/cats/x.jpg", "/data") == "cats"
    assert folder_label("test/cats/x.jpg", "/data") == "cats"
    assert folder_label("/data/x.jpg", "/data") is None
    assert folder_label("/elsewhere/cats/x.jpg", "/data") is None


def test_index_labelled_by_class_folders(tiny, colour_folder, tmp_path):
    index_module = pytest.importorskip("clipxfer.index")
    index_path = tmp_path / "idx"
    index_module.Index.update(colour_folder, model="tiny", path=index_path, precision="fp32")
    from clipxfer.classify import classify_index

    from_index = classify_index(index_path, model=tiny)
    from_folder = classify_folder(tiny, colour_folder)
    assert from_index.labelled and from_index.classnames == ["blue", "green", "red"] and len(from_index.paths) == 9
    by_path = dict(zip(map(str, from_folder.paths), from_folder.probs))
    for path, probs in zip(from_index.paths, from_index.probs):
        np.testing.assert_allclose(probs, by_path[str(colour_folder / path.split("/")[-2] / path.split("/")[-1])], atol=1e-4)
    result = run("classify", "--index", index_path, "--classes", "red,green,blue,purple", "--json", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["labelled"] and summary["n"] == 9 and summary["support"]["purple"] == 0
    with pytest.raises(ClipxferError, match="model"):
        classify_index(index_path, ["cat", "dog"], model=SimpleNamespace(id="lite:another-model"))
