"""Labelled data, plain in and plain out: labelled image sets (:mod:`.labelled`), few-shot draws and
their manifests (:mod:`.splits`), the on-disk feature cache (:mod:`.features`) and prompts
(:mod:`.prompts`)."""

from .labelled import LabelledImages, load_dataset

__all__ = ["LabelledImages", "load_dataset"]
