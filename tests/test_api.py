"""The public API: every name clipxfer re-exports resolves, and the CLI answers --version."""

from __future__ import annotations

from click.testing import CliRunner

import clipxfer
from clipxfer.cli import main


def test_every_exported_name_resolves():
    for name in clipxfer.__all__:
        assert getattr(clipxfer, name) is not None, name


def test_version_and_models_json():
    runner = CliRunner()
    assert clipxfer.__version__ in runner.invoke(main, ["--version"]).output
    result = runner.invoke(main, ["models", "--json"])
    assert result.exit_code == 0
    assert '"default": "ViT-B-32:laion2b_s34b_b79k"' in result.output
