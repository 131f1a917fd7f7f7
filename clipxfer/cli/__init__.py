"""The ``clipxfer`` command line: a thin layer over the Python API.

Each module below registers its commands on :data:`main`; the modules hold option parsing and
output formatting only.
"""

from __future__ import annotations

import importlib

import click

from .. import __version__
from .common import ErrorReportingGroup


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clipxfer")
def main():
    """CLIP transfer toolkit: index and search images, zero-shot and few-shot classification."""


# One module per group of commands; adding commands is adding a module here.
COMMAND_MODULES = [
    "models",
    "index",
    "classify",
    "bench",
    "transfer",
    "adapt",
    "meta",
    "episodes",
    "anomaly",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
