"""``clipxfer fit``: one command that fits a named method or, with ``auto``, chooses the method by
cross-validation on the labelled shots and refits it on all of them."""

from .candidates import CANDIDATES, DEFAULT_CANDIDATES, ENSEMBLE
from .run import FIT_METHODS, run_fit
from .select import AutoResult, fit_auto

__all__ = ["AutoResult", "CANDIDATES", "DEFAULT_CANDIDATES", "ENSEMBLE", "FIT_METHODS", "fit_auto", "run_fit"]
