"""The ``clipxfer`` command line: a thin layer over the Python API.

:mod:`.group` defines the command group; each module below registers its commands on it and holds
option parsing and output formatting only.
"""

from __future__ import annotations

import importlib

from .group import PANELS, main

# One module per group of commands; adding commands is adding a module here.
COMMAND_MODULES = [
    "models",
    "index",
    "embed",
    "classify",
    "bench",
    "fewshot",
    "fit",
    "adapt",
    "metalearn",
    "episodes",
    "serve",
    "finetune",
    "anomaly",
    "deploy",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["PANELS", "main"]
