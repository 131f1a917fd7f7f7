"""Zero-shot classification of a folder or an index (``clipxfer classify``), with prompt ensembles,
descriptions, TransCLIP and conformal prediction sets."""

from .run import Classification, classify_folder, classify_index

__all__ = ["Classification", "classify_folder", "classify_index"]
