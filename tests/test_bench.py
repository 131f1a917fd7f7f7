"""The benchmark runner end to end on the tiny model: schema, resume, leakage guard, bad configs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from clipxfer.bench import CSV_COLUMNS, BenchConfig, DatasetSpec, load_config, run_bench
from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.heads import HEAD_TYPES

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_colour_folder(root, per_class=10, seed=0, split=""):
    """An ImageFolder of noisy solid-colour images, one class per colour."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(36, 36, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def tiny_config(tmp_path):
    data = write_colour_folder(tmp_path / "colours")
    return BenchConfig(
        datasets=(DatasetSpec(source=str(data), max_test=12),),
        methods=("zeroshot", "probe", "tip"),
        shots=(1, 2),
        seeds=(1, 2),
        model="tiny",
    )


def test_bench_end_to_end_schema_and_outputs(tiny_config, tmp_path, tiny):
    out = tmp_path / "out"
    table = run_bench(tiny_config, out, encoder=tiny)
    stored = pd.read_csv(out / "results.csv")
    assert list(stored.columns) == CSV_COLUMNS
    assert len(stored) == 1 + 2 * 2 * 2  # zero-shot once, probe and tip over 2 shots x 2 seeds
    assert len(table) == len(stored)
    assert stored["accuracy"].between(0, 1).all() and stored["ece"].between(0, 1).all()
    assert set(stored["model_id"]) == {tiny.id}
    assert (stored[stored["method"] != "zeroshot"]["manifest_hash"].str.len() == 16).all()
    summary = (out / "summary.md").read_text()
    assert "| probe |" in summary and "Zero-shot:" in summary
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = pd.read_csv(out / "manifests" / "colours-k2-s1.csv")
    assert (manifest[manifest["split"] == "train"].groupby("label").size() == 2).all()


def test_bench_resume_skips_finished_cells(tiny_config, tmp_path, tiny, monkeypatch):
    out = tmp_path / "out"
    run_bench(tiny_config, out, encoder=tiny)
    first = pd.read_csv(out / "results.csv")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(HEAD_TYPES["probe"], "fit", classmethod(must_not_run))
    monkeypatch.setattr(HEAD_TYPES["tip"], "fit", classmethod(must_not_run))
    run_bench(tiny_config, out, encoder=tiny)
    pd.testing.assert_frame_equal(first, pd.read_csv(out / "results.csv"))

    monkeypatch.undo()
    grown = BenchConfig(**{**tiny_config.__dict__, "seeds": (1, 2, 3)})
    run_bench(grown, out, encoder=tiny)
    assert len(pd.read_csv(out / "results.csv")) == 1 + 2 * 2 * 3


def test_same_seed_gives_same_numbers(tiny_config, tmp_path, tiny):
    first = run_bench(tiny_config, tmp_path / "a", encoder=tiny)
    second = run_bench(tiny_config, tmp_path / "b", encoder=tiny)
    columns = ["accuracy", "balanced_accuracy", "macro_f1", "ece", "manifest_hash"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


def test_leakage_guard_lists_duplicate_pairs(tmp_path, tiny, capsys):
    data = tmp_path / "leaky"
    write_colour_folder(data, per_class=4, seed=3, split="train")
    write_colour_folder(data, per_class=4, seed=3, split="test")  # the same pixels again
    config = BenchConfig(datasets=(DatasetSpec(source=str(data)),), methods=("zeroshot", "tip"), shots=(1,), seeds=(1,))
    run_bench(config, tmp_path / "out", encoder=tiny)
    err = capsys.readouterr().err
    assert "WARNING: leakage" in err and "~" in err
    leaks = pd.read_csv(tmp_path / "out" / "leakage.csv")
    assert (leaks["cosine"] >= 0.97).all() and len(leaks) >= 3


def test_builtin_dataset_config_file(tmp_path, tiny):
    config_file = tmp_path / "bench.toml"
    config_file.write_text(
        'model = "tiny"\nmethods = ["zeroshot", "probe"]\nshots = [2]\nseeds = [1]\n\n'
        '[[datasets]]\nsource = "digits"\ntemplates = "simple"\nmax_test = 60\n'
    )
    config = load_config(config_file)
    assert config.datasets[0].source == "digits" and config.methods == ("zeroshot", "probe")
    table = run_bench(config, tmp_path / "out", encoder=tiny)
    assert set(table["n_test"]) == {60}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('methods = ["zeroshot", "nonsense"]\n[[datasets]]\nsource = "digits"\n', "unknown method(s) nonsense"),
        ('shots = [-1]\n[[datasets]]\nsource = "digits"\n', "shots must be whole numbers >= 0"),
        ('colour = "blue"\n', "unknown key(s) colour"),
        ("methods = [\n", "not valid TOML"),
        ('[[datasets]]\nname = "x"\n', "needs a 'source'"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, text, fragment):
    config_file = tmp_path / "bad.toml"
    config_file.write_text(text)
    result = CliRunner().invoke(main, ["bench", str(config_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]


def test_cli_bench_runs_and_prints_summary(tmp_path):
    data = write_colour_folder(tmp_path / "colours", per_class=6)
    result = CliRunner().invoke(
        main,
        ["bench", "--data", str(data), "--methods", "zeroshot,probe", "--shots", "1", "--seeds", "1",
         "--model", "tiny", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "# Benchmark summary" in result.output
    assert (tmp_path / "out" / "results.csv").is_file()


def test_unknown_dataset_is_one_clear_error(tmp_path, tiny):
    config = BenchConfig(datasets=(DatasetSpec(source="no-such-dataset"),), methods=("zeroshot",))
    with pytest.raises(ClipxferError, match="unknown dataset 'no-such-dataset'"):
        run_bench(config, tmp_path / "out", encoder=tiny)


def test_resume_loads_the_precision_the_stored_results_name(tiny_config, tmp_path, monkeypatch):
    """Results made with int8 resume where `auto` would pick a float precision (and vice versa),
    as an index is reopened: the stored model id decides."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from clipxfer.encoders import load_encoder

    monkeypatch.setenv("CLIPXFER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    int8 = load_encoder("tiny", "cpu", "openvino:int8")
    run_bench(tiny_config, out, encoder=int8)
    first = pd.read_csv(out / "results.csv")
    assert set(first["model_id"]) == {int8.id}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(HEAD_TYPES["probe"], "fit", classmethod(must_not_run))
    monkeypatch.setattr(HEAD_TYPES["tip"], "fit", classmethod(must_not_run))
    monkeypatch.setenv("CLIPXFER_RUNTIME", "torch")  # what `auto` loads here is a float torch model
    run_bench(tiny_config, out)  # no encoder given: the stored id's precision is loaded
    pd.testing.assert_frame_equal(first, pd.read_csv(out / "results.csv"))
