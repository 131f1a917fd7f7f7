"""The filter options shared by ``search``, ``classify --index`` and the API: path glob, modification
time, image size (see :mod:`clipxfer.index.filters`)."""

from __future__ import annotations

import functools

import click


def filter_options(func):
    """``--path``, ``--modified-after``, ``--modified-before``, ``--min-width``, ``--min-height``,
    passed to the command as one ``filters`` keyword (a checked :class:`~clipxfer.index.filters.Filters`)."""

    @functools.wraps(func)
    def with_filters(*args, path_glob, modified_after, modified_before, min_width, min_height, **kwargs):
        from ..index.filters import Filters

        filters = Filters.from_options(path_glob, modified_after, modified_before, min_width, min_height)
        return func(*args, filters=filters, **kwargs)

    options = [
        click.option("--path", "path_glob", metavar="GLOB",
                     help="Only files whose path (relative to the indexed folder, or absolute) matches, e.g. 'trips/*.jpg'."),
        click.option("--modified-after", metavar="DATE", help="Only files modified after DATE (YYYY-MM-DD[THH:MM])."),
        click.option("--modified-before", metavar="DATE", help="Only files modified before DATE."),
        click.option("--min-width", type=int, metavar="PX", help="Only images at least PX pixels wide."),
        click.option("--min-height", type=int, metavar="PX", help="Only images at least PX pixels high."),
    ]
    for option in reversed(options):
        with_filters = option(with_filters)
    return with_filters
