"""The app's JSON responses: file names that are not UTF-8 shown, not a 500.

Linux allows any bytes in a file name; Python holds the ones that are not UTF-8 as surrogate
escapes (``os.fsdecode``), which JSON's UTF-8 cannot encode. Every JSON answer goes through
:class:`SafeJSONResponse`, so any route that returns a path (search hits, items, suggestions, index
info, error details) shows such a name as ``caf\\xe9.jpg`` (:func:`clipxfer.paths.path_text`).
Items are addressed by id, so the display form never has to be turned back into a path.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from ..paths import path_text


def displayable(value: Any) -> Any:
    """``value`` with every string that holds surrogate escapes replaced by its display form."""
    if isinstance(value, str):
        return path_text(value)
    if isinstance(value, dict):
        return {displayable(key): displayable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [displayable(item) for item in value]
    return value


class SafeJSONResponse(JSONResponse):
    """A JSONResponse whose strings need not be valid Unicode."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:  # rare: only then is the content walked
            return super().render(displayable(content))
