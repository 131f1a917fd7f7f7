"""Index a folder of images and search it: SQLite metadata and vectors, FAISS for search.

``from clipxfer.index import Index``; see :mod:`clipxfer.index.layout` for the on-disk layout
and why a crash at any moment leaves a loadable index.
"""

from .index import Index
from .layout import resolve_index_path
from .results import DuplicatePair, Hit, UpdateReport

__all__ = ["Index", "Hit", "DuplicatePair", "UpdateReport", "resolve_index_path"]
