"""Pieces every command shares: model options, JSON output, and turning errors into one line."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..errors import ClipxferError
from ..paths import path_text


def model_options(func):
    """``--model``, ``--device`` and ``--precision``, passed on as keyword arguments."""
    func = click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
        default="auto",
        show_default=True,
        help="Weight precision; auto = bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32.",
    )(func)
    func = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(func)
    func = click.option(
        "--model",
        "model",
        default=None,
        metavar="SPEC",
        help="lite, tiny, MODEL:PRETRAINED (see 'clipxfer models'), MODEL:random, MODEL:/path/ckpt, hf-hub:ORG/NAME."
        " Default: ViT-B-32:laion2b_s34b_b79k, or lite when its weights are not available.",
    )(func)
    return func


def load_model(model: str | None, device: str, precision: str):
    """The encoder for the standard model options."""
    from ..encoders import load_encoder

    return load_encoder(model, device=device, precision=precision)


def emit_json(value) -> None:
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, default=str))


def printable(value) -> str:
    """``value`` (a path or message) as one safe line of text: bytes that are not UTF-8 (file
    names may hold any) as ``\\xff``, control characters such as newlines as ``\\n``."""
    text = path_text(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ErrorReportingGroup(click.Group):
    """A click group that prints :class:`ClipxferError` as ``error: ...`` and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClipxferError as exc:
            click.echo(f"error: {printable(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            # Every command commits or writes atomically, so what finished is already safe.
            click.echo("\ninterrupted: finished work is kept; run the same command again to resume", err=True)
            sys.exit(130)


def reports_errors(func):
    """Decorator form of :class:`ErrorReportingGroup` for code called outside click."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ClipxferError as exc:
            click.echo(f"error: {printable(exc)}", err=True)
            sys.exit(2)

    return wrapper
