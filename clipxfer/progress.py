"""Progress bars: one on stderr (items, items/s, ETA) while a terminal watches, none otherwise.

Piped or logged output (CI, ``nohup``, ``2> log``) gets no bar: a bar redraws with carriage
returns, which fill a log with hundreds of half lines. ``--quiet`` turns bars off on a terminal too.
"""

from __future__ import annotations

import sys


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr counting ``unit`` s up to ``total`` (None: unknown, no ETA), shown only
    when ``enabled`` and stderr is a terminal. Use it as a context manager and call ``update(n)``."""
    from tqdm import tqdm

    # tqdm's disable=None means: disabled unless the file is a terminal.
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True, smoothing=0.1)
