"""``clipxfer adapt``: transductive adaptation to unlabelled target images (optionally with a few
labelled shots). Prints zero-shot and adapted accuracy on DATA's test split; ``--json`` prints
the object of :func:`clipxfer.fewshot.unlabelled.run_adapt` (``method, shots, seed, accuracy,
zeroshot_accuracy, fit_seconds, num_unlabelled, iterations, converged, prior_weight, kappa, ...``)."""

from __future__ import annotations

import click

from .common import emit_json, force_option, model_options
from .group import main


@main.command()
@click.argument("data")
@click.option("--unlabelled", type=click.Path(), default=None, help="Folder of unlabelled target images.")
@click.option("--index", "index_path", type=click.Path(), default=None,
              help="Take the unlabelled target images from this index (every row) instead of a folder.")
@click.option("--shots", "-k", type=int, default=0, show_default=True,
              help="Labelled images per class drawn from DATA's training pool (0: no labels at all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the K-shot draw.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Head file to write (default transductive-DATA-Kshot-seedS.safetensors here).")
@force_option
@click.option("--templates", default="simple", show_default=True, help="Prompt template set for the zero-shot prior.")
@click.option("--prior-weight", type=float, default=None,
              help="Weight of the zero-shot prior (default 1, or chosen on validation with shots).")
@click.option("--kappa", type=float, default=None,
              help="Prototype concentration (default 10, or chosen on validation with shots).")
@click.option("--max-test", type=int, default=None, help="Score on at most this many test images.")
@click.option("--no-save", is_flag=True, help="Score only; write no head or manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@model_options
def adapt(data, unlabelled, index_path, shots, seed, out, force, templates, prior_weight, kappa, max_test, no_save,
          as_json, model, device, precision):
    """Adapt the zero-shot head of DATA's classes to unlabelled target images (EM over prototypes).

    Example: clipxfer adapt fashion-mnist --unlabelled target_photos/ --model lite --out target-head.safetensors
    """
    from ..fewshot.unlabelled import run_adapt

    options = {k: v for k, v in (("prior_weight", prior_weight), ("kappa", kappa)) if v is not None}
    result = run_adapt(
        data, unlabelled, index_path, shots, seed, model=model, out=out, templates=templates, max_test=max_test,
        device=device, precision=precision, save=not no_save, progress=not as_json, force=force, **options,
    )
    if as_json:
        emit_json(result)
        return
    click.echo(f"transductive: {result['shots']} shots/class, seed {result['seed']}, {result['num_classes']} classes, "
               f"{result['num_unlabelled']} unlabelled images, {result['num_test']} test images ({result['model']})")
    click.echo(f"  zero-shot accuracy     {result['zeroshot_accuracy']:.4f}")
    click.echo(f"  adapted   accuracy     {result['accuracy']:.4f}  "
               f"({result['accuracy'] - result['zeroshot_accuracy']:+.4f}; EM {result['iterations']} iterations"
               f"{'' if result['converged'] else ' (not converged)'}, fit {result['fit_seconds']:.1f} s)")
    if result["head"]:
        click.echo(f"  head: {result['head']}\n  manifest: {result['manifest']}")
