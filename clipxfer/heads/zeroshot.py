"""Zero-shot head: one text embedding per class, averaged over prompt templates and descriptions.

The class weights are cached on disk per (model id, precision, class names, templates,
descriptions), so a 1000-class x 80-template head is encoded once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load, save

from ..datasets.prompts import description_texts, load_templates, prompt_name
from ..encoders.base import Encoder, ImageEncoding
from ..paths import atomic_write_bytes, cache_dir
from ..vector_math import l2_normalize
from .base import FewShotData, Head, register_head

#: Prompts encoded per call; bounds memory and paces the progress bar.
TEXT_CHUNK = 2048
#: Bump when the way prompts are written changes, so old cache entries are not reused.
CACHE_VERSION = 1


def class_prompts(
    classnames: Sequence[str], templates: Sequence[str], descriptions: dict[str, list[str]] | None = None
) -> tuple[list[str], np.ndarray]:
    """Every prompt of every class (templates filled in, then the class's descriptions) and the
    class index of each prompt."""
    prompts, owners = [], []
    for index, name in enumerate(classnames):
        texts = [template.format(prompt_name(name)) for template in templates] + description_texts(name, descriptions)
        prompts.extend(texts)
        owners.extend([index] * len(texts))
    return prompts, np.asarray(owners, dtype=np.int64)


def mean_by_class(embeddings: np.ndarray, owners: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the renormalised mean of its (normalised) prompt embeddings."""
    sums = np.zeros((num_classes, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, embeddings)
    counts = np.bincount(owners, minlength=num_classes)[:, None]
    return l2_normalize(sums / counts)


def text_weights_key(
    encoder: Encoder, classnames: Sequence[str], templates: Sequence[str], descriptions: dict[str, list[str]] | None
) -> str:
    """Cache key: what decides the weights. The precision is in it because bf16 text towers differ."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "model": encoder.id,
            "dtype": str(getattr(encoder, "dtype", "")),
            "classes": list(classnames),
            "templates": list(templates),
            "descriptions": {k: list(v) for k, v in sorted((descriptions or {}).items())},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def text_weights_path(key: str) -> Path:
    return cache_dir() / "text_weights" / f"{key}.safetensors"


def class_text_weights(
    encoder: Encoder,
    classnames: Sequence[str],
    templates: Sequence[str],
    descriptions: dict[str, list[str]] | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """``(num_classes, dim)``: per class, the renormalised mean of the normalised embeddings of its
    prompts, i.e. every template filled with the class name plus the class's descriptions (CLIP's
    prompt ensembling, CuPL when descriptions are given). Without descriptions this equals
    open_clip's ``build_zero_shot_classifier``; class names are written with ``_`` as spaces."""
    key = text_weights_key(encoder, classnames, templates, descriptions)
    path = text_weights_path(key)
    if use_cache and path.is_file():
        try:
            weights = load(path.read_bytes())["class_weights"]
            if weights.shape == (len(classnames), encoder.dim):
                return weights
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    prompts, owners = class_prompts(classnames, templates, descriptions)
    embeddings = _encode_texts(encoder, prompts, progress)
    weights = mean_by_class(embeddings, owners, len(classnames))
    if use_cache:
        metadata = {"model_id": encoder.id, "classes": str(len(classnames)), "prompts": str(len(prompts))}
        atomic_write_bytes(path, save({"class_weights": weights}, metadata=metadata))
    return weights


def _encode_texts(encoder: Encoder, prompts: list[str], progress: bool) -> np.ndarray:
    if len(prompts) <= TEXT_CHUNK:  # too quick to deserve a progress bar
        return encoder.encode_texts(prompts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="encoding prompts", unit="prompt", file=sys.stderr)
    parts = []
    for start in range(0, len(prompts), TEXT_CHUNK):
        parts.append(encoder.encode_texts(prompts[start : start + TEXT_CHUNK]))
        if bar:
            bar.update(len(parts[-1]))
    if bar:
        bar.close()
    return np.concatenate(parts)


@register_head
class ZeroShotHead(Head):
    """logits = logit_scale * embeddings @ class_weights.T

    Config: ``templates`` (list), ``logit_scale``, and ``descriptions`` (class -> sentences) when
    descriptions were averaged in.
    """

    method = "zeroshot"
    required_tensors = {"class_weights": ("C", "E")}
    required_config = ("logit_scale",)

    @property
    def class_weights(self) -> np.ndarray:
        return self.weights["class_weights"]

    def logits(self, encoding: ImageEncoding) -> np.ndarray:
        return self.config["logit_scale"] * encoding.embeddings @ self.class_weights.T

    @classmethod
    def fit(cls, data: FewShotData, **options: Any) -> "ZeroShotHead":
        """The zero-shot head of ``data``'s classes; it ignores the training images, so the bench can
        run zero-shot like any method. With no options this is ``data.zeroshot``; ``templates`` (a set
        name, a file, or a list) and ``descriptions`` (class -> sentences) rebuild it."""
        unknown = set(options) - {"templates", "descriptions"}
        if unknown:
            raise TypeError(f"ZeroShotHead.fit: unknown option(s) {', '.join(sorted(unknown))}")
        if not options and isinstance(data.zeroshot, ZeroShotHead):
            return data.zeroshot
        templates = options.get("templates")
        if templates is None:
            templates = data.zeroshot.config.get("templates") if data.zeroshot is not None else None
        if templates is None:
            templates = "simple"
        if isinstance(templates, str):
            templates = load_templates(templates)
        return fit_zeroshot(data.encoder, data.classnames, templates, options.get("descriptions"))


def fit_zeroshot(
    encoder: Encoder,
    classnames: Sequence[str],
    templates: Sequence[str],
    descriptions: dict[str, list[str]] | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> ZeroShotHead:
    """Build the zero-shot head for ``classnames`` from prompt ``templates`` and optional per-class
    ``descriptions``; the text weights come from the disk cache when this exact head was built before."""
    weights = class_text_weights(encoder, classnames, templates, descriptions, use_cache=use_cache, progress=progress)
    config: dict[str, Any] = {"templates": list(templates), "logit_scale": encoder.logit_scale}
    if descriptions:
        config["descriptions"] = {name: list(sentences) for name, sentences in descriptions.items()}
    return ZeroShotHead(encoder.id, list(classnames), {"class_weights": weights}, config)
