"""The ``clipxfer`` command group, its panels in ``--help`` and its version option; every command
module registers its commands on :data:`main`."""

from __future__ import annotations

import rich_click as click

from .. import __version__
from .common import ErrorReportingGroup

#: The help screen groups commands by job; every command belongs to exactly one panel (tested).
PANELS = {
    "Index & search": ["index", "search", "info", "dups", "embed", "export-embeddings", "sample-photos"],
    "Classify": ["classify", "predict", "prompts", "models"],
    "Adapt": ["fit", "probe", "mosaics", "tip", "coop", "mix", "lpp", "clap", "finetune", "adapt", "meta-train"],
    "Inspect": ["anomaly"],
    "Deploy": ["export", "watch"],
    "Benchmark": ["bench", "bench-episodes"],
    "Serve": ["serve", "suggest"],
}


def _with_panels(group):
    for name, commands in reversed(PANELS.items()):
        group = click.command_panel(name, commands=commands)(group)
    return group


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clipxfer")
@_with_panels
def main():
    """CLIP transfer toolkit: index and search images, zero-shot and few-shot classification,
    fine-tuning, defect detection and benchmarks. Every command's help ends with an example."""
