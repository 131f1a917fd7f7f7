"""``clipxfer classify`` (zero-shot classification of a folder or an index) and ``clipxfer prompts``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (
    conformal_options,
    emit_json,
    fail_fast_option,
    force_option,
    load_model,
    model_options,
    report_skipped,
)
from .filters import filter_options
from .group import main


@main.command()
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@click.option("--index", "index_path", type=click.Path(), help="Classify the images of this index (no re-encoding).")
@click.option("--classes", help='Class names: "a,b,c" or a text file, one per line. Default: the subfolder names.')
@click.option("--templates", default="simple", show_default=True, help="Template set name (see 'clipxfer prompts') or a file.")
@click.option("--descriptions", type=click.Path(dir_okay=False), help="Per-class descriptions: CSV class,description or JSON.")
@click.option("--top-k", "top_k", default=3, show_default=True, type=click.IntRange(min=1), help="Labels per image.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write per-image predictions here (CSV).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the confusion matrix figure here (labelled images).")
@click.option("--save-head", type=click.Path(dir_okay=False), help="Also save the zero-shot head (.safetensors).")
@force_option
@click.option("--transductive", is_flag=True,
              help="Refine the predictions with TransCLIP over all the images classified together.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (keys below).")
@click.option("--multi-label", is_flag=True,
              help="Give each image every label whose per-label sigmoid of the text scores reaches --threshold "
                   "(0.5: the label beats the uniform guess 1/C), with a probability per label.")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="With --multi-label: the per-label probability a label needs.")
@fail_fast_option
@conformal_options
@model_options
@filter_options
def classify(folder, index_path, classes, templates, descriptions, top_k, out, plot, save_head, force, transductive,
             as_json, multi_label, threshold, fail_fast, conformal, calibrate, conformal_score, reject, model, device,
             precision, filters):
    """Zero-shot classify the images in FOLDER, or in an index with --index.

    Each class becomes prompts (every template, plus its descriptions if given); an image gets the
    class whose mean prompt embedding is nearest. A labelled FOLDER (one subfolder per class; their
    names are the classes unless --classes is given) is scored: accuracy, balanced accuracy,
    macro-F1, per-class recall, confusion matrix, expected calibration error (15 bins). An index
    is scored the same way when its images lie in class subfolders of its root. Any other folder
    gets predictions only, printed or written with --out (columns path[,label],pred_1,prob_1,...).

    \b
    --json prints an object with the keys:
      source, model, classes, templates, num_templates, num_descriptions,
      n                  images classified
      skipped            unreadable images left out: [{path, reason}] (--fail-fast stops instead)
      labelled           true when true labels were known
      accuracy, balanced_accuracy, macro_f1, top5_accuracy (more than 5 classes),
      ece, mean_confidence          null when unlabelled
      per_class_recall, support     class -> value (null when unlabelled)
      confusion_matrix              rows true, columns predicted, in classes order
      predicted_counts              class -> images predicted as it
      predictions                   unlabelled only: [{path, top: [[class, prob], ...][, set, decision]}]
      conformal                     with --conformal: alpha, score, threshold, calibration_source,
                                    calibration_size, mean_set_size, unknown_count, evaluation
                                    (coverage, mean_set_size, unknown_rate, error_rate_of_decisions
                                    on labelled images not used to calibrate); else null
      out, plot, head               paths written, or null

    With --conformal ALPHA each image gets a prediction set that holds its true class with
    probability >= 1-ALPHA: calibrated on --calibrate DATA, or on a random half of a labelled
    FOLDER (coverage is then measured on the other half).

    With --multi-label each image gets every label whose probability C*s/(1+C*s) (s: its softmax
    probability among C labels; the sigmoid of its text score against the uniform guess) reaches
    --threshold; --json then prints source, model, classes, multi_label, threshold, n, labelled,
    report (labelled folders: map, per_label_ap, micro_f1, macro_f1) and predictions [{path, labels,
    probabilities}]; --out writes path[,label],labels,p:CLASS...

    Example: clipxfer classify parts/ --classes "ok,scratch,dent" --templates industrial --out preds.csv
    """
    from ..classify.run import classify_folder, classify_index, conformalize
    from ..datasets.prompts import load_classnames, load_templates
    from ..errors import ClipxferError

    if (folder is None) == (index_path is None):
        raise ClipxferError("give a FOLDER of images or --index PATH (one of the two)")
    if filters.active and index_path is None:
        raise ClipxferError("--path, --modified-* and --min-* filter an index: use them with --index PATH")
    class_list = load_classnames(classes) if classes else None
    load_templates(templates)  # a bad set name fails before a model loads
    if multi_label:
        refused = {"--transductive": transductive, "--conformal": conformal is not None, "--plot": plot,
                   "--save-head": save_head}
        given = [name for name, value in refused.items() if value]
        if given:
            raise ClipxferError(f"{', '.join(given)} do(es) not go with --multi-label; drop them (for label sets, "
                                "fit a head with 'clipxfer probe --multi-label' and use 'predict --conformal')")
        if not 0 < threshold < 1:
            raise ClipxferError(f"--threshold must be between 0 and 1 (exclusive), not {threshold}")
    if conformal is None and (calibrate or reject):
        raise ClipxferError("--calibrate and --reject go with --conformal ALPHA (e.g. --conformal 0.1)")
    if save_head:
        from ..encoders.artifacts import claim_output

        save_head = claim_output(save_head, force)  # before any encoding
    if conformal is not None and calibrate is not None:  # a class mismatch is found before any encoding
        from ..calibrate.sets import check_calibration_data
        from ..classify.run import layout_classes

        known = class_list or (layout_classes(Path(folder)) if folder is not None and Path(folder).is_dir() else None)
        if known:
            check_calibration_data(calibrate, known)
    encoder = None
    if index_path is not None:
        result = classify_index(index_path, class_list, templates, descriptions, model, device, precision, progress=True,
                                transductive=transductive, filters=filters)
    else:
        encoder = load_model(model, device, precision)
        result = classify_folder(encoder, folder, class_list, templates, descriptions, progress=True,
                                 transductive=transductive, fail_fast=fail_fast)
        report_skipped(result.skipped)
    if multi_label:
        return _multilabel(result, threshold, out, as_json)
    if conformal is not None:
        conformalize(result, conformal, calibrate, conformal_score, reject, encoder)
    written = {"out": None, "plot": None, "head": None}
    if out:
        written["out"] = str(result.save_table(out, top_k))
    if plot:
        written["plot"] = str(result.plot_confusion(plot))
    if save_head:
        written["head"] = str(result.head.save(save_head))
    if as_json:
        emit_json({**result.summary(top_k), **written})
        return
    _print_result(result, top_k, written)


def _multilabel(result, threshold: float, out, as_json: bool) -> None:
    from ..classify.multilabel import as_multilabel
    from ..errors import ClipxferError

    labelled = as_multilabel(result, threshold)
    if out:
        try:
            labelled.table().to_csv(out, index=False)
        except OSError as exc:
            raise ClipxferError(f"{out}: cannot write the predictions ({exc.strerror})") from None
    if as_json:
        emit_json({**labelled.summary(), "out": out or None})
        return
    click.echo(f"{labelled.source}: {len(labelled.paths)} images, {len(labelled.classnames)} labels, per-label "
               f"threshold {threshold}, model {labelled.model}")
    report = labelled.report
    if report is not None:
        click.echo(f"mAP        {report['map']:.4f}\nmicro-F1   {report['micro_f1']:.4f}\n"
                   f"macro-F1   {report['macro_f1']:.4f}\nper-label AP:")
        width = max(len(name) for name in labelled.classnames)
        for name, ap in report["per_label_ap"].items():
            click.echo(f"  {name:<{width}}  {'   -  ' if ap is None else f'{ap:.4f}'}")
    elif not out:
        for path, names in zip(labelled.paths, labelled.label_names()):
            click.echo(f"{'|'.join(names) or '-'}\t{path}")
    if out:
        click.echo(f"wrote predictions to {out}")


def _print_result(result, top_k: int, written: dict) -> None:
    import pandas as pd

    click.echo(
        f"{result.source}: {len(result.paths)} images, {len(result.classnames)} classes, "
        f"templates {result.templates} ({len(result.head.config['templates'])}), model {result.head.model_id}"
    )
    report = result.report
    if report is not None:
        top5 = f"\ntop-5 accuracy     {report['top5_accuracy']:.4f}" if report["top5_accuracy"] is not None else ""
        click.echo(
            f"accuracy           {report['accuracy']:.4f}\n"
            f"balanced accuracy  {report['balanced_accuracy']:.4f}\n"
            f"macro-F1           {report['macro_f1']:.4f}{top5}\n"
            f"ECE (15 bins)      {report['ece']:.4f}  (mean confidence {report['mean_confidence']:.4f})"
        )
        click.echo("per-class recall:")
        width = max(len(name) for name in result.classnames)
        for name in result.classnames:
            recall = report["per_class_recall"][name]
            shown = "   -  " if recall is None else f"{recall:.4f}"
            click.echo(f"  {name:<{width}}  {shown}  (n={report['support'][name]})")
        if len(result.classnames) <= 20:
            frame = pd.DataFrame(report["confusion_matrix"], index=result.classnames, columns=result.classnames)
            click.echo("confusion matrix (rows true, columns predicted):")
            click.echo(frame.to_string())
        else:
            click.echo("confusion matrix: too many classes to print; use --plot cm.png or --json")
    elif not written["out"]:
        click.echo(result.table(top_k).to_string(index=False))
    if result.conformal is not None:
        _print_conformal(result.conformal.summary())
    for key, label in (("out", "predictions"), ("plot", "confusion matrix"), ("head", "head")):
        if written[key]:
            click.echo(f"wrote {label} to {written[key]}")


def _print_conformal(summary: dict) -> None:
    click.echo(
        f"conformal sets at alpha {summary['alpha']} ({summary['score']}), calibrated on "
        f"{summary['calibration_source']}: mean set size {summary['mean_set_size']:.2f}"
    )
    evaluation = summary["evaluation"]
    if evaluation:
        click.echo(
            f"  on {evaluation['n']} labelled images not used to calibrate: coverage {evaluation['coverage']:.4f} "
            f"(guaranteed >= {1 - summary['alpha']:.4f} in expectation), mean set size {evaluation['mean_set_size']:.2f}"
        )
        if summary["reject"]:
            click.echo(
                f"  --reject: unknown {evaluation['unknown_rate']:.4f}, wrong decisions "
                f"{evaluation['error_rate_of_decisions']:.4f} (at most alpha in expectation)"
            )


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {name, description, templates, example, path}.")
def prompts(name, as_json):
    """List the prompt template sets, or print the templates of set NAME (a set name or a file).

    A set is a text file, one template per line with {} where the class name goes and # comment
    lines; any such file works wherever a set name does (--templates FILE).

    Example: clipxfer prompts industrial
    """
    from ..datasets.prompts import list_template_sets, load_templates

    if name:
        templates = load_templates(name)
        if as_json:
            emit_json({"name": name, "templates": templates})
        else:
            click.echo("\n".join(templates))
        return
    listing = list_template_sets()
    if as_json:
        emit_json(listing)
        return
    width = max(len(entry["name"]) for entry in listing)
    for entry in listing:
        click.echo(f"{entry['name']:<{width}}  {entry['templates']:>3}  {entry['description']}")
