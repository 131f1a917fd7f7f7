"""Progress and quiet: ``embed`` and ``index --from-embeddings`` draw a bar (count, rate, ETA) on a
terminal's stderr, none with --quiet or when stderr is not a terminal; ``embed --engine ray`` prints
no INFO or error-level line of Ray's on a successful run."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from .test_index import write_images

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 6


def run_cli(args, terminal: bool, timeout: float = 300) -> tuple[int, str, str]:
    """Run ``clipxfer ARGS`` in a fresh process; stderr is a pseudo-terminal when ``terminal``.
    Returns (exit status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "clipxfer", *map(str, args)]
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, where tqdm draws an empty bar: make it 120 wide.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=timeout), stdout, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress") / "photos"
    write_images(folder, IMAGES)
    return folder


def embed_args(photos, out, *extra):
    return ["embed", photos, "--out", out, "--model", "tiny", "--workers", "0", *extra]


def test_embed_draws_a_bar_with_rate_and_eta_on_a_terminal(photos, tmp_path):
    status, stdout, stderr = run_cli(embed_args(photos, tmp_path / "emb"), terminal=True)
    assert status == 0, stderr
    assert f"{IMAGES} embedded" in stdout
    assert re.search(rf"embedding: +100%.*{IMAGES}/{IMAGES} \[[0-9:]+<[0-9:]+, +[0-9.]+(img/s|s/img)\]", stderr), stderr


def test_embed_has_no_bar_with_quiet_or_off_a_terminal(photos, tmp_path):
    status, _, stderr = run_cli(embed_args(photos, tmp_path / "a", "--quiet"), terminal=True)
    assert status == 0 and "embedding:" not in stderr
    status, _, stderr = run_cli(embed_args(photos, tmp_path / "b"), terminal=False)
    assert status == 0 and "embedding:" not in stderr


def test_index_from_embeddings_draws_a_bar_on_a_terminal_only(photos, tmp_path):
    assert run_cli(embed_args(photos, tmp_path / "emb", "--quiet"), terminal=False)[0] == 0
    status, stdout, stderr = run_cli(
        ["index", "--from-embeddings", tmp_path / "emb", "--index", tmp_path / "a"], terminal=True
    )
    assert status == 0 and f"{IMAGES} added" in stdout, stderr
    assert re.search(rf"ingesting: +100%.*{IMAGES}/{IMAGES} \[.*(vec/s|s/vec)\]", stderr), stderr
    status, _, stderr = run_cli(["index", "--from-embeddings", tmp_path / "emb", "--index", tmp_path / "b"], False)
    assert status == 0 and "ingesting:" not in stderr


@pytest.mark.slow
def test_a_successful_ray_embed_prints_no_info_or_error_line_of_rays(photos, tmp_path):
    pytest.importorskip("ray.data")
    status, stdout, stderr = run_cli(embed_args(photos, tmp_path / "emb", "--engine", "ray"), terminal=False, timeout=600)
    assert status == 0, stderr
    assert f"{IMAGES} embedded" in stdout
    # Ray's Python lines read '... INFO file.py:N -- ...'; its C++ lines '[date E pid tid] file.cc:N: ...'.
    noisy = [line for line in stderr.splitlines() if re.search(r"\b(INFO|ERROR)\b|^\[[^\]]* [EF] \d+ \d+\]", line)]
    assert noisy == []
