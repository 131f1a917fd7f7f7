"""``clipxfer meta-train``: episodic meta-learning (Reptile / first-order MAML) of a residual
feature adapter and CoOp context vectors on base classes; the head it writes initialises
``probe``/``tip``/``coop --init`` and ``bench --meta``. ``--json`` prints the summary of
:func:`clipxfer.metalearn.meta_train` (``method, algo, model, base_classes, ways, shots, episodes,
identity_val_accuracy, val_accuracy, best_episode, context, head``)."""

from __future__ import annotations

import click

from .common import emit_json, force_option, model_options
from .group import main


@main.command("meta-train")
@click.argument("base_data")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Meta head file to write.")
@force_option
@click.option("--algo", type=click.Choice(["reptile", "fomaml"]), default="reptile", show_default=True)
@click.option("--ways", type=int, default=5, show_default=True, help="Classes per episode (N).")
@click.option("--shots", type=int, default=1, show_default=True, help="Support images per class per episode (K).")
@click.option("--queries", type=int, default=15, show_default=True, help="Query images per class per episode.")
@click.option("--episodes", type=int, default=300, show_default=True, help="Meta-training episodes (adapter).")
@click.option("--inner-steps", type=int, default=5, show_default=True, help="Task-adaptation steps per episode.")
@click.option("--meta-lr", type=float, default=None, help="Outer step (default 0.1 for reptile, 1e-3 for fomaml).")
@click.option("--hidden", type=int, default=128, show_default=True, help="Width of the residual adapter.")
@click.option("--classes", default=None, help="Base classes to train on, comma-separated names or numbers (default all).")
@click.option("--max-per-class", type=int, default=200, show_default=True, help="Base images per class to encode.")
@click.option("--ctx-episodes", type=int, default=30, show_default=True,
              help="Episodes for the CoOp context vectors (0: no context).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@model_options
def meta_train_command(base_data, out, force, algo, ways, shots, queries, episodes, inner_steps, meta_lr, hidden,
                       classes, max_per_class, ctx_episodes, seed, as_json, model, device, precision):
    """Meta-train on BASE_DATA's training images (N-way K-shot episodes) and write a meta head.

    Example: clipxfer meta-train fashion-mnist --model lite --algo reptile --out meta.safetensors
    """
    from ..encoders.artifacts import claim_output
    from ..metalearn.train import meta_train

    out = claim_output(out, force)  # before any training

    _, summary = meta_train(
        base_data, model=model, classes=classes, algo=algo, ways=ways, shots=shots, queries=queries,
        episodes=episodes, inner_steps=inner_steps, meta_lr=meta_lr, hidden=hidden, context=ctx_episodes > 0,
        ctx_episodes=ctx_episodes, max_per_class=max_per_class, seed=seed, out=out, device=device,
        precision=precision, progress=not as_json,
    )
    if as_json:
        emit_json(summary)
        return
    click.echo(f"meta-train ({algo}): {len(summary['base_classes'])} base classes, {ways}-way {shots}-shot, "
               f"{episodes} episodes ({summary['model']})")
    click.echo(f"  held-out base episodes, raw prototypes      {summary['identity_val_accuracy']:.4f}")
    click.echo(f"  held-out base episodes, adapted prototypes  {summary['val_accuracy']:.4f}  "
               f"(kept episode {summary['best_episode']})")
    if summary["context"]:
        click.echo(f"  context query loss {summary['ctx_query_loss_first']:.4f} -> {summary['ctx_query_loss_last']:.4f}")
    click.echo(f"  head: {summary['head']}")
