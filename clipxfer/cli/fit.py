"""``clipxfer fit``: the one training command a new user runs; ``--method auto`` chooses the method
by cross-validation on the shots (:func:`clipxfer.autofit.run_fit`)."""

from __future__ import annotations

import click

from .common import emit_json, force_option, model_options
from .group import main

METHOD_NAMES = ["auto", "probe", "probe-zsprior", "lpp", "clap", "tip", "tipf", "mix", "coop", "finetune"]


@main.command()
@click.argument("data")
@click.option("--shots", "-k", type=int, required=True, help="Training images per class (K).")
@click.option("--method", "-m", type=click.Choice(METHOD_NAMES), default="auto", show_default=True,
              help="The method, or auto: the one with the best cross-validated accuracy on the shots.")
@click.option("--candidates", default=None, metavar="A,B,...",
              help="What auto chooses among (default: every method and the ensemble of the feature-level ones).")
@click.option("--folds", type=int, default=5, show_default=True,
              help="Cross-validation folds for auto (fewer when a class has fewer labelled images: "
                   "leave-one-out per class).")
@click.option("--budget", default=None, metavar="TIME",
              help="Wall time for auto, e.g. 10m or 90s: candidates that cannot finish in it are skipped.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the K-shot draw and the folds.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Head file to write; the drawn manifest goes next to it (.manifest.csv). "
                   "Default: METHOD-DATA-Kshot-seedS.safetensors here.")
@force_option
@click.option("--templates", default="simple", show_default=True,
              help="Prompt template set for the zero-shot head (name or text file).")
@click.option("--max-test", type=int, default=None, help="Score on at most this many test images.")
@click.option("--classes", default=None, metavar="A,B,C|FILE",
              help="The classes, in order (comma-separated or a file). Default: the labels found in DATA.")
@click.option("--transductive", is_flag=True, help="Wrap the chosen head in TransCLIP (not fine-tuned heads).")
@click.option("--no-save", is_flag=True, help="Score only; write no head or manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (with the candidates table) as JSON.")
@model_options
def fit(data, shots, method, candidates, folds, budget, seed, out, force, templates, max_test, classes, transductive,
        no_save, as_json, model, device, precision):
    """Fit a few-shot head on DATA with K shots per class; --method auto picks the method by
    cross-validation on the shots alone and refits it on all of them.

    Example: clipxfer fit fashion-mnist --shots 16 --method auto --model lite --out head.safetensors
    """
    from ..autofit import run_fit
    from ..datasets.prompts import load_classnames

    result = run_fit(
        data, shots, method, seed, candidates=candidates, folds=folds, budget=budget, transductive=transductive,
        model=model, out=out, templates=templates, max_test=max_test, device=device, precision=precision,
        save=not no_save, progress=not as_json, classes=load_classnames(classes) if classes else None,
        force=force,
    )
    if as_json:
        emit_json(result)
        return
    if result["candidates"]:
        click.echo(f"cross-validation on the shots ({result['folds']} folds):")
        click.echo(f"  {'candidate':<14} {'cv acc':>7} {'spread':>7} {'seconds':>8}  status")
        for row in result["candidates"]:
            mark = "*" if row["candidate"] == result["chosen"] else " "
            acc = f"{row['cv_accuracy']:.3f}" if row["cv_accuracy"] is not None else "-"
            spread = f"{row['spread']:.3f}" if row["spread"] is not None else "-"
            note = f" ({row['detail']})" if row["detail"] else ""
            click.echo(f"{mark} {row['candidate']:<14} {acc:>7} {spread:>7} {row['seconds']:>8.1f}  {row['status']}{note}")
    click.echo(f"{result['variant']}: {result['shots']} shots/class, seed {result['seed']}, "
               f"{result['num_classes']} classes, {result['num_test']} test images ({result['model']})")
    click.echo(f"  zero-shot accuracy  {result['zeroshot_accuracy']:.4f}")
    click.echo(f"  {result['chosen']:<9} accuracy  {result['accuracy']:.4f}  "
               f"({result['accuracy'] - result['zeroshot_accuracy']:+.4f}; fit {result['fit_seconds']:.1f} s)")
    if result["head"]:
        click.echo(f"  head: {result['head']}\n  manifest: {result['manifest']}")
