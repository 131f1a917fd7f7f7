"""Cold start: commands that need no model import none of the heavy packages, and a cached text
query is answered from the index and the text cache alone (checked on sys.modules in a fresh
process, as a user's command starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipxfer.index import Index

from .test_index import write_images

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "faiss", "openvino")

# Runs the CLI in this process, then reports on stdout which heavy packages it imported.
PROBE = textwrap.dedent(
    """
    import json, sys
    from clipxfer.cli import main
    try:
        main.main(sys.argv[1:], standalone_mode=False)
    except SystemExit:
        pass
    heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)
    print("HEAVY=" + json.dumps(heavy))
    """
).format(HEAVY=HEAVY)


def run_probe(*args: str, cache: Path | None = None) -> tuple[str, list[str]]:
    """The command's output and the heavy packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache is not None:
        env["CLIPXFER_CACHE"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    output, _, report = done.stdout.rpartition("HEAVY=")
    return output, json.loads(report)


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("cold")
    write_images(folder / "photos", 4)
    Index.update(folder / "photos", tiny, path=folder / "index", workers=0)
    return folder / "index"


@pytest.mark.parametrize("args", [["--help"], ["models"], ["models", "--json"], ["prompts"], ["prompts", "industrial"]])
def test_commands_without_a_model_import_no_heavy_package(args):
    output, heavy = run_probe(*args)
    assert output.strip()
    assert heavy == []


def test_info_imports_no_heavy_package(tiny_index):
    output, heavy = run_probe("info", "--index", str(tiny_index), "--json")
    assert json.loads(output)["faiss"] == "Flat"
    assert heavy == []


def test_models_lists_open_clips_own_table():
    import open_clip

    output, _ = run_probe("models", "--json")
    listed = [(pair["model"], pair["pretrained"]) for pair in json.loads(output)["open_clip"]]
    assert listed == open_clip.list_pretrained()


def test_a_cached_search_loads_no_model(tiny_index, tmp_path):
    first, heavy = run_probe("search", "a red square", "--index", str(tiny_index), "--json", cache=tmp_path)
    assert "torch" in heavy  # the first time the text tower embeds the query
    again, heavy = run_probe("search", "a red square", "--index", str(tiny_index), "--json", cache=tmp_path)
    assert json.loads(again) == json.loads(first)
    assert "torch" not in heavy and "open_clip" not in heavy


def test_text_only_lite_embeds_texts_as_the_full_encoder_and_refuses_images(lite):
    from clipxfer.encoders.registry import load_text_encoder
    from clipxfer.errors import ClipxferError

    text_only = load_text_encoder("lite", "cpu", "fp32")
    assert text_only.image_model is None and text_only.id == lite.id
    texts = ["a cat on a sofa", "an x-ray of a hand"]
    np.testing.assert_allclose(text_only.encode_texts(texts), lite.encode_texts(texts), atol=1e-5)
    with pytest.raises(ClipxferError, match="text queries only"):
        text_only.encode_images([np.zeros((32, 32, 3), np.uint8)])
