"""Zero-shot classification of a folder or an index (``clipxfer classify``), with prompt ensembles,
descriptions, TransCLIP and conformal prediction sets."""

from .multilabel import MultiLabelClassification, as_multilabel
from .run import Classification, classify_folder, classify_index

__all__ = ["Classification", "MultiLabelClassification", "as_multilabel", "classify_folder", "classify_index"]
