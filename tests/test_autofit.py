"""clipxfer fit: folds on the shots, the choice by cross-validation, the budget, the calibrated
ensemble head, fine-tuning followed by another head, and auto/ensemble as bench methods."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clipxfer.autofit import fit_auto
from clipxfer.autofit.folds import make_folds
from clipxfer.autofit.run import parse_budget
from clipxfer.bench import BenchConfig, DatasetSpec, run_bench
from clipxfer.cli import main
from clipxfer.errors import ClipxferError
from clipxfer.heads import load_head
from clipxfer.heads.ensemble import EnsembleHead, fit_temperature, fit_weights
from clipxfer.heads.fitting import fit_head

from .conftest import write_tinted_folder
from .test_heads_sota import clusters, few_shot_data

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tinted_folder(tmp_path_factory.mktemp("labelled"), CLASSES, per_class=10)


def synthetic(shots=4, val_shots=2, seed=0):
    encoding, labels, zeroshot = clusters(seed=seed, n_per_class=20)
    return few_shot_data(encoding, labels, zeroshot, shots=shots, val_shots=val_shots)


def test_folds_are_stratified_and_keep_a_training_image_per_class():
    data, _, _ = synthetic(shots=1, val_shots=2)  # 3 labelled images per class: leave-one-out per class
    folds = make_folds(data, folds=5)
    assert len(folds) == 3
    held = np.concatenate([f.heldout_rows for f in folds])
    assert sorted(held) == list(range(9))  # every labelled image held out exactly once
    for fold in folds:
        assert np.bincount(fold.data.train_labels, minlength=3).min() >= 1
        assert not set(fold.heldout_rows) & (set(fold.train_rows) | set(fold.val_rows))
        assert np.bincount(fold.data.train_labels, minlength=3).sum() + len(fold.data.val_labels) == 6


def test_auto_picks_by_cross_validation_and_refits_on_all_shots():
    data, test, test_labels = synthetic()
    result = fit_auto(data, candidates="probe,clap,tip,ensemble", folds=3, log=lambda line: None)
    table = {row["candidate"]: row for row in result.table()}
    assert set(table) == {"probe", "clap", "tip", "ensemble"} and result.folds == 3
    best = max(s.accuracy for s in result.scores if s.status == "ok")
    assert table[result.chosen]["cv_accuracy"] == pytest.approx(best, abs=1e-4)
    assert result.head.config["auto"]["chosen"] == result.chosen
    # Refitted on every shot: the same head as fitting the chosen method on the full data.
    if result.chosen == "probe":
        np.testing.assert_allclose(result.head.logits(test), fit_head("probe", data, prior="none").logits(test),
                                   atol=1e-5)


def test_auto_budget_skips_what_cannot_finish():
    data, _, _ = synthetic()
    with pytest.raises(ClipxferError, match="raise --budget"):
        fit_auto(data, candidates="probe,lpp", folds=3, budget_s=1e-9, log=lambda line: None)
    result = fit_auto(data, candidates="lpp,finetune", folds=3, log=lambda line: None)  # features only
    status = {s.name: s.status for s in result.scores}
    assert status == {"lpp": "ok", "finetune": "skipped"} and result.chosen == "lpp"


def test_parse_budget():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1h") == 3600
    assert parse_budget(None) is None
    for bad in ("ten", "-1m", "0"):
        with pytest.raises(ClipxferError, match="budget"):
            parse_budget(bad)


def test_ensemble_temperature_weights_and_file(tmp_path):
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1, 1, 0])  # half right: the best temperature flattens the softmax
    assert fit_temperature(logits, labels) > 10
    right = np.array([[0.9, 0.1], [0.1, 0.9]])
    wrong = right[:, ::-1]
    np.testing.assert_allclose(fit_weights([right, wrong], np.array([0, 1])), [1.0, 0.0], atol=1e-3)
    data, test, _ = synthetic()
    probe, clap = fit_head("probe", data), fit_head("clap", data, epochs=20)
    head = EnsembleHead.combine([probe, clap], [2.0, 0.5], [0.25, 0.75])
    from clipxfer.heads.base import softmax

    expected = 0.25 * softmax(probe.logits(test) / 2.0) + 0.75 * softmax(clap.logits(test) / 0.5)
    np.testing.assert_allclose(head.predict_proba(test), expected, atol=1e-5)
    loaded = load_head(head.save(tmp_path / "ens"))
    np.testing.assert_allclose(loaded.predict_proba(test), expected, atol=1e-5)


def test_fit_command(tmp_path, folder):
    out = tmp_path / "head.safetensors"
    result = CliRunner().invoke(main, ["fit", str(folder), "--shots", "2", "--model", "tiny", "--device", "cpu",
                                       "--candidates", "probe,lpp,ensemble", "--folds", "2", "--out", str(out),
                                       "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "auto" and report["chosen"] in ("probe", "lpp", "ensemble")
    assert [row["candidate"] for row in report["candidates"]] == ["probe", "lpp", "ensemble"]
    assert load_head(out).config["auto"]["chosen"] == report["chosen"]
    text = CliRunner().invoke(main, ["fit", str(folder), "--shots", "2", "--model", "tiny", "--device", "cpu",
                                     "--candidates", "probe,lpp", "--folds", "2", "--no-save"])
    assert text.exit_code == 0 and "cv acc" in text.output and "* " in text.output
    bad = CliRunner().invoke(main, ["fit", str(folder), "--shots", "2", "--model", "tiny", "--budget", "soon"])
    assert bad.exit_code == 2 and "--budget" in bad.output


def test_bench_auto_and_ensemble(tmp_path, folder, tiny):
    config = BenchConfig(datasets=(DatasetSpec(source=str(folder), max_test=12),), methods=("auto", "ensemble"),
                         shots=(2,), seeds=(1,), model="tiny",
                         method_options={"auto": {"candidates": ["probe", "lpp"], "folds": 2},
                                         "ensemble": {"folds": 2}})
    table = run_bench(config, tmp_path / "bench", encoder=tiny)
    rows = table.set_index("method")
    assert rows.loc["auto", "chosen"] in ("probe", "lpp") and rows.loc["ensemble", "chosen"] == "ensemble"
    assert 0 <= rows.loc["auto", "accuracy"] <= 1


class SteppingClock:
    """A monotonic clock that moves ``step`` seconds per reading: the budget logic sees slow work
    without any real waiting, so the outcome does not depend on the machine's speed."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_auto_budget_stops_finetuning_after_one_epoch(monkeypatch, folder):
    from clipxfer.autofit import select
    from clipxfer.autofit.run import run_fit

    epochs = []
    real_watch = select.epoch_watch

    def counting_watch(candidate, folds, deadline):
        check = real_watch(candidate, folds, deadline)
        return None if check is None else (lambda record: (epochs.append(record["epoch"]), check(record)))

    monkeypatch.setattr(select, "epoch_watch", counting_watch)
    monkeypatch.setattr(select, "time", SteppingClock(step=1.0))
    # 10 epochs per fit x (2 folds + refit): after one epoch at one clock step each, 29 more steps are
    # needed, more than the 20 s budget leaves; the probe after it still fits in.
    result = run_fit(folder, shots=2, method="auto", candidates="finetune,probe", folds=2, budget=20,
                     model="tiny", device="cpu", save=False)
    rows = {row["candidate"]: row for row in result["candidates"]}
    assert rows["finetune"]["status"] == "skipped" and "over the time budget" in rows["finetune"]["detail"]
    assert epochs == [1]
    assert rows["probe"]["status"] == "ok" and result["chosen"] == "probe"
