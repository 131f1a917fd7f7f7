"""Labelled data, plain in and plain out: labelled image sets (:mod:`.labelled`), few-shot draws and
their manifests (:mod:`.splits`), the on-disk feature cache (:mod:`.features`) and prompts
(:mod:`.prompts`).

Names are imported lazily, so ``clipxfer prompts`` (:mod:`.prompts`) does not pay for pandas.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "LabelledImages": "clipxfer.datasets.labelled",
    "load_dataset": "clipxfer.datasets.labelled",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipxfer.datasets' has no attribute {name!r}")
