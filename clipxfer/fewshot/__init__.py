"""Few-shot transfer end to end: draw K shots per class, fit a head, score it against zero-shot on
the held-out test set, save it (``clipxfer probe|tip|coop|mix|lpp|clap``); apply a saved head
(``clipxfer predict``); adapt with unlabelled target images (``clipxfer adapt``)."""

from .multilabel import run_multilabel, run_multilabel_mosaics
from .predict import predict, predict_label_sets, predict_sets
from .run import run_transfer
from .unlabelled import run_adapt

__all__ = ["predict", "predict_label_sets", "predict_sets", "run_adapt", "run_multilabel", "run_multilabel_mosaics",
           "run_transfer"]
