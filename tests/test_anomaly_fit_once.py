"""`anomaly fit` builds each memory bank once: the detector validation chose is the one saved."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import clipxfer.anomaly.detector as detector_module
from clipxfer.anomaly import build_texture_set
from clipxfer.cli import main


@pytest.fixture(scope="module")
def gravel(tmp_path_factory):
    return build_texture_set(tmp_path_factory.mktemp("zoo"), textures=("gravel",), train_good=36, test_good=2,
                             per_local=1, per_global=1, seed=4) / "gravel"  # fmt: skip


# members chosen at one resolution; named members at two resolutions (auto)
@pytest.mark.parametrize("options, banks", [(["--resolution", "32"], 1),
                                            (["--members", "patchcore,gaussian", "--resolution", "auto"], 2)])
def test_cli_fit_builds_one_bank_per_candidate_resolution(tiny, gravel, tmp_path, monkeypatch, options, banks):
    calls = []
    real = detector_module.fit_patchcore

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(detector_module, "fit_patchcore", counting)
    out = tmp_path / "det.safetensors"
    result = CliRunner().invoke(main, ["anomaly", "fit", str(gravel / "train" / "good"), "--shots", "4",
                                       "--false-alarm-rate", "0.2", *options, "--out", str(out), "--model", "tiny",
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert config["selection"]["members"] == config["members"]
    if "--members" in options:
        assert config["members"] == ["patchcore", "gaussian"]
    # one bank per resolution validation tried (before the fix, the chosen one was built a second time)
    assert len(calls) == banks
    assert config["map_size"] == config["selection"]["resolution"]
    assert config["bank_size"] > 0 and config["calibration_size"] == 36 - 4 - config["selection"]["validation_size"]
