"""Fine-tuning under hostile input: adapters are bound to their tensors, a file that is not an adapter
says what it is, every numeric option is checked before any work, a NaN loss stops with one line, and
Ctrl-C says truthfully what a re-run does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipxfer.cli import main
from clipxfer.encoders import load_encoder
from clipxfer.encoders.artifacts import HEAD_FORMAT, read_artifact_metadata, read_artifact_tensors, write_artifact
from clipxfer.encoders.ids import ENCODER_PREFIX
from clipxfer.errors import ClipxferError
from clipxfer.finetune.run import run_finetune

from .conftest import write_tinted_folder

CLASSES = ["bird", "fish", "tree"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tinted_folder(tmp_path_factory.mktemp("labelled"), CLASSES, per_class=6)


@pytest.fixture(scope="module")
def adapter(folder, tiny, tmp_path_factory):
    """An adapter written by the current 'clipxfer finetune' code."""
    out = tmp_path_factory.mktemp("adapter") / "adapted.safetensors"
    run_finetune(folder, 2, 1, encoder=tiny, out=out, epochs=1, lr=1e-2)
    return out


def tampered_copy(adapter, path):
    """``adapter`` with one encoder tensor changed and its metadata (its model id) kept."""
    meta = read_artifact_metadata(adapter, "adapter")
    tensors = read_artifact_tensors(adapter, "adapter")
    name = next(n for n in sorted(tensors) if n.startswith(ENCODER_PREFIX))
    tensors[name] = tensors[name] * 0.5 + 0.01
    return write_artifact(path, tensors, meta, "adapter")


def test_an_adapter_written_now_loads_and_a_tampered_one_is_refused(adapter, tiny, tmp_path):
    adapted = load_encoder(f"tiny+{adapter}", "cpu", "fp32")
    assert adapted.id == read_artifact_metadata(adapter, "adapter")["model_id"] != tiny.id
    bad = tampered_copy(adapter, tmp_path / "tampered.safetensors")
    with pytest.raises(ClipxferError, match="tensors do not match its model id"):
        load_encoder(f"tiny+{bad}", "cpu", "fp32")
    result = CliRunner().invoke(main, ["predict", str(bad), str(tmp_path), "--model", f"tiny+{bad}"])
    assert result.exit_code == 2 and "do not match" in result.output and result.output.count("\n") == 1, result.output


def test_a_file_that_is_not_an_adapter_says_what_it_is(folder, tiny, tmp_path):
    detector = write_artifact(tmp_path / "det.safetensors", {"memory_bank": np.zeros((2, 4), np.float32)},
                              {"format": "clipxfer-anomaly/1", "model_id": tiny.id, "config": {}}, "detector")
    probe = write_artifact(tmp_path / "probe.safetensors", {"bias": np.zeros(3, np.float32)},
                           {"format": HEAD_FORMAT, "method": "probe", "model_id": tiny.id, "config": {}}, "head")
    cases = [(detector, "an anomaly detector", "anomaly score"), (probe, "a clipxfer probe head", "predict")]
    for path, what, use in cases:
        result = CliRunner().invoke(main, ["probe", str(folder), "--shots", "1", "--model", f"tiny+{path}"])
        assert result.exit_code == 2 and what in result.output and use in result.output, result.output
        assert "None" not in result.output and result.output.count("\n") == 1


@pytest.mark.parametrize("option,value", [("--l2sp", "nan"), ("--l2sp", "inf"), ("--l2sp", "-1"), ("--lr", "inf"),
                                          ("--lr", "nan"), ("--blocks", "0")])
def test_bad_numbers_are_refused_before_any_work(folder, tmp_path, monkeypatch, option, value):
    import clipxfer.fewshot.inputs as inputs

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded data or a model before checking the options")

    monkeypatch.setattr(inputs.TrainingInputs, "load", no_loading)
    out = tmp_path / "a.safetensors"
    result = CliRunner().invoke(main, ["finetune", str(folder), "--shots", "2", "--model", "tiny", option, value,
                                       "--out", str(out)])
    assert result.exit_code == 2 and f"{option} {value}" in result.output, result.output
    assert result.output.count("\n") == 1 and not out.exists()


def test_other_settings_are_checked_too():
    from clipxfer.finetune.settings import make_settings

    for options in [{"crop_scale": 0.0}, {"label_smoothing": 1.5}, {"batch_size": 0}, {"lora_alpha": float("inf")},
                    {"weight_decay": -1.0}, {"head_lr_scale": float("nan")}, {"patience": 0}, {"epochs": 1.5}]:
        with pytest.raises(ClipxferError, match=next(iter(options))):
            make_settings(**options)


def test_a_nan_loss_stops_with_one_line_and_saves_nothing(folder, tiny, tmp_path, monkeypatch):
    import clipxfer.finetune.train as train

    real = train.forward_logits
    monkeypatch.setattr(train, "forward_logits", lambda *args: real(*args) * torch.tensor(float("nan")))
    out = tmp_path / "a.safetensors"
    with pytest.raises(ClipxferError, match="training loss became nan in epoch 1.*nothing was saved"):
        run_finetune(folder, 2, 1, encoder=tiny, out=out, epochs=3, lr=1e-2)
    assert not out.exists()


def test_ctrl_c_says_a_rerun_starts_over(folder, tmp_path, monkeypatch):
    import clipxfer.finetune.train as train

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "augment_batch", interrupt)
    out = tmp_path / "a.safetensors"
    result = CliRunner().invoke(main, ["finetune", str(folder), "--shots", "2", "--model", "tiny", "--device", "cpu",
                                       "--precision", "fp32", "--epochs", "3", "--out", str(out), "--json"])
    assert result.exit_code == 130, result.output
    assert "starts training over" in result.stderr and "resume" not in result.stderr
    assert read_artifact_metadata(out, "adapter")["config"]["interrupted"] is True
