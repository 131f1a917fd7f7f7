"""Encoders: one protocol (:class:`Encoder`), several backends, one name resolver.

Names are imported lazily, so the torch-free modules of this package (:mod:`.ids`: model ids and specs)
can be imported without loading torch or open_clip.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "Encoder": "clipxfer.encoders.base",
    "ImageEncoding": "clipxfer.encoders.base",
    "PatchFeatures": "clipxfer.encoders.base",
    "l2_normalize": "clipxfer.vector_math",
    "load_encoder": "clipxfer.encoders.registry",
    "cached_encoder": "clipxfer.encoders.registry",
    "DEFAULT_MODEL": "clipxfer.encoders.ids",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipxfer.encoders' has no attribute {name!r}")
