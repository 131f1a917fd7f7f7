"""``clipxfer export``: heads and detectors as torch-free bundles (see :mod:`clipxfer.runtime`)."""

from .build import ExportSettings, export_artifact

__all__ = ["ExportSettings", "export_artifact"]
