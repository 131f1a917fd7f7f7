"""``clipxfer finetune``: fine-tune the encoder's image tower on K shots per class and write one
adapter file, usable by every command as ``--model BASE+ADAPTER.safetensors``. Prints zero-shot
and fine-tuned accuracy on the same test set; ``--json`` prints the object of
:func:`clipxfer.finetune.run_finetune`."""

from __future__ import annotations

import sys

import click

from .common import emit_json, force_option, model_options, unit_or_auto
from .group import main


@main.command()
@click.argument("data")
@click.option("--shots", "-k", type=int, required=True, help="Training images per class (K).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the K-shot draw and of training.")
@click.option("--method", type=click.Choice(["top", "lp-ft", "partial", "full", "lora"]), default="top", show_default=True,
              help="top: linear probe, then the last block and the layers after it on all labelled images, then the "
                   "head refitted; lp-ft: linear probe, then the whole tower; partial: the last --blocks blocks; full: "
                   "the whole tower from the zero-shot head; lora: rank-2 LoRA factors on the last --blocks blocks (peft).")
@click.option("--epochs", type=int, default=None, help="Passes over the training images (top: 10; the others: at "
              "most 12, early stopping on validation may end sooner).")
@click.option("--lr", type=float, default=None,
              help="Learning rate of the tower (the head's is 10x). Default: top 1e-3, the others 1e-4.")
@click.option("--blocks", type=int, default=None, help="Blocks that move with top, partial and lora (default: top 1, "
              "the others 2).")
@click.option("--l2sp", type=float, default=None,
              help="Pull of the moving weights toward the pretrained ones (L2-SP). Default: top 0, the others 0.01.")
@click.option("--no-augment", is_flag=True, help="No crop/flip/jitter (for tasks where they change the label).")
@click.option("--wise", default=None, callback=unit_or_auto,
              help="WiSE-FT: weight of the fine-tuned weights in [0, 1] (0 = the pretrained encoder), "
                   "or auto (chosen on validation; not with top, which trains on the validation images). "
                   "Default: top 1, the others auto.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Adapter file to write; the drawn manifest goes next to it. "
                   "Default: finetune-METHOD-DATA-Kshot-seedS.safetensors here.")
@force_option
@click.option("--templates", default="simple", show_default=True, help="Prompt template set for the zero-shot head.")
@click.option("--max-test", type=int, default=None, help="Score on at most this many test images.")
@click.option("--classes", default=None, metavar="A,B,C|FILE",
              help="The classes, in order (comma-separated or a file). Default: the labels found in DATA.")
@click.option("--no-save", is_flag=True, help="Score only; write no adapter or manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@model_options
def finetune(data, shots, seed, method, epochs, lr, blocks, l2sp, no_augment, wise, out, force, templates, max_test,
             classes, no_save, as_json, model, device, precision):
    """Fine-tune the encoder on DATA with K shots per class; write an adapter for --model BASE+ADAPTER.

    Ctrl-C saves the best epoch so far (marked interrupted); running the command again starts over.

    Example: clipxfer finetune fashion-mnist --model lite --shots 16 --out adapted.safetensors
    """
    from ..datasets.prompts import load_classnames
    from ..finetune.run import run_finetune

    try:
        result = run_finetune(
            data, shots, seed, model=model, out=out, templates=templates, max_test=max_test, device=device,
            precision=precision, save=not no_save, progress=not as_json, force=force,
            classes=load_classnames(classes) if classes else None,
            strategy=method, epochs=epochs, lr=lr, blocks=blocks, l2sp=l2sp, augment=not no_augment, wise=wise,
        )
    except KeyboardInterrupt:
        # Training state (optimiser, epoch) is not kept between runs: say so rather than the generic "resume".
        kept = ("nothing was saved (--no-save)" if no_save
                else "the best epoch so far is saved in the adapter (marked interrupted)")
        click.echo(f"\ninterrupted: {kept}; running the same command again starts training over from epoch 0", err=True)
        sys.exit(130)
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['variant']}: {result['shots']} shots/class, seed {result['seed']}, "
               f"{result['num_classes']} classes, {result['num_test']} test images ({result['base_model']})")
    click.echo(f"  zero-shot accuracy  {result['zeroshot_accuracy']:.4f}")
    click.echo(f"  finetune  accuracy  {result['accuracy']:.4f}  ({result['accuracy'] - result['zeroshot_accuracy']:+.4f}; "
               f"best epoch {result['best_epoch']} of {result['epochs_run']}, WiSE alpha {result['wise_alpha']:.2f}, "
               f"fit {result['fit_seconds']:.1f} s)")
    if result["adapter"]:
        click.echo(f"  adapter: {result['adapter']}\n  manifest: {result['manifest']}\n"
                   f"  use it: --model <base>+{result['adapter']}  (model id {result['model']})")
