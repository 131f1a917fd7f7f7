"""The files around the code that users and CI rely on: licence, Makefile, the results page."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    license_text = (ROOT / "LICENSE").read_text()
    assert declared == "MIT"
    assert license_text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in license_text


def test_apt_waits_for_a_busy_lock():
    """Another apt run holding the lock must not make `make test` give up on chromium."""
    for path in ("Makefile", ".ci/run"):
        for line in (ROOT / path).read_text().splitlines():
            if re.search(r"apt-get\s.*\b(update|install)\b", line):
                assert "DPkg::Lock::Timeout=" in line, f"{path}: {line.strip()}"


def test_results_page_speaks_of_the_project_only():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text().lower()
    for word in ("helper", "supersede", "issue "):
        assert word not in text, f"benchmarks/RESULTS.md mentions {word!r}"
