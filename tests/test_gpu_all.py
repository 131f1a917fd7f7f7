"""benchmarks/gpu_all.sh runs end to end: its --dry-run (tiny sizes, CPU) goes through every step
and writes the one JSON, so the script is ready when a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_all_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "gpu_all.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    expected = {"encode_device_decode", "encode_pil_decode", "finetune_data", "finetune_lora", "embed_ray"}
    assert expected <= set(report["steps"]) and {"search_cpu", "search_gpu"} & set(report["steps"])
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    headline = report["headline"]
    assert headline["encode_device_decode"]["images_per_s"] > 0 and headline["encode_pil_decode"]["device_decode"] is False
    assert headline["finetune_lora"]["num_classes"] == 3 and headline["finetune_lora"]["fit_seconds"] > 0
    assert headline.get("embed_ray", {}).get("embedded") == 16, report["steps"]["embed_ray"]


def test_gpu_all_refuses_an_unknown_argument():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--gpus", "2"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument --gpus" in done.stderr


def test_the_report_reads_a_steps_json_among_other_lines():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_all_report import json_document
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    printed = '(raylet) a warning\n{\n  "embedded": 16,\n  "failed": []\n}\nanother line\n'
    assert json_document(printed) == {"embedded": 16, "failed": []}
    with pytest.raises(ValueError):
        json_document("no JSON here\n")
