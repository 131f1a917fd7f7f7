"""Few-shot transfer end to end: the Python API and the probe/tip/coop/mix/predict commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.fewshot.run import run_transfer
from clipxfer.heads import load_head

from .conftest import random_images, write_tinted_folder

CLASSES = ["bird", "fish", "tree"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small ImageFolder: 3 classes x 10 images, tinted per class so even tiny can tell them apart."""
    root = tmp_path_factory.mktemp("labelled")
    return write_tinted_folder(root, CLASSES)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    "command,extra",
    [("probe", []), ("tip", []), ("tip", ["--finetune", "--steps", "10"]), ("coop", ["--max-steps", "6", "--n-ctx", "4"]),
     ("mix", ["--mix", "auto"]), ("mix", ["--mix", "0.5"])],
)
def test_training_commands_end_to_end(tmp_path, folder, command, extra):
    out = tmp_path / "head.safetensors"
    result = invoke(command, folder, "--shots", 3, "--seed", 1, "--model", "tiny", "--device", "cpu",
                    "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("method", "shots", "seed", "accuracy", "zeroshot_accuracy", "fit_seconds"):
        assert key in report
    assert report["method"] == command and report["shots"] == 3 and report["seed"] == 1
    assert 0.0 <= report["accuracy"] <= 1.0 and report["num_test"] == 9
    manifest = pd.read_csv(tmp_path / "head.manifest.csv")
    assert (manifest["split"] == "train").sum() == 9 and set(manifest["label"]) == set(CLASSES)
    head = load_head(out)
    assert head.config["shots"] == 3 and head.config["seed"] == 1 and head.config["manifest_hash"]


def test_text_output_and_predict(tmp_path, folder):
    out = tmp_path / "probe.safetensors"
    result = invoke("probe", folder, "-k", 4, "--model", "tiny", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert "zero-shot accuracy" in result.output and "probe     accuracy" in result.output
    result = invoke("predict", out, folder / "fish", "--json", "--device", "cpu", "--out", tmp_path / "preds.csv")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    assert len(predictions) == 10 and all(p["label"] in CLASSES for p in predictions)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    table = pd.read_csv(tmp_path / "preds.csv")
    assert list(table.columns[:3]) == ["path", "label", "probability"] and "p:fish" in table.columns


def test_same_seed_same_numbers(folder, tiny):
    runs = [run_transfer("tip", folder, 3, seed=5, encoder=tiny, save=False) for _ in range(2)]
    assert runs[0]["accuracy"] == runs[1]["accuracy"] and runs[0]["manifest_hash"] == runs[1]["manifest_hash"]
    other = run_transfer("tip", folder, 3, seed=6, encoder=tiny, save=False)
    assert other["manifest_hash"] != runs[0]["manifest_hash"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, folder):
    out = tmp_path / "h.safetensors"
    cases = [
        (["probe", folder, "--shots", 0], "at least 1"),
        (["probe", tmp_path / "missing", "--shots", 2], "unknown dataset"),
    ]
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.fromarray(random_images(1)[0]).save(one / "only" / "a.png")
    cases.append((["tip", one, "--shots", 1], "at least two"))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nnope.png,bird\nnope2.png,fish\n")
    cases.append((["probe", csv, "--shots", 1], "does not exist"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{folder}/{c}/0.png,{c}\n" for c in CLASSES) + f"{folder}/bird/1.png,cat\n")
    cases.append((["probe", manifest, "--shots", 1, "--classes", ",".join(CLASSES)], "unknown class(es) cat"))
    cases.append((["probe", folder, "--shots", 1, "--classes", "bird,fish"], "class folder(s) tree are not among"))
    for args, message in cases:
        result = CliRunner().invoke(main, [str(a) for a in args] + ["--model", "tiny", "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1
        assert not out.exists() and not (tmp_path / "h.manifest.csv").exists()


def test_head_used_with_another_model(tmp_path, folder, tiny):
    run_transfer("probe", folder, 2, encoder=tiny, out=tmp_path / "p.safetensors")
    with pytest.raises(ClipxferError, match="use --model tiny"):
        load_head(tmp_path / "p.safetensors", model_id="lite:efficientnet-lite0+all-MiniLM-L6-v2:conse-top10")


# --------------------------------------------------------------------------- lite, real data


@pytest.fixture(scope="module")
def fashion_16(lite):
    """Fashion-MNIST, 16 shots per class, seed 0, 1,000 test images, encoded once (cached)."""
    from clipxfer.fewshot.task import prepare_task

    from .conftest import fashion_mnist_or_skip

    return prepare_task(lite, fashion_mnist_or_skip(), 16, 0, max_test=1000)


def _acc(head, task):
    return float((head.predict(task.test) == task.test_labels).mean())


@pytest.mark.slow
def test_lite_fashion_mnist_16_shots(fashion_16):
    from clipxfer.heads.fitting import fit_head

    zeroshot = _acc(fashion_16.data.zeroshot, fashion_16)
    assert _acc(fit_head("probe", fashion_16.data), fashion_16) >= 0.75
    assert _acc(fit_head("tip", fashion_16.data), fashion_16) >= zeroshot + 0.20


@pytest.mark.slow
def test_lite_fashion_mnist_coop_beats_zeroshot(fashion_16):
    from clipxfer.heads.fitting import fit_head

    zeroshot = _acc(fashion_16.data.zeroshot, fashion_16)
    # keep="last": the trained context, not a step validation happened to prefer (step 0 is zero-shot itself).
    head = fit_head("coop", fashion_16.data, max_steps=40, lr=5e-3, eval_every=10, keep="last")
    assert _acc(head, fashion_16) > zeroshot


def test_features_from_an_index_match_encoding(tmp_path, folder, tiny, monkeypatch):
    """With --index the stored vectors are used (no re-encoding) and give the same numbers."""
    import clipxfer.fewshot.task as task_module
    from clipxfer.datasets.labelled import load_dataset
    from clipxfer.fewshot.task import encode_items
    from clipxfer.index import Index

    Index.update(folder, tiny, path=tmp_path / "idx", workers=0)
    encoded = run_transfer("probe", folder, 3, encoder=tiny, save=False)
    # The index batches images differently from encode_dataset, so its vectors equal the encoded ones
    # up to float order only: compare them with a tolerance, and prove the run reads them (no encoding).
    dataset = load_dataset(folder)
    rows = np.arange(len(dataset))
    stored = encode_items(tiny, dataset, rows, tmp_path / "idx")
    np.testing.assert_allclose(stored.embeddings, encode_items(tiny, dataset, rows).embeddings, atol=1e-5)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the images were encoded although the index holds them")

    monkeypatch.setattr(task_module, "encode_dataset", no_encoding)
    from_index = run_transfer("probe", folder, 3, encoder=tiny, index_path=tmp_path / "idx", save=False)
    monkeypatch.undo()
    assert from_index["manifest_hash"] == encoded["manifest_hash"]
    assert abs(from_index["accuracy"] - encoded["accuracy"]) <= 1 / encoded["num_test"] + 1e-9
    out = tmp_path / "p.safetensors"
    run_transfer("probe", folder, 3, encoder=tiny, out=out)
    result = invoke("predict", out, "--index", tmp_path / "idx", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["predictions"]) == 30


def test_an_unwritable_out_is_one_clear_line_and_writes_nothing(tmp_path, tiny):
    from clipxfer.heads.zeroshot import fit_zeroshot

    data = write_tinted_folder(tmp_path / "labelled", ["red", "green", "blue"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ClipxferError, match="cannot write the manifest .*choose --out in a writable folder"):
        run_transfer("probe", data, shots=2, seed=1, encoder=tiny, out=blocker / "head.safetensors")
    with pytest.raises(ClipxferError, match="cannot write the head .*choose --out in a writable folder"):
        fit_zeroshot(tiny, ["red", "green"], ["a photo of a {}."]).save(blocker / "zeroshot.safetensors")
    assert blocker.read_text() == "not a folder"
