"""CSV cells that spreadsheets show as text, never run as formulas (CSV injection).

A cell starting with ``= + - @``, a tab or a carriage return is read by Excel, LibreOffice and
Sheets as a formula (``=HYPERLINK(...)``). As OWASP recommends, such a cell is written with a
leading ``'``, which spreadsheets hide and read as "this is text". A cell that already starts with
``'`` gets one more, so :func:`cell_text` undoes :func:`safe_cell` exactly for every string.
"""

from __future__ import annotations

#: First characters a spreadsheet reads as the start of a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def safe_cell(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text (see the module docstring)."""
    text = str(text)
    if text.startswith(FORMULA_STARTS + (QUOTE,)):
        return QUOTE + text
    return text


def cell_text(cell: str) -> str:
    """The text :func:`safe_cell` wrote as ``cell``; a hand-written cell without the mark is
    returned as it is."""
    cell = str(cell)
    if cell.startswith(QUOTE) and cell[1:].startswith(FORMULA_STARTS + (QUOTE,)):
        return cell[1:]
    return cell
