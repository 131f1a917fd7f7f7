"""Encoders: one protocol (:class:`Encoder`), several backends, one name resolver."""

from .base import Encoder, ImageEncoding, PatchFeatures, l2_normalize
from .ids import DEFAULT_MODEL
from .registry import cached_encoder, load_encoder

__all__ = ["Encoder", "ImageEncoding", "PatchFeatures", "l2_normalize", "load_encoder", "cached_encoder", "DEFAULT_MODEL"]
