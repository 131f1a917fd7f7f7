"""Transfer heads. Every module in this package defines one method behind the :class:`Head`
interface and registers it with :func:`register_head`; adding a method is adding a file."""

import importlib
import pkgutil

from .base import HEAD_TYPES, Head, load_head, read_head_metadata, register_head, softmax

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Head", "HEAD_TYPES", "load_head", "read_head_metadata", "register_head", "softmax"]
