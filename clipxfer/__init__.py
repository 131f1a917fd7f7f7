"""clipxfer: make CLIP useful on your own images.

The public Python API; the ``clipxfer`` command line is a thin layer over it. Names are
imported lazily so ``clipxfer --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ClipxferError": "clipxfer.errors",
    "run_transfer": "clipxfer.fewshot",
    "predict": "clipxfer.fewshot",
    "load_encoder": "clipxfer.encoders",
    "Encoder": "clipxfer.encoders",
    "available_models": "clipxfer.encoders.registry",
    "LabelledImages": "clipxfer.datasets",
    "load_dataset": "clipxfer.datasets",
    "classify_folder": "clipxfer.classify",
    "classify_index": "clipxfer.classify",
    "fit_zeroshot": "clipxfer.heads.zeroshot",
    "load_templates": "clipxfer.datasets.prompts",
    "classification_report": "clipxfer.metrics",
    "Index": "clipxfer.index",
    "load_head": "clipxfer.heads",
    "run_adapt": "clipxfer.fewshot",
    "meta_train": "clipxfer.metalearn",
    "run_bench": "clipxfer.bench",
    "run_episodes": "clipxfer.bench.episodes",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipxfer' has no attribute {name!r}")
