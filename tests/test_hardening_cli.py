"""Hardening round 2 on the few-shot, classify/predict, suggest and bench surfaces: each test failed
before its fix (issue 28)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.cli import main
from clipxfer.errors import ClipxferError

from .conftest import write_tinted_folder


def invoke(*args, cwd=None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, [str(a) for a in args])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tinted_folder(tmp_path_factory.mktemp("data") / "parts", ["ankle_boot", "shirt"], per_class=8)


# ---------------------------------------------------------------- suggest --exclude with probe's manifest


def test_probe_manifest_excludes_its_images_in_suggest(tmp_path, folder, tiny):
    from clipxfer.datasets.labelled import from_csv
    from clipxfer.index import Index

    index = tmp_path / "index"
    Index.update(folder, tiny, path=index, workers=0)
    out = tmp_path / "heads" / "probe.safetensors"  # the manifest lies in another folder than the data
    trained = invoke("probe", folder, "--shots", 2, "--model", "tiny", "--out", out, "--json")
    assert trained.exit_code == 0, trained.output
    manifest = tmp_path / "heads" / "probe.manifest.csv"
    listed = from_csv(manifest)  # the manifest reads back as a dataset: its paths resolve from its folder
    assert all(os.path.isfile(s) for s in listed.sources) and 0 < len(listed) < 16
    result = invoke("suggest", "--index", index, "--head", out, "-n", 16, "--json", "--exclude", manifest)
    assert result.exit_code == 0, result.output
    picks = json.loads(result.output)
    excluded = {os.path.realpath(s) for s in listed.sources}
    assert not {os.path.realpath(p["path"]) for p in picks} & excluded
    assert len(picks) == 16 - len(listed)  # the images the draw did not use


def test_suggest_refuses_a_manifest_matching_no_indexed_image(tmp_path, folder, tiny):
    from clipxfer.heads.zeroshot import fit_zeroshot
    from clipxfer.index import Index

    index = tmp_path / "index"
    Index.update(folder, tiny, path=index, workers=0)
    head = fit_zeroshot(tiny, ["ankle boot", "shirt"], ["a photo of a {}."]).save(tmp_path / "zs.safetensors")
    other = tmp_path / "other.csv"
    other.write_text("path,label\nnowhere/0.png,shirt\n")
    result = invoke("suggest", "--index", index, "--head", head, "--exclude", other)
    assert result.exit_code == 2
    assert "none of its 1 paths" in result.output and "other.csv" in result.output


# ---------------------------------------------------------------- default names and --force


def test_tip_and_tipf_get_different_default_files_and_nothing_is_overwritten(tmp_path, folder):
    plain = invoke("tip", folder, "--shots", 2, "--model", "tiny", "--json", cwd=tmp_path)
    assert plain.exit_code == 0, plain.output
    tuned = invoke("tip", folder, "--shots", 2, "--model", "tiny", "--finetune", "--steps", 2, "--json", cwd=tmp_path)
    assert tuned.exit_code == 0, tuned.output
    first, second = json.loads(plain.output)["head"], json.loads(tuned.output)["head"]
    assert first.startswith("tip-") and second.startswith("tipf-")
    before = (tmp_path / second).read_bytes()
    again = invoke("tip", folder, "--shots", 2, "--model", "tiny", "--finetune", "--steps", 2, cwd=tmp_path)
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) == 1
    assert (tmp_path / second).read_bytes() == before
    forced = invoke("tip", folder, "--shots", 2, "--model", "tiny", "--finetune", "--steps", 2, "--force",
                    cwd=tmp_path)
    assert forced.exit_code == 0, forced.output


def test_every_artifact_command_refuses_an_existing_out(tmp_path, folder):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    for args in (
        ["probe", folder, "--shots", 2],
        ["adapt", folder, "--unlabelled", folder / "shirt"],
        ["finetune", folder, "--shots", 2],
        ["meta-train", folder],
        ["anomaly", "fit", folder / "shirt"],
        ["classify", folder, "--save-head"],
    ):
        out = [taken] if args[0] == "classify" else ["--out", taken]
        result = invoke(*args, *out, "--model", "tiny")
        assert result.exit_code == 2 and "exists; pass --force" in result.output, (args, result.output)
    assert taken.read_bytes() == b"keep me"


def test_default_names_differ_by_variant():
    from clipxfer.fewshot.run import output_name

    names = {output_name("tip", {}), output_name("tip", {"finetune": True}), output_name("mix", {"base": "coop"}),
             output_name("mix", {}), output_name("probe", {}, transductive=True), output_name("probe", {"init": "m"})}
    assert len(names) == 6
    assert "--out adapted.safetensors" in main.commands["finetune"].help
    assert "adapted.safetensors" not in main.commands["adapt"].help  # the adapter's name, not a head's


# ---------------------------------------------------------------- unreadable files in classify and predict


@pytest.fixture()
def with_broken(tmp_path, folder):
    import shutil

    copy = shutil.copytree(folder, tmp_path / "parts")
    (copy / "shirt" / "broken.png").write_bytes(b"not an image")
    return copy


def test_classify_skips_unreadable_files_and_fail_fast_stops(with_broken):
    result = invoke("classify", with_broken, "--model", "tiny", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["n"] == 16 and [s["path"].endswith("broken.png") for s in summary["skipped"]] == [True]
    assert "skipped 1 unreadable image" in result.output
    unlabelled = invoke("classify", with_broken / "shirt", "--classes", "ankle boot,shirt", "--model", "tiny")
    assert unlabelled.exit_code == 0 and "broken.png" in unlabelled.output
    stopped = invoke("classify", with_broken, "--model", "tiny", "--fail-fast")
    assert stopped.exit_code == 2 and "broken.png" in stopped.output


def test_predict_skips_unreadable_files_and_fail_fast_stops(tmp_path, folder, with_broken):
    head = tmp_path / "probe.safetensors"
    assert invoke("probe", folder, "--shots", 2, "--model", "tiny", "--out", head).exit_code == 0
    result = invoke("predict", head, with_broken, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert len(payload["predictions"]) == 16 and payload["skipped"][0]["path"].endswith("broken.png")
    stopped = invoke("predict", head, with_broken, "--fail-fast")
    assert stopped.exit_code == 2 and "broken.png" in stopped.output


# ---------------------------------------------------------------- predict --out like classify --out


def test_predict_out_does_not_print_rows(tmp_path, folder):
    head = tmp_path / "probe.safetensors"
    assert invoke("probe", folder, "--shots", 2, "--model", "tiny", "--out", head).exit_code == 0
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(head), str(folder), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [f"wrote predictions to {tmp_path / 'p.csv'}"]
    assert len((tmp_path / "p.csv").read_text().strip().splitlines()) == 17


# ---------------------------------------------------------------- class names: '_' and ' '


def test_class_names_match_across_underscore_and_space(tmp_path, folder, tiny):
    from clipxfer.classify.run import classify_folder
    from clipxfer.datasets.labelled import from_image_folder

    dataset = from_image_folder(folder, ["ankle boot", "shirt"])
    assert dataset.classnames == ["ankle boot", "shirt"] and sorted(set(dataset.labels)) == [0, 1]
    result = classify_folder(tiny, folder, ["ankle boot", "shirt"])
    assert result.labelled and result.report is not None  # scored, not treated as unlabelled
    with pytest.raises(ClipxferError, match="repeat"):
        from_image_folder(folder, ["ankle boot", "ankle_boot", "shirt"])


def test_calibration_classes_are_checked_before_any_encoding(tmp_path, folder, monkeypatch):
    from clipxfer.datasets import features

    other = write_tinted_folder(tmp_path / "other", ["sock", "hat"], per_class=2)

    def no_encoding(*args, **kwargs):  # cached features count too: nothing may be looked up before the check
        raise AssertionError("encoded before the class lists were checked")

    monkeypatch.setattr(features, "encode_dataset", no_encoding)
    result = invoke("classify", folder, "--classes", "ankle boot,shirt", "--conformal", 0.1, "--calibrate", other,
                    "--model", "tiny")
    assert result.exit_code == 2 and "sock" in result.output


# ---------------------------------------------------------------- bench config: every mistake


def test_bench_config_reports_every_mistake(tmp_path):
    config = tmp_path / "bench.toml"
    config.write_text('model = ""\nmethods = ["probe", "nosuch"]\nshots = [-1]\ncolour = "red"\n'
                      '[[datasets]]\nsource = "digits"\nmax_test = 0\n[method_options.probe]\nbogus = 1\n')
    result = invoke("bench", config, "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 6, result.output
    for word in ("colour", "max_test", "nosuch", "model", "bogus", "shots"):
        assert sum(word in line for line in lines) >= 1, word


# ---------------------------------------------------------------- the int8 hint names the precision


def test_int8_mismatch_names_the_precision():
    from clipxfer.encoders.artifacts import check_model_id
    from clipxfer.encoders.ids import LITE_ID

    with pytest.raises(ClipxferError, match="use --precision fp32$"):
        check_model_id(LITE_ID, LITE_ID + "@int8", "this probe head was made")
    with pytest.raises(ClipxferError, match="use --precision int8$"):
        check_model_id(LITE_ID + "@int8", LITE_ID, "this probe head was made")
    with pytest.raises(ClipxferError, match="use --model tiny$"):
        check_model_id("open_clip:clipxfer-tiny:random-seed0", LITE_ID, "this probe head was made")


# ---------------------------------------------------------------- lpp and clap with one shot per class


@pytest.mark.parametrize("method", ["lpp", "clap"])
def test_validation_free_methods_fit_one_image_per_class(tmp_path, method):
    root = tmp_path / "one"
    write_tinted_folder(root / "train", ["a", "b"], per_class=1)
    write_tinted_folder(root / "test", ["a", "b"], per_class=3, seed=5)
    result = invoke(method, root, "--shots", 1, "--model", "tiny", "--epochs", 5, "--no-save", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["num_train"] == 2 and payload["num_val"] == 0 and np.isfinite(payload["accuracy"])
    refused = invoke("probe", root, "--shots", 1, "--model", "tiny", "--no-save")
    assert refused.exit_code == 2 and "no validation images" in refused.output
