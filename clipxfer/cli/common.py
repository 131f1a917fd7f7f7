"""Pieces every command shares: model options, JSON output, and turning errors into one line."""

from __future__ import annotations

import functools
import json
import math
import sys

import click
from rich_click import RichGroup

from ..errors import ClipxferError
from ..paths import path_text


def model_options(func):
    """``--model``, ``--device``, ``--runtime`` and ``--precision``, passed on as keyword arguments.

    The command receives ``model``, ``device`` and ``precision``; ``--runtime`` travels inside the
    precision string (``openvino:int8``, see :func:`clipxfer.device.split_compute`), so every API
    that takes a precision takes the runtime too.
    """

    command = func

    @functools.wraps(command)
    def with_runtime(*args, runtime: str = "auto", precision: str = "auto", **kwargs):
        from ..device import join_compute

        return command(*args, precision=join_compute(runtime, precision), **kwargs)

    func = with_runtime
    func = click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]),
        default="auto",
        show_default=True,
        help="auto = the fastest safe choice for this machine (CPU: OpenVINO int8 where VNNI/AMX exists); "
        "int8 needs OpenVINO; fp32 is the escape when int8 costs accuracy.",
    )(func)
    func = click.option(
        "--runtime",
        type=click.Choice(["auto", "torch", "openvino"]),
        default="auto",
        show_default=True,
        help="Image tower runtime; auto = OpenVINO on the CPU when installed (clipxfer[openvino]), torch on CUDA.",
    )(func)
    func = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(func)
    func = click.option(
        "--model",
        "model",
        default=None,
        metavar="SPEC",
        help="lite, tiny, MODEL:PRETRAINED (see 'clipxfer models'), MODEL:random, MODEL:/path/ckpt, hf-hub:ORG/NAME."
        " Add +ADAPTER.safetensors for a fine-tuned model (clipxfer finetune), e.g. lite+adapted.safetensors."
        " Default: ViT-B-32:laion2b_s34b_b79k, or lite when its weights are not available.",
    )(func)
    return func


def conformal_options(func):
    """``--conformal``, ``--calibrate``, ``--conformal-score`` and ``--reject`` (prediction sets)."""
    func = click.option(
        "--reject", is_flag=True,
        help="With --conformal: decide 'unknown' when an image's set holds more than one class "
        "(then at most ALPHA of the images get a wrong class).",
    )(func)
    func = click.option(
        "--conformal-score", "conformal_score", type=click.Choice(["aps", "raps", "lac"]), default="aps",
        show_default=True,
        help="Conformal score: APS; RAPS (penalises long tails); LAC (1 - probability: smallest sets on "
        "average, misses spread less evenly over classes).",
    )(func)
    func = click.option(
        "--calibrate", "calibrate", default=None, metavar="DATA",
        help="Labelled images (class folders or CSV manifest) to calibrate the sets on.",
    )(func)
    func = click.option(
        "--conformal", "conformal", type=float, default=None, metavar="ALPHA",
        help="Prediction sets that hold the true class with probability >= 1-ALPHA (split conformal).",
    )(func)
    return func


def force_option(func):
    """``--force``: overwrite an existing head, adapter or detector file (refused otherwise, before any work)."""
    return click.option("--force", is_flag=True,
                        help="Overwrite the output file if it exists (without it an existing file is refused).")(func)


def fail_fast_option(func):
    """``--fail-fast``: stop at the first unreadable image instead of skipping it (as ``index`` does)."""
    return click.option("--fail-fast", "fail_fast", is_flag=True,
                        help="Stop at the first unreadable image instead of skipping it and reporting it.")(func)


def report_skipped(skipped) -> None:
    """One line counting the unreadable images left out, then one per image with its reason (on stderr,
    so the results on stdout stay clean)."""
    if not skipped:
        return
    click.echo(f"skipped {len(skipped)} unreadable image(s) (--fail-fast stops at the first):", err=True)
    for failure in skipped:
        click.echo(f"skipped: {printable(failure.path)}: {printable(failure.reason)}", err=True)


def unit_or_auto(ctx, param, value):
    """click callback: ``auto``, or a number in [0, 1] (mixing weights such as --mix and --wise);
    an unset option without a default stays None."""
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter("a number between 0 and 1, or auto") from None
    if not 0.0 <= number <= 1.0:
        raise click.BadParameter("a number between 0 and 1, or auto")
    return number


def load_model(model: str | None, device: str, precision: str):
    """The encoder for the standard model options."""
    from ..encoders import load_encoder

    return load_encoder(model, device=device, precision=precision)


def json_safe(value):
    """``value`` with NaN and infinities as None and numpy scalars as Python numbers, so it
    serialises as strict JSON (a bare ``NaN`` is not JSON and breaks other parsers)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit_csv(rows: list[dict]) -> None:
    """Print ``rows`` (dicts with the same keys) as CSV on stdout, a header first; cells a
    spreadsheet would run as formulas are written inert (:func:`~clipxfer.csvcells.safe_cell`)."""
    import csv

    from ..csvcells import safe_cell

    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({key: safe_cell(value) if isinstance(value, str) else value for key, value in row.items()}
                     for row in rows)  # fmt: skip


def emit_json(value) -> None:
    """Print ``value`` as indented, strict JSON on stdout (NaN and infinities become null)."""
    click.echo(json.dumps(json_safe(value), indent=2, default=str, allow_nan=False))


def printable(value) -> str:
    """``value`` (a path or message) as one safe line of text: bytes that are not UTF-8 (file
    names may hold any) as ``\\xff``, control characters such as newlines as ``\\n``."""
    text = path_text(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ErrorReportingGroup(RichGroup):
    """A click group that prints :class:`ClipxferError` as ``error: ...`` and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClipxferError as exc:
            for line in getattr(exc, "lines", None) or [exc]:  # several mistakes: one line each
                click.echo(f"error: {printable(line)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            # Every command commits or writes atomically, so what finished is already safe; only some commands
            # keep partial progress (index, embed, bench skip what is done), the others start over.
            click.echo("\ninterrupted: finished work is kept; running the same command again skips what index, "
                       "embed and bench finished, other commands start over", err=True)
            sys.exit(130)


