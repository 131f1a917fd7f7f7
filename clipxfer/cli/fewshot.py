"""``clipxfer probe|tip|coop|mix|lpp|clap`` (few-shot transfer) and ``clipxfer predict`` (apply a head).

Each training command prints zero-shot and adapted accuracy on the same test set; ``--json``
prints the result object of :func:`clipxfer.fewshot.run_transfer` (at least ``method, shots,
seed, accuracy, zeroshot_accuracy, fit_seconds``).
"""

from __future__ import annotations

import io

import click

from .common import (
    conformal_options,
    emit_json,
    fail_fast_option,
    force_option,
    model_options,
    report_skipped,
    unit_or_auto,
)
from .group import main


def few_shot_options(func):
    """Options every training command shares."""
    for decorator in reversed(
        [
            click.argument("data"),
            click.option("--shots", "-k", type=int, required=True, help="Training images per class (K)."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed of the K-shot draw."),
            click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
                         help="Head file to write; the drawn manifest goes next to it (.manifest.csv). "
                              "Default: METHOD-DATA-Kshot-seedS.safetensors here (METHOD names the variant: "
                              "tipf, mix-coop, ...)."),
            force_option,
            click.option("--templates", default="simple", show_default=True,
                         help="Prompt template set for the zero-shot head (name or text file)."),
            click.option("--index", "index_path", type=click.Path(), default=None,
                         help="Take features from this index instead of encoding the images."),
            click.option("--max-test", type=int, default=None, help="Score on at most this many test images."),
            click.option("--classes", default=None, metavar="A,B,C|FILE",
                         help="The classes, in order (comma-separated or a file); a manifest label or class "
                              "folder outside them is an error. Default: the labels found in DATA."),
            click.option("--transductive", is_flag=True,
                         help="Wrap the head in TransCLIP: it refines its predictions over each batch it "
                              "classifies (the test set here; the images given to 'predict' later)."),
            click.option("--no-save", is_flag=True, help="Score only; write no head or manifest."),
            click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
            model_options,
        ]
    ):
        func = decorator(func)
    return func


def _run(method: str, data, shots, seed, out, force, templates, index_path, max_test, classes, transductive, no_save,
         as_json, model, device, precision, **options):
    from ..datasets.prompts import load_classnames
    from ..fewshot.run import run_transfer

    result = run_transfer(
        method, data, shots, seed, model=model, out=out, templates=templates, index_path=index_path,
        max_test=max_test, device=device, precision=precision, save=not no_save, progress=not as_json,
        classes=load_classnames(classes) if classes else None, transductive=transductive, force=force, **options,
    )
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['variant']}: {result['shots']} shots/class, seed {result['seed']}, "
               f"{result['num_classes']} classes, {result['num_test']} test images ({result['model']})")
    click.echo(f"  zero-shot accuracy  {result['zeroshot_accuracy']:.4f}")
    label = result["variant"] if result["variant"] in ("tipf",) or result["variant"].endswith("+trans") else method
    click.echo(f"  {label:<9} accuracy  {result['accuracy']:.4f}  "
               f"({result['accuracy'] - result['zeroshot_accuracy']:+.4f}; fit {result['fit_seconds']:.1f} s)")
    if result["head"]:
        click.echo(f"  head: {result['head']}\n  manifest: {result['manifest']}")


@main.command()
@few_shot_options
@click.option("--prior", type=click.Choice(["auto", "zeroshot", "none"]), default="auto", show_default=True,
              help="Start from and regularise toward the zero-shot head (zeroshot), not (none), "
                   "or whichever validates better (auto).")
@click.option("--l2", type=float, default=None, help="Fixed L2 strength instead of the validation sweep.")
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Start from a meta-trained head (clipxfer meta-train).")
@click.option("--multi-label", is_flag=True,
              help="One sigmoid per label: DATA is a manifest whose label cells may hold several labels "
                   "(a|b), or a built-in dataset trained on its seeded 2x2 mosaics; K is shots per label.")
def probe(prior, l2, init, multi_label, **kwargs):
    """Linear probe (logistic regression) on DATA with K shots per class.

    With --multi-label: per-label sigmoid heads, per-label thresholds chosen on validation images,
    and mAP, per-label AP and micro/macro F1 printed for validation and test (zero-shot beside it).

    Example: clipxfer probe my_defects/ --shots 16 --seed 0 --model lite --out probe.safetensors
    """
    if multi_label:
        return _run_multilabel(l2=l2, refused={"--init": init, "--prior": prior != "auto"}, **kwargs)
    _run("probe", prior=prior, l2=l2, **({"init": init} if init else {}), **kwargs)


@main.command()
@click.argument("data")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--train", type=int, default=160, show_default=True, help="Training mosaics.")
@click.option("--val", type=int, default=40, show_default=True, help="Validation mosaics (thresholds, calibration).")
@click.option("--test", type=int, default=500, show_default=True,
              help="Test mosaics, made of the held-out test images only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draw.")
@click.option("--grid", type=int, default=2, show_default=True, help="Tiles per side.")
@click.option("--max-classes", type=int, default=3, show_default=True, help="Most distinct classes in one mosaic.")
def mosaics(data, folder, train, val, test, seed, grid, max_classes):
    """Write multi-label images made of real ones: seeded GRIDxGRID mosaics of a built-in dataset's
    images (fashion-mnist, digits, mnist-5k) whose labels are the classes present, with
    FOLDER/manifest.csv (path,label a|b,split) for the --multi-label commands, e.g.
    'clipxfer probe digit-mosaics/ --multi-label --shots 16'.

    Example: clipxfer mosaics digits digit-mosaics/ --seed 0 --test 500
    """
    from ..fewshot.multilabel import build_mosaic_folder

    manifest = build_mosaic_folder(data, folder, train, val, test, seed, grid, max_classes)
    click.echo(f"wrote {train + val + test} mosaics and {manifest}")


def _run_multilabel(data, shots, seed, out, force, templates, index_path, max_test, classes, transductive, no_save,
                    as_json, model, device, precision, l2, refused):
    from ..datasets.prompts import load_classnames
    from ..errors import ClipxferError
    from ..fewshot.multilabel import run_multilabel

    refused = {**refused, "--index": index_path, "--transductive": transductive}
    given = [name for name, value in refused.items() if value]
    if given:
        raise ClipxferError(f"{', '.join(given)} do(es) not go with --multi-label; drop them")
    result = run_multilabel(data, shots, seed, model=model, out=out, force=force, save=not no_save,
                            templates=templates, classes=load_classnames(classes) if classes else None,
                            test_count=max_test or 500, device=device, precision=precision, progress=not as_json,
                            l2=l2)
    if as_json:
        emit_json(result)
        return
    click.echo(f"multilabel-probe: {shots} shots/label, seed {seed}, {len(result['classes'])} labels, "
               f"{result['num_train']} train / {result['num_val']} validation / {result['num_test']} test images "
               f"({result['model']}; {result['dataset']})")
    click.echo(f"  {'':<10} {'validation mAP':>14} {'micro-F1':>8} {'macro-F1':>8}   {'test mAP':>8} "
               f"{'micro-F1':>8} {'macro-F1':>8}")
    for name, key in (("zero-shot", "zeroshot"), ("probe", "probe")):
        val, test = result[f"val_{key}"], result[key]
        click.echo(f"  {name:<10} {val['map']:>14.4f} {val['micro_f1']:>8.4f} {val['macro_f1']:>8.4f}   "
                   f"{test['map']:>8.4f} {test['micro_f1']:>8.4f} {test['macro_f1']:>8.4f}")
    click.echo("  per-label AP on test (zero-shot, probe):")
    width = max(len(name) for name in result["classes"])
    for name in result["classes"]:
        shown = [f"{r['per_label_ap'][name]:.4f}" if r["per_label_ap"][name] is not None else "  -   "
                 for r in (result["zeroshot"], result["probe"])]
        click.echo(f"    {name:<{width}}  {shown[0]}  {shown[1]}")
    conformal = result["conformal"]
    click.echo(f"  conformal label sets at alpha {conformal['alpha']} on test: miss rate per label mean "
               f"{conformal['mean_miss_rate']:.4f}, worst {conformal['max_miss_rate']:.4f}; mean set size "
               f"{conformal['mean_set_size']:.2f} ('predict --conformal ALPHA')")
    if result["head"]:
        click.echo(f"  head: {result['head']}")


@main.command()
@few_shot_options
@click.option("--finetune", is_flag=True, help="Tip-Adapter-F: train the cache keys (AdamW).")
@click.option("--steps", type=int, default=200, show_default=True, help="Training steps with --finetune.")
@click.option("--key-space", type=click.Choice(["features", "embeddings"]), default="features", show_default=True,
              help="What the cache keys are made of.")
def tip(finetune, steps, key_space, **kwargs):
    """Tip-Adapter (training-free cache), or Tip-Adapter-F with --finetune.

    Example: clipxfer tip my_defects/ --shots 16 --model lite --finetune
    """
    _run("tip", finetune=finetune, steps=steps, key_space=key_space, **kwargs)


@main.command()
@few_shot_options
@click.option("--n-ctx", type=int, default=16, show_default=True, help="Number of learned context vectors.")
@click.option("--ctx-init", default=None, help="Initialise the context from this phrase, e.g. 'a photo of a'.")
@click.option("--class-token-position", type=click.Choice(["end", "middle", "front"]), default="end",
              show_default=True)
@click.option("--class-specific-context", is_flag=True, help="One context per class instead of one shared.")
@click.option("--max-steps", type=int, default=200, show_default=True, help="Training steps (unless --epochs).")
@click.option("--epochs", type=int, default=None, help="Passes over the training images instead of --max-steps.")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Start from a meta-trained head (clipxfer meta-train).")
def coop(n_ctx, ctx_init, class_token_position, class_specific_context, max_steps, epochs, lr, init, **kwargs):
    """CoOp prompt tuning through the frozen text tower.

    Example: clipxfer coop my_defects/ --shots 16 --model lite --n-ctx 16
    """
    if init:  # the meta-trained context vectors replace --n-ctx/--ctx-init
        kwargs["init"] = init
    else:
        kwargs.update(n_ctx=n_ctx, ctx_init=ctx_init)
    _run("coop", class_token_position=class_token_position,
         class_specific_context=class_specific_context, max_steps=max_steps, epochs=epochs, lr=lr, **kwargs)


@main.command()
@few_shot_options
@click.option("--base", type=click.Choice(["probe", "coop"]), default="probe", show_default=True,
              help="The adapted head mixed with zero-shot.")
@click.option("--mix", "mix_value", default="auto", show_default=True, callback=unit_or_auto,
              help="Weight of the adapted head in [0, 1], or auto (chosen on validation).")
def mix(base, mix_value, **kwargs):
    """WiSE-FT weight-space mixing of the zero-shot head with a probe or CoOp head.

    Example: clipxfer mix my_defects/ --shots 16 --model lite --base probe --mix auto
    """
    _run("mix", base=base, mix=mix_value, **kwargs)


@main.command()
@few_shot_options
@click.option("--epochs", type=int, default=300, show_default=True, help="Full-batch training epochs.")
@click.option("--alpha-init", type=click.Choice(["fit", "reference"]), default="fit", show_default=True,
              help="Starting text weight: fitted to the shots (fit) or the authors' 250 x mean text logit.")
def lpp(epochs, alpha_init, **kwargs):
    """LP++: a linear probe blended class-wise with the text weights, step sizes from Lipschitz
    bounds (no validation search).

    Example: clipxfer lpp fashion-mnist --shots 16 --model lite --out lpp.safetensors
    """
    _run("lpp", epochs=epochs, alpha_init=alpha_init, **kwargs)


@main.command()
@few_shot_options
@click.option("--epochs", type=int, default=300, show_default=True, help="Full-batch training epochs.")
@click.option("--lr", type=float, default=0.1, show_default=True, help="SGD learning rate (cosine schedule).")
@click.option("--space", type=click.Choice(["auto", "shared", "joint"]), default="auto", show_default=True,
              help="Where the weights move: the image-text space only (shared), with the probe features too "
                   "(joint), or joint when the model has probe features of its own (auto).")
@click.option("--penalty-temperature", type=click.Choice(["fit", "model"]), default="fit", show_default=True,
              help="Read the per-class penalties off the zero-shot softmax at the temperature fitted to the "
                   "shots (fit) or at the model's logit scale (model, the authors' rule).")
def clap(epochs, lr, space, penalty_temperature, **kwargs):
    """CLAP: a linear probe started at the zero-shot weights and held near them by per-class
    penalties set from the shots (with lite, the features' weight is chosen on the validation images).

    Example: clipxfer clap fashion-mnist --shots 16 --model lite --out clap.safetensors
    """
    _run("clap", epochs=epochs, lr=lr, space=space, penalty_temperature=penalty_temperature, **kwargs)


@main.command()
@click.argument("head", type=click.Path(dir_okay=False))
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@click.option("--index", "index_path", type=click.Path(), default=None, help="Classify every image of this index.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write path,label,probability[,set,decision] plus one column per class to this CSV.")
@click.option("--transductive", is_flag=True,
              help="Refine the head's predictions with TransCLIP over all the images classified together.")
@click.option("--json", "as_json", is_flag=True, help="Print predictions as JSON.")
@click.option("--multi-label", is_flag=True,
              help="Expect a multi-label HEAD (probe --multi-label; one is used so without this flag too): "
                   "each image gets every label at or above its threshold, and a score per label.")
@fail_fast_option
@conformal_options
@model_options
def predict(head, folder, index_path, out, transductive, as_json, multi_label, fail_fast, conformal, calibrate,
            conformal_score, reject, model, device, precision):
    """Classify the images in FOLDER (or --index PATH) with a saved HEAD.

    With --conformal ALPHA each image also gets a prediction set holding its true class with
    probability >= 1-ALPHA, calibrated on the head's validation images (or --calibrate DATA);
    --reject decides 'unknown' when the set holds more than one class.

    A multi-label HEAD gives each image its labels (those at or above their threshold, a|b) and a
    probability per label; with --conformal ALPHA its set holds each label the image has with
    probability >= 1-ALPHA, per label (label-conditional conformal on the validation images).

    Example: clipxfer predict probe.safetensors new_parts/ --conformal 0.1 --reject --out preds.csv
    """
    from ..errors import ClipxferError
    from ..fewshot.predict import encoder_for_head, predict_sets
    from ..fewshot.predict import predict as run_predict
    from ..heads.base import read_head_metadata
    from ..paths import atomic_write_bytes, path_text

    if conformal is None and (calibrate or reject):
        raise ClipxferError("--calibrate and --reject go with --conformal ALPHA (e.g. --conformal 0.1)")
    is_multi_label = bool((read_head_metadata(head).get("config") or {}).get("multi_label"))
    if multi_label and not is_multi_label:
        raise ClipxferError(f"{head}: a single-label head; --multi-label needs one fitted with "
                            "'clipxfer probe --multi-label'")
    if is_multi_label:
        return _predict_multilabel(head, folder, index_path, out, as_json, fail_fast, conformal, calibrate, reject,
                                   transductive, model, device, precision)
    if conformal is not None and calibrate is not None:  # a class mismatch is found before any encoding
        from ..calibrate.sets import check_calibration_data
        from ..heads.base import read_head_metadata

        check_calibration_data(calibrate, read_head_metadata(head).get("classes") or [])
    encoder = encoder_for_head(head, model, device, precision)
    skipped = None if fail_fast else []
    fitted, table, probs = run_predict(head, folder, index_path, encoder=encoder, progress=not as_json,
                                       transductive=transductive, skipped=skipped)
    report_skipped(skipped)
    sets = None
    if conformal is not None:
        sets = predict_sets(fitted, probs, conformal, head, encoder, calibrate, conformal_score, reject)
        table["set"] = ["|".join(names) for names in sets.set_names(fitted.classnames)]
        if reject:
            table["decision"] = sets.decisions(fitted.classnames)
    if out:
        full = table.copy()
        for i, name in enumerate(fitted.classnames):
            full[f"p:{name}"] = probs[:, i]
        buffer = io.StringIO()
        full.to_csv(buffer, index=False)
        atomic_write_bytes(out, buffer.getvalue().encode())
    if as_json:
        rows = []
        for i, row in enumerate(table.itertuples()):
            item = {"path": row.path, "label": row.label, "probability": float(row.probability),
                    "probabilities": {n: float(p) for n, p in zip(fitted.classnames, probs[i])}}
            if sets is not None:
                item["set"] = row.set.split("|")
                if reject:
                    item["decision"] = row.decision
            rows.append(item)
        emit_json({
            "head": str(head), "method": fitted.method, "model": fitted.model_id, "classes": fitted.classnames,
            "conformal": sets.summary() if sets is not None else None, "predictions": rows,
            "skipped": [{"path": path_text(f.path), "reason": f.reason} for f in skipped or []],
        })
        return
    if not out:  # as classify: with --out the rows go to the file only
        for row in table.itertuples():
            extra = f"\t{{{row.set.replace('|', ', ')}}}" if sets is not None else ""
            decided = f"{row.decision}\t" if reject else ""
            click.echo(f"{decided}{row.label}\t{row.probability:.3f}{extra}\t{row.path}")
    if sets is not None:
        summary = sets.summary()
        click.echo(f"conformal sets at alpha {sets.alpha} ({sets.score}, calibrated on {sets.calibration_source}): "
                   f"mean set size {summary['mean_set_size']:.2f}", err=True)
    if out:
        click.echo(f"wrote predictions to {out}")


def _write_table(table, probs, classnames, out):
    from ..paths import atomic_write_bytes

    full = table.copy()
    for i, name in enumerate(classnames):
        full[f"p:{name}"] = probs[:, i]
    buffer = io.StringIO()
    full.to_csv(buffer, index=False)
    atomic_write_bytes(out, buffer.getvalue().encode())


def _predict_multilabel(head, folder, index_path, out, as_json, fail_fast, conformal, calibrate, reject, transductive,
                        model, device, precision):
    from ..errors import ClipxferError
    from ..fewshot.predict import encoder_for_head, label_names, predict_label_sets
    from ..fewshot.predict import predict as run_predict
    from ..paths import path_text

    if reject or transductive:
        raise ClipxferError(f"{'--reject' if reject else '--transductive'} does not go with a multi-label head; drop it")
    encoder = encoder_for_head(head, model, device, precision)
    skipped = None if fail_fast else []
    fitted, table, probs = run_predict(head, folder, index_path, encoder=encoder, progress=not as_json, skipped=skipped)
    report_skipped(skipped)
    if conformal is not None:
        table["set"] = label_names(predict_label_sets(fitted, probs, conformal, encoder, calibrate), fitted.classnames)
    if out:
        _write_table(table, probs, fitted.classnames, out)
    if as_json:
        rows = []
        for i, row in enumerate(table.itertuples()):
            item = {"path": row.path, "labels": [n for n in row.label.split("|") if n],
                    "probabilities": {n: float(p) for n, p in zip(fitted.classnames, probs[i])}}
            if conformal is not None:
                item["set"] = [n for n in row.set.split("|") if n]
            rows.append(item)
        calibration = (fitted.config.get("label_calibration") or {}).get("source")
        emit_json({
            "head": str(head), "method": fitted.method, "model": fitted.model_id, "classes": fitted.classnames,
            "multi_label": True, "thresholds": dict(zip(fitted.classnames, map(float, fitted.weights["thresholds"]))),
            "conformal": {"alpha": conformal, "method": "label-conditional", "calibration_source": calibration}
            if conformal is not None else None,
            "predictions": rows, "skipped": [{"path": path_text(f.path), "reason": f.reason} for f in skipped or []],
        })
        return
    if not out:
        for row in table.itertuples():
            extra = f"\t{{{row.set.replace('|', ', ')}}}" if conformal is not None else ""
            click.echo(f"{row.label or '-'}\t{row.probability:.3f}{extra}\t{row.path}")
    if conformal is not None:
        sizes = [len([n for n in s.split("|") if n]) for s in table["set"]]
        click.echo(f"conformal label sets at alpha {conformal} (per label, label-conditional): mean set size "
                   f"{sum(sizes) / max(len(sizes), 1):.2f}", err=True)
    if out:
        click.echo(f"wrote predictions to {out}")
