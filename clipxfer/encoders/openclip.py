"""The open_clip backend: any open_clip model with pretrained weights, hf-hub names, local
checkpoints, and random-initialised models (``tiny`` for tests, ``MODEL:random`` for benchmarks)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch

from ..device import choose_device, choose_precision
from ..errors import ClipxferError
from ..vector_math import l2_normalize
from .base import Encoder
from .catalog import cached_weights, hf_hub_model_cached
from .ids import OPEN_CLIP_PREFIX, RANDOM_SEED, RANDOM_TAG

CONFIG_DIR = Path(__file__).parent / "configs"

open_clip.add_model_config(CONFIG_DIR)


class MissingWeightsError(ClipxferError):
    """Pretrained weights are neither cached nor downloadable."""


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when the Hugging Face hub answers a TCP connect within two seconds.

    Asked once per process, so an offline machine fails in milliseconds instead of after
    huggingface_hub's minute of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub use its cache without asking the network for newer revisions."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _missing_weights_message(what: str) -> str:
    return (
        f"the weights for {what} are not in the local cache and cannot be downloaded (no network). "
        "Run once where the network is reachable so open_clip caches them (Hugging Face cache, "
        "~/.cache/huggingface), copy that cache here, or pass a local checkpoint as MODEL:/path/to/weights.pt; "
        "to work fully offline use --model lite (the bundled offline encoder, far weaker than CLIP) "
        "or --model tiny (random weights, for tests)."
    )


def _file_id(path: Path) -> str:
    """Content hash of a checkpoint, so the id survives the file being moved."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "file-" + digest.hexdigest()[:16]


def _load_checkpoint(model_name: str, path: Path) -> torch.nn.Module:
    """``model_name`` with the weights in ``path``; a file that is not such a checkpoint (a
    pickle with code in it, garbage, another architecture's weights) is one ClipxferError.
    open_clip reads checkpoints with ``weights_only``, so nothing in the file is executed."""
    try:
        return open_clip.create_model(model_name, pretrained=str(path))
    except Exception as exc:  # torch and open_clip raise many kinds for a bad file
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        first = next((line.strip() for line in lines if line.strip()), type(exc).__name__)
        raise ClipxferError(
            f"{path}: not a usable {model_name} checkpoint ({type(exc).__name__}: {first[:200]}); "
            f"give a state dict saved from a {model_name} model, or another --model"
        ) from None


class OpenClipEncoder(Encoder):
    """An open_clip model.

    ``pretrained`` is an open_clip tag (``laion2b_s34b_b79k``), a path to a checkpoint, ``random``
    (random init from a fixed seed) or None for an ``hf-hub:`` model name.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: str | None = None,
        precision: str | None = None,
    ):
        self.device = choose_device(device)
        self.dtype = choose_precision(self.device, precision)
        self.model_name = model_name
        self.pretrained = pretrained
        model = self._create_model(model_name, pretrained)
        model = model.eval().to(self.device, dtype=self.dtype)
        self.model = model.to(memory_format=torch.channels_last)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        size = preprocess.get("size", model.visual.image_size)
        self.input_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self.dim = self.feature_dim = int(self._embed_dim())
        self.logit_scale = float(model.logit_scale.exp().float().item())

    def _embed_dim(self) -> int:
        with torch.inference_mode():
            probe = self.tokenizer(["a"]).to(self.device)
            return self.model.encode_text(probe).shape[-1]

    def _create_model(self, model_name: str, pretrained: str | None) -> torch.nn.Module:
        if model_name.startswith("hf-hub:"):
            self.id = f"{OPEN_CLIP_PREFIX}{model_name}"
            repo_id = model_name[len("hf-hub:"):]
            cached = hf_hub_model_cached(repo_id)
            if not cached and not hub_reachable():
                raise MissingWeightsError(_missing_weights_message(model_name))
            with _hub_offline() if cached else contextlib.nullcontext():
                return open_clip.create_model(model_name)
        if pretrained in (None, RANDOM_TAG):
            self.id = f"{OPEN_CLIP_PREFIX}{model_name}:{RANDOM_TAG}-seed{RANDOM_SEED}"
            # Random init from a fixed seed, without disturbing the caller's random state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                return open_clip.create_model(model_name, pretrained=None)
        if Path(pretrained).expanduser().is_file():
            path = Path(pretrained).expanduser()
            self.id = f"{OPEN_CLIP_PREFIX}{model_name}:{_file_id(path)}"
            return _load_checkpoint(model_name, path)
        self.id = f"{OPEN_CLIP_PREFIX}{model_name}:{pretrained}"
        weights = cached_weights(model_name, pretrained)
        if weights is None:
            if not hub_reachable():
                raise MissingWeightsError(_missing_weights_message(f"'{model_name}:{pretrained}'"))
            return open_clip.create_model(model_name, pretrained=pretrained)
        return open_clip.create_model(model_name, pretrained=weights)

    def _forward_images(self, pixels: torch.Tensor):
        return self.model.encode_image(pixels), None

    def image_graph(self) -> torch.nn.Module:
        return self.model.visual  # what encode_image runs (it normalises only when asked)

    def _forward_patches(self, pixels: torch.Tensor):
        visual = self.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise ClipxferError(f"model {self.id}: dense patch features need an open_clip ViT (CLIP-style, no attention pooling)")
        depth = len(visual.transformer.resblocks)
        # Middle blocks hold local structure; the last block's tokens, through ln_post and the
        # projection, land in the text space (WinCLIP's dense zero-shot features).
        middle = sorted({max(depth // 2 - 1, 0), max(3 * depth // 4 - 1, 0)})
        out = visual.forward_intermediates(
            pixels, indices=sorted({*middle, depth - 1}), normalize_intermediates=True, output_fmt="NCHW",
            intermediates_only=True,
        )
        chosen = dict(zip(sorted({*middle, depth - 1}), out["image_intermediates"]))
        last = chosen[depth - 1]
        joint = last.permute(0, 2, 3, 1) @ visual.proj if visual.proj is not None else last.permute(0, 2, 3, 1)
        return [chosen[i] for i in middle], joint.permute(0, 3, 1, 2)

    def _trims_padding(self) -> bool:
        """True for CLIP's own text tower: causal attention pooled at the end token, where the
        padding after the longest prompt of a batch cannot change any pooled output."""
        model = self.model
        return (
            isinstance(model, open_clip.CLIP)
            and model.attn_mask is not None
            and getattr(model, "text_pool_type", None) == "argmax"
        )

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text`` for a batch, run only up to its longest prompt when that is exact.

        Prompts are mostly far shorter than the 77-token context: an 80-template ensemble
        averages about 12 tokens, so this skips most of the text transformer's work.
        """
        if not self._trims_padding():
            return self.model.encode_text(tokens)
        model = self.model
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return x

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        # Longest first, so each batch holds prompts of similar length and trims the most padding.
        order = np.argsort(-(tokens != 0).sum(dim=1).numpy(), kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokens[torch.from_numpy(rows)].to(self.device)
            out[rows] = self._encode_tokens(batch).float().cpu().numpy()
        return l2_normalize(out)
