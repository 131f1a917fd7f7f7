"""The inputs every training command shares: :class:`TrainingInputs` loads the labelled images and
the encoder, names the head file and draws and encodes the few-shot task, once for
:func:`~clipxfer.fewshot.run.run_transfer`, :func:`~clipxfer.finetune.run.run_finetune` and
:func:`~clipxfer.fewshot.unlabelled.run_adapt`. Head files are named here too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..datasets.labelled import LabelledImages, load_dataset
from ..encoders.artifacts import SUFFIX, claim_output
from ..encoders.base import Encoder
from ..paths import safe_filename
from .task import FewShotTask, prepare_task


def default_head_path(name: str, dataset: LabelledImages, shots: int, seed: int) -> Path:
    """``<name>-<dataset>-<K>shot-seed<S>.safetensors`` in the current folder; ``name`` is the method
    and variant (``tipf``, ``mix-coop``, ``finetune-lora``...), so different runs get different files."""
    return Path(f"{safe_filename(name)}-{safe_filename(dataset.name)}-{shots}shot-seed{seed}.safetensors")


def resolve_head_path(out, name: str, dataset: LabelledImages, shots: int, seed: int, force: bool = False) -> Path:
    """``out`` (``.safetensors`` added when missing), or the default name for this run; an existing
    file is refused unless ``force`` (:func:`~clipxfer.encoders.artifacts.claim_output`)."""
    return claim_output(out if out is not None else default_head_path(name, dataset, shots, seed), force)


def manifest_path_for(head_path: Path) -> Path:
    """The drawn manifest lives next to the head: ``head.safetensors`` -> ``head.manifest.csv``."""
    return head_path.with_name(head_path.name.removesuffix(SUFFIX) + ".manifest.csv")


@dataclass
class TrainingInputs:
    """What a training command trains on, with what encoder, and where its result goes."""

    #: A built-in dataset name, a folder of class folders, a manifest, or the labelled images themselves.
    data: str | os.PathLike | LabelledImages
    #: Training images drawn per class, with ``seed``.
    shots: int
    seed: int = 0
    #: The encoder: ``encoder`` as given, else loaded from ``model`` on ``device`` in ``precision``.
    model: str | None = None
    encoder: Encoder | None = None
    #: The head (or adapter) file, ``.safetensors`` added when missing; default :func:`default_head_path`.
    out: str | os.PathLike | None = None
    #: The prompt template set (a name or a file) or the templates of the zero-shot head.
    templates: str | list[str] = "simple"
    #: Take the images' features from this index instead of encoding them.
    index_path: str | os.PathLike | None = None
    #: Score on at most this many test images.
    max_test: int | None = None
    device: str | None = None
    precision: str | None = None
    #: Write the head and the drawn manifest beside it.
    save: bool = True
    #: Show progress bars (on stderr).
    progress: bool = False
    #: The class list and order of a folder or manifest (labels outside it are errors); default the labels found.
    classes: list[str] | None = None
    #: Overwrite an existing head (or adapter) file; without it an existing file is an error, before any work.
    force: bool = False

    def load(self) -> tuple[LabelledImages, Encoder]:
        """The labelled images and the encoder, each used as given or loaded."""
        dataset = self.data if isinstance(self.data, LabelledImages) else load_dataset(self.data, self.classes)
        encoder = self.encoder
        if encoder is None:
            from ..encoders import load_encoder

            encoder = load_encoder(self.model, device=self.device, precision=self.precision)
        return dataset, encoder

    def head_path(self, name: str, dataset: LabelledImages) -> Path | None:
        """Where the head of ``name`` (method and variant) for ``dataset`` is saved (:func:`resolve_head_path`);
        None without ``save``."""
        return resolve_head_path(self.out, name, dataset, self.shots, self.seed, self.force) if self.save else None

    def prepare_task(self, encoder: Encoder, dataset: LabelledImages) -> FewShotTask:
        """Draw the shots, encode train/val/test and build the zero-shot head (:func:`~.task.prepare_task`)."""
        return prepare_task(encoder, dataset, self.shots, self.seed, self.templates, self.index_path, self.max_test,
                            progress=self.progress)
