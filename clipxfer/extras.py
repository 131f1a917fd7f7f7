"""Optional dependencies: the one way clipxfer imports a package that an extra installs."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ClipxferError


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or one line naming what needs it, the missing package and the extra:
    ``<purpose> needs the '<extra>' extra (<package> is missing): pip install 'clipxfer[<extra>]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or module).split(".")[0]  # the package to install, not its submodule
        raise ClipxferError(
            f"{purpose} needs the '{extra}' extra ({missing} is missing): pip install 'clipxfer[{extra}]'"
        ) from None
