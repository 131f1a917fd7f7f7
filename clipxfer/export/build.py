"""``clipxfer export``: a saved head or detector -> one self-describing bundle folder that
:mod:`clipxfer.runtime` runs without torch.

The bundle holds one OpenVINO graph (uint8 HWC pixels in; the model's scaling, the image tower and
the head or detector folded in, see :mod:`.fold`), the class names and conformal calibration or the
detector's false-alarm threshold in a small JSON file, and ``manifest.json`` (format, kind, encoder
id, precision, SHA-256 of every file). docs/deploy.md describes the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..encoders.artifacts import HEAD_FORMAT, read_artifact_metadata
from ..errors import ClipxferError
from ..runtime.manifest import MANIFEST, sha256_file, write_manifest
from ..runtime.sets import SET_SCORES, check_alpha

FORMATS = ("openvino", "onnx")
PRECISIONS = ("fp32", "int8")
DETECTOR_FORMAT = "clipxfer-anomaly/1"
#: The conformal level written into a classifier bundle whose head holds a calibration, unless told.
DEFAULT_ALPHA = 0.1


@dataclass(frozen=True)
class ExportSettings:
    """What ``clipxfer export`` was asked for, checked before any model is loaded."""

    artifact: Path
    out: Path
    format: str = "openvino"
    precision: str = "fp32"
    alpha: float | None = None
    score: str = "aps"
    reject: bool = False
    calibration_images: Path | None = None

    def check(self) -> "ExportSettings":
        if self.format == "onnx":
            raise ClipxferError("--format onnx is not supported: OpenVINO saves only its own IR, and the runtime "
                                "runs that; use --format openvino")
        if self.format not in FORMATS:
            raise ClipxferError(f"--format {self.format}: use openvino")
        if self.precision not in PRECISIONS:
            raise ClipxferError(f"--precision {self.precision}: use fp32 or int8")
        if self.score not in SET_SCORES:
            raise ClipxferError(f"--conformal-score {self.score}: use one of {', '.join(SET_SCORES)}")
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.calibration_images is not None and not Path(self.calibration_images).is_dir():
            raise ClipxferError(f"--calibration-images {self.calibration_images}: not a folder")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
            raise ClipxferError(f"--out {out}: exists and is not a bundle; choose a new or empty folder")
        return self


def artifact_kind(path: Path) -> str:
    """``classifier`` for a head file, ``detector`` for an anomaly detector; one line for anything else."""
    meta = read_artifact_metadata(path, "head or detector", "make one with a training command or 'anomaly fit'")
    if meta.get("format") == HEAD_FORMAT:
        return "classifier"
    if meta.get("format") == DETECTOR_FORMAT:
        return "detector"
    raise ClipxferError(f"{path}: format {meta.get('format')!r} is neither a head nor an anomaly detector")


def manifest_calibration_paths(head_path: Path) -> tuple[list[Path], Path]:
    """The training and validation images (never the test rows) the head's drawn manifest names
    (``HEAD.manifest.csv``, written beside every head a training command saves) that still exist
    as files, and the manifest's path; none when there is no manifest or it is unreadable."""
    import pandas as pd

    from ..csvcells import cell_text
    from ..datasets.labelled import manifest_source, read_manifest_table
    from ..fewshot.inputs import manifest_path_for

    manifest = manifest_path_for(head_path)
    try:
        table = read_manifest_table(manifest, "columns path,label,split")
    except (ClipxferError, OSError):  # no usable manifest: the caller falls back to the sample photos
        return [], manifest
    if "path" not in table.columns:
        return [], manifest
    splits = table["split"].str.lower() if "split" in table.columns else pd.Series(["train"] * len(table))
    rows = table["path"][splits.isin(["train", "val"]).values]
    paths = [manifest_source(manifest, cell_text(raw)) for raw in rows]
    return [path for path in paths if path.is_file()], manifest


def calibration_pixels(settings: ExportSettings, size: int, source: Path):
    """int8 calibration images and where they came from: up to 64 from ``--calibration-images``;
    else from the images the head was trained and validated on, when its manifest names files that
    are still there; else scikit-image's sample photos, with one warning line naming the option."""
    from ..encoders.openvino_runtime import MIN_FOLDER_IMAGES, calibration_set
    from ..images import find_images

    if settings.calibration_images:
        return calibration_set(list(find_images(settings.calibration_images)), size)
    paths, manifest = manifest_calibration_paths(source)
    if len(paths) >= MIN_FOLDER_IMAGES:
        images, record = calibration_set(paths, size)
        if record["source"] == "folder":  # enough of them decoded
            return images, {"source": "training and validation images", "manifest": manifest.name,
                            "images": record["images"]}  # fmt: skip
    print(f"warning: int8 calibrates on clipxfer's sample photos: {manifest.name} beside the head names fewer than "
          f"{MIN_FOLDER_IMAGES} training images still on disk; give --calibration-images FOLDER (images like the "
          "ones the bundle will see) for answers closer to fp32", file=sys.stderr)  # fmt: skip
    return calibration_set(None, size)


def export_artifact(settings: ExportSettings) -> dict:
    """Write the bundle ``settings`` describe; returns its manifest."""
    settings = settings.check()
    path = Path(settings.artifact)
    kind = artifact_kind(path)
    if kind == "classifier":
        graph, encoder, fields, info = _classifier(settings, path)
    else:
        graph, encoder, fields, info = _detector(settings, path)
    return _write_bundle(settings, graph, encoder, kind, fields, info, path)


def _classifier(settings: ExportSettings, path: Path):
    from ..encoders.ids import weights_id
    from ..fewshot.predict import encoder_for_head
    from ..heads.base import load_head
    from .fold import FOLDING, ClassifierGraph

    head = load_head(path)
    encoder = encoder_for_head(path, precision="torch:fp32")
    if weights_id(encoder.id) != weights_id(head.model_id):
        raise ClipxferError(f"{path}: made with '{head.model_id}' but its encoder loads as '{encoder.id}'")
    graph = ClassifierGraph(encoder, head)
    calibration = head.config.get("calibration")
    alpha = settings.alpha if settings.alpha is not None else (DEFAULT_ALPHA if calibration else None)
    if alpha is not None and not calibration:
        print(f"warning: {path} holds no conformal calibration; the bundle gives no prediction sets", file=sys.stderr)
        alpha = None
    info = {
        "classes": head.classnames,
        "calibration": calibration or None,
        "conformal": {"alpha": alpha, "score": settings.score, "reject": settings.reject} if alpha else None,
    }
    fields = {"method": head.method, "encoder_id": head.model_id, "folding": FOLDING[head.method],
              "preprocess": "resize the short side, centre crop", "outputs": ["logits"]}  # fmt: skip
    return graph, encoder, fields, info


def _detector(settings: ExportSettings, path: Path):
    from ..anomaly.detector import load_detector
    from ..anomaly.patches import NEIGHBOURHOOD
    from ..anomaly.tiling import feature_strides
    from ..encoders import load_encoder
    from ..encoders.ids import spec_for_id
    from .fold import DetectorGraph

    if settings.precision != "fp32":
        raise ClipxferError("detectors export in fp32 only: the toolkit scores patches in fp32 and the threshold "
                            "was calibrated on those distances; drop --precision int8")
    detector = load_detector(path)
    encoder = load_encoder(spec_for_id(detector.model_id), device="cpu", precision="torch:fp32")
    strides = feature_strides(encoder) if detector.map_size > encoder.input_size else None
    graph = DetectorGraph(encoder, detector, NEIGHBOURHOOD, strides)
    keys = ("method", "members", "threshold", "false_alarm_rate", "calibration_size", "calibration_score_median",
            "member_calibration", "object", "shots", "input_size", "map_size")  # fmt: skip
    info = {key: detector.config.get(key) for key in keys}
    info["map_size"] = detector.map_size
    info["tiles"] = len(graph.starts) ** 2
    fields = {"method": detector.method, "encoder_id": detector.model_id, "input_size": detector.map_size,
              "folding": "patch features (tiled at the working resolution), aggregation, memory bank, Gaussian "
                         "statistics, text states, smoothing and fusion folded into the graph",
              "preprocess": "whole image resized to the input size (bicubic)", "outputs": ["scores", "maps"]}  # fmt: skip
    return graph, encoder, fields, info


def output_layers_in_float(model) -> list[str]:
    """Names of the matrix products that make the tower's outputs (through a bias ``Add`` or a
    conversion): lite's ImageNet classifier layer, a ViT's projection. They stay float in an int8
    bundle: lite's shared-space embeddings are a top-10 over those logits (ConSE), which int8
    reorders, and the zero-shot and CLAP heads read those embeddings."""
    names = []
    for output in model.outputs:
        node = output.get_node().input_value(0).get_node()
        while node.get_type_name() in ("Add", "Convert", "Reshape", "Squeeze"):
            node = node.input_value(0).get_node()
        if node.get_type_name() == "MatMul":
            names.append(node.get_friendly_name())
    return names


def _convert_head(graph, encoder, ov):
    """The classifier's :class:`~.fold.HeadGraph` as a float OpenVINO model over the tower's outputs."""
    import warnings

    import torch

    from .fold import tower_outputs

    with torch.no_grad():
        example = tower_outputs(graph.tower, torch.zeros(2, 3, encoder.input_size, encoder.input_size))
    inputs = [(-1, *output.shape[1:]) for output in example]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ov.convert_model(graph.head, example_input=example, input=inputs)


def _write_bundle(settings: ExportSettings, graph, encoder, kind: str, fields: dict, info: dict, source: Path) -> dict:
    from ..encoders.openvino_runtime import convert_graph, import_openvino, is_transformer, quantize_model

    ov = import_openvino()
    graph = graph.float().eval().requires_grad_(False)
    print(f"converting the {kind} graph for {fields['encoder_id']} to OpenVINO", file=sys.stderr)
    calibration, head_model = None, None
    if settings.precision == "int8":
        # The tower alone is quantized (the toolkit's int8 recipe); the head runs behind it as a float
        # graph. Quantizing the folded head too cost lite's tip/lpp heads most of their agreement.
        model = convert_graph(graph.tower, encoder)
        images, calibration = calibration_pixels(settings, encoder.input_size, source)
        print(f"quantizing to int8 on {calibration['images']} images ({calibration['source']})", file=sys.stderr)
        model = quantize_model(model, is_transformer(graph.tower), images, output_layers_in_float(model))
        head_model = _convert_head(graph, encoder, ov)
        head_model.outputs[0].get_tensor().set_names({"logits"})
        fields["head_graph"] = "head.xml"
    else:
        model = convert_graph(graph, encoder, fields.get("input_size"))
        for output, name in zip(model.outputs, fields["outputs"]):
            output.get_tensor().set_names({name})
    out = Path(settings.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        if head_model is not None:
            ov.save_model(head_model, str(tmp / "head.xml"), compress_to_fp16=False)
        (tmp / f"{kind}.json").write_text(json.dumps(info, indent=1) + "\n")
        manifest = write_manifest(tmp, {
            "kind": kind, "input_size": encoder.input_size, **fields, "precision": settings.precision,
            "graph": "model.xml", "int8_calibration": calibration,
            "source": {"file": source.name, "sha256": sha256_file(source)},
            "clipxfer": __version__, "openvino": ov.get_version(),
        })  # fmt: skip
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ClipxferError(f"--out {out}: cannot write the bundle ({exc.strerror or exc})") from None
    return manifest
