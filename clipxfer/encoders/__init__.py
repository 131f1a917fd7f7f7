"""Encoders: one protocol (:class:`Encoder`), several backends, one name resolver."""

from .base import Encoder, ImageEncoding, PatchFeatures, l2_normalize
from .registry import DEFAULT_MODEL, cached_encoder, load_encoder

__all__ = ["Encoder", "ImageEncoding", "PatchFeatures", "l2_normalize", "load_encoder", "cached_encoder", "DEFAULT_MODEL"]
