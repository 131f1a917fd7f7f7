"""Ctrl-C during `clipxfer index`: one clear line, exit 130, finished batches kept, re-run resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from .test_index import stored_paths, update, wait_until_committed, write_images

CLI_SCRIPT = """
import sys, time
from clipxfer.encoders import registry
from clipxfer.encoders.base import Encoder

original = Encoder.encode_pixels

def slow(self, pixels):  # slow enough to be interrupted in the middle
    time.sleep(0.15)
    return original(self, pixels)

Encoder.encode_pixels = slow
from clipxfer.cli import main
main(["index", sys.argv[1], "--index", sys.argv[2], "--model", "tiny", "--batch-size", "4", "--workers", "2"])
"""


def test_ctrl_c_keeps_finished_batches_and_resumes(tmp_path, tiny):
    root, index_path = tmp_path / "photos", tmp_path / "index"
    paths = write_images(root, 60)
    script = tmp_path / "run_cli.py"
    script.write_text(textwrap.dedent(CLI_SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(index_path)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    wait_until_committed(proc, index_path, rows=8)
    assert proc.poll() is None, "indexing finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: finished work is kept")
    kept = len(stored_paths(index_path))
    assert 8 <= kept < 60
    report = update(root, index_path, tiny)
    assert report.added == 60 - kept and report.unchanged == kept
    assert stored_paths(index_path) == sorted(p.name for p in paths)
