"""CoOp (Zhou et al., IJCV 2022): learn the prompt's context words as vectors, through the frozen
text tower, against cached image embeddings.

A class prompt is ``[SOS] ctx_1 .. ctx_M CLASSNAME . [EOS]`` in token-embedding space (class
token at the ``end``; ``middle`` splits the context around it, ``front`` puts it first). The
context is one set of vectors for all classes (unified) or one per class
(``class_specific_context``), initialised randomly (N(0, 0.02), CoOp's default) or from the
token embeddings of a phrase such as ``"a photo of a"``. Training minimises cross-entropy of
``logit_scale * image @ text.T`` with the text tower frozen; the validation split picks the
step to keep (early stopping). Mirrors CoOp's ``trainers/coop.py`` (PromptLearner, TextEncoder).

The saved head holds the final class text weights, so predicting needs no text tower, plus the
learned context vectors (``ctx``) for inspection or re-use.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..encoders.base import Encoder
from ..errors import ClipxferError
from .base import FewShotData, fit_provenance, register_head
from .linear import val_score
from .zeroshot import ZeroShotHead

POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"


# --------------------------------------------------------------------------- text towers


class OpenClipTower:
    """open_clip's causal text transformer, run from token embeddings (a float32 copy, frozen,
    so a bf16 encoder stays untouched and gradients flow only to the context)."""

    def __init__(self, encoder: Encoder):
        model = encoder.model  # type: ignore[attr-defined]
        source = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        pool = getattr(source, "text_pool_type", getattr(source, "pool_type", None))
        if (
            source is None
            or not hasattr(source, "token_embedding")
            or getattr(source, "cls_emb", None) is not None
            or getattr(source, "use_pad_mask", False)
            or pool not in ("argmax", "eos", "last")
        ):
            raise ClipxferError(f"coop: the text tower of {encoder.id} is not supported (needs a CLIP-style causal text transformer)")
        parts = nn.Module()
        for name in ("token_embedding", "transformer", "ln_final"):
            setattr(parts, name, copy.deepcopy(getattr(source, name)))
        parts.positional_embedding = nn.Parameter(source.positional_embedding.detach().clone())
        projection = source.text_projection
        parts.text_projection = copy.deepcopy(projection) if isinstance(projection, nn.Module) else (
            None if projection is None else nn.Parameter(projection.detach().clone())
        )
        self.parts = parts.float().to(encoder.device).requires_grad_(False).eval()
        self.attn_mask = None if source.attn_mask is None else source.attn_mask.float().to(encoder.device)
        self.pool = pool
        self.eos_id = getattr(source, "text_eos_id", getattr(source, "eos_id", None))
        self.tokenizer = encoder.tokenizer  # type: ignore[attr-defined]
        self.device = encoder.device
        self.width = parts.token_embedding.weight.shape[1]

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(texts)).to(self.device)
        if self.attn_mask is not None:
            # Causal attention: positions after the last end token never reach a pooled one, so
            # dropping the padding changes nothing and saves most of a 77-token pass.
            ids = ids[:, : int((ids != 0).sum(dim=1).max())]
        return ids, (ids != 0).long()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.token_embedding(ids)

    def encode(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = embeddings + self.parts.positional_embedding[: embeddings.shape[1]]
        length = x.shape[1]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.parts.transformer(x, attn_mask=mask)
        x = self.parts.ln_final(x)
        if self.pool == "argmax":
            where = ids.argmax(dim=-1)
        elif self.pool == "eos":
            where = (ids == self.eos_id).int().argmax(dim=-1)
        else:
            where = torch.full((len(ids),), x.shape[1] - 1, device=x.device)
        x = x[torch.arange(len(x), device=x.device), where]
        projection = self.parts.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Module) else x @ projection
        return nn.functional.normalize(x, dim=-1)

    @contextlib.contextmanager
    def frozen(self):
        yield


class LiteTower:
    """The ``lite`` encoder's MiniLM, through its ``token_embeddings`` / ``encode_token_embeddings``."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.device = encoder.device
        self.width = encoder.text_model.get_input_embeddings().weight.shape[1]  # type: ignore[attr-defined]

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.encoder.tokenizer(list(texts), padding=True, return_tensors="pt").to(self.device)  # type: ignore[attr-defined]
        return batch["input_ids"], batch["attention_mask"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.token_embeddings(ids)  # type: ignore[attr-defined]

    def encode(self, embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_token_embeddings(embeddings, mask)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def frozen(self):
        """The encoder's own text model, frozen while CoOp trains (no weight gradients)."""
        params = list(self.encoder.text_model.parameters())  # type: ignore[attr-defined]
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, saved):
                p.requires_grad_(flag)


def text_tower(encoder: Encoder):
    """The trainable-prompt view of ``encoder``'s text tower."""
    if hasattr(encoder, "encode_token_embeddings"):
        return LiteTower(encoder)
    if hasattr(encoder, "model"):
        return OpenClipTower(encoder)
    raise ClipxferError(f"coop: no text tower to train through in {encoder.id}")


# --------------------------------------------------------------------------- prompts


class PromptLearner(nn.Module):
    """Class prompts with learnable context (CoOp's PromptLearner, for any :func:`text_tower`)."""

    def __init__(
        self,
        tower,
        classnames: Sequence[str],
        n_ctx: int,
        ctx_init: str | None,
        position: str,
        class_specific: bool,
        generator: torch.Generator,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ClipxferError(f"coop: class token position must be one of {', '.join(POSITIONS)}, not {position!r}")
        names = [name.replace("_", " ") for name in classnames]
        if isinstance(ctx_init, (np.ndarray, torch.Tensor)):
            # Learned context vectors (e.g. meta-trained, clipxfer.metalearn): their count sets n_ctx.
            vectors = torch.as_tensor(np.asarray(ctx_init), dtype=torch.float32).clone()
            n_ctx = vectors.shape[-2]
            if class_specific and vectors.dim() == 2:
                vectors = vectors.unsqueeze(0).repeat(len(names), 1, 1)
            prefix = " ".join([PLACEHOLDER] * n_ctx)
        elif ctx_init:
            init_ids, init_mask = tower.tokenize([ctx_init])
            n_ctx = int(init_mask.sum()) - 2  # without the start and end tokens
            with torch.no_grad():
                vectors = tower.embed(init_ids)[0, 1 : 1 + n_ctx].float().cpu()
            if class_specific:
                vectors = vectors.unsqueeze(0).repeat(len(names), 1, 1)
            prefix = ctx_init
        else:
            if n_ctx < 1:
                raise ClipxferError(f"coop: --n-ctx {n_ctx}: need at least one context vector")
            shape = (len(names), n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
            vectors = torch.randn(shape, generator=generator) * 0.02
            prefix = " ".join([PLACEHOLDER] * n_ctx)
        self.ctx = nn.Parameter(vectors.to(tower.device))
        self.n_ctx, self.position, self.class_specific = n_ctx, position, class_specific
        _, name_mask = tower.tokenize(names)
        self.name_lens = [int(n) - 2 for n in name_mask.sum(dim=1)]
        self.ids, self.mask = tower.tokenize([f"{prefix} {name}." for name in names])
        with torch.no_grad():
            self.register_buffer("token_embeddings", tower.embed(self.ids).float())

    def forward(self) -> torch.Tensor:
        """``(num_classes, seq_len, width)`` prompt embeddings."""
        frozen, n = self.token_embeddings, self.n_ctx
        count = frozen.shape[0]
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(count, -1, -1)
        prefix = frozen[:, :1]
        if self.position == "end":
            return torch.cat([prefix, ctx, frozen[:, 1 + n :]], dim=1)
        prompts, half = [], n // 2
        for i, length in enumerate(self.name_lens):
            name = frozen[i : i + 1, 1 + n : 1 + n + length]
            suffix = frozen[i : i + 1, 1 + n + length :]
            c = ctx[i : i + 1]
            if self.position == "middle":
                parts = [prefix[i : i + 1], c[:, :half], name, c[:, half:], suffix]
            else:
                parts = [prefix[i : i + 1], name, c, suffix]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0)


# --------------------------------------------------------------------------- training


class _PromptTraining:
    """The prompt learner with what training and scoring it need: the frozen text tower, the cached
    image embeddings on the tower's device and the logit scale."""

    def __init__(self, tower, learner: PromptLearner, data: FewShotData, scale: float):
        self.tower, self.learner, self.scale = tower, learner, scale
        self.device = tower.device
        self.train_x = torch.as_tensor(data.train.embeddings, device=self.device)
        self.train_y = torch.as_tensor(data.train_labels, device=self.device)
        self.val_x = torch.as_tensor(data.val.embeddings, device=self.device)
        self.val_labels = data.val_labels

    def class_text(self) -> torch.Tensor:
        """The class text embeddings the current context gives."""
        return self.tower.encode(self.learner(), self.learner.ids, self.learner.mask)

    def evaluate(self) -> tuple[tuple[float, float], np.ndarray, float]:
        """``(validation score, class text weights, training loss)`` of the current context."""
        with torch.no_grad():
            text = self.class_text()
            val_logits = (self.scale * self.val_x @ text.T).float().cpu().numpy()
            train_loss = nn.functional.cross_entropy(self.scale * self.train_x @ text.T, self.train_y).item()
        return val_score(val_logits, self.val_labels), text.float().cpu().numpy(), train_loss


@dataclass
class _Kept:
    """The step validation scored best (step 0: the starting context) and how training went."""

    score: tuple[float, float]
    text: np.ndarray
    ctx: torch.Tensor
    loss: float  # the training loss at the kept step
    initial_loss: float
    history: list[float]
    step: int = 0
    steps_run: int = 0


def _train_context(prompts: _PromptTraining, generator: torch.Generator, total: int, steps_per_epoch: int, lr: float,
                   batch_size: int, eval_every: int, patience: int, progress: bool, keep: str = "best") -> _Kept:
    """Up to ``total`` AdamW steps on the context, a fresh order of the training images each epoch;
    validation every ``eval_every`` steps keeps the best step and stops after ``patience`` stale scores
    (``keep="last"``: runs every step and keeps the last, scored but not chosen)."""
    learner = prompts.learner
    optimizer = torch.optim.AdamW([learner.ctx], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="coop", unit="step", file=sys.stderr)
    with prompts.tower.frozen():
        score, text, initial_loss = prompts.evaluate()
        ctx = learner.ctx.detach().cpu().clone()
        kept = _Kept(score, text, ctx, initial_loss, initial_loss, [round(initial_loss, 5)])
        stale = 0
        order = torch.randperm(len(prompts.train_x), generator=generator)
        for step in range(1, total + 1):
            kept.steps_run = step
            start = ((step - 1) % steps_per_epoch) * batch_size
            if start == 0 and step > 1:
                order = torch.randperm(len(prompts.train_x), generator=generator)
            batch = order[start : start + batch_size].to(prompts.device)
            logits = prompts.scale * prompts.train_x[batch] @ prompts.class_text().T
            loss = nn.functional.cross_entropy(logits, prompts.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if bar:
                bar.update(1)
            if step % eval_every == 0 or step == total:
                score, text, train_loss = prompts.evaluate()
                kept.history.append(round(train_loss, 5))
                if keep == "last" or score > kept.score:
                    kept.score, kept.text, kept.ctx, kept.step, kept.loss = (
                        score, text, learner.ctx.detach().cpu().clone(), step, train_loss)
                    stale = 0
                else:
                    stale += 1
                    if stale >= patience:
                        break
    if bar:
        bar.close()
    return kept


# --------------------------------------------------------------------------- the head


@register_head
class CoOpHead(ZeroShotHead):
    """A text classifier like the zero-shot head (logits = logit_scale * embeddings @
    class_weights.T), whose class weights come from learned prompt context instead of templates."""

    method = "coop"
    optional_tensors = {"ctx": None}  # the learned context; logits need only the class weights

    @classmethod
    def fit(
        cls,
        data: FewShotData,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: str = "end",
        class_specific_context: bool = False,
        max_steps: int = 200,
        epochs: int | None = None,
        lr: float = 2e-3,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int = 10,
        progress: bool = False,
        keep: str = "best",
    ) -> "CoOpHead":
        """Train the context on ``data.train`` (AdamW, cosine schedule, ``batch_size`` images a
        step, ``max_steps`` steps or ``epochs`` passes), scoring validation every ``eval_every``
        steps and stopping after ``patience`` scores without improvement; keeps the best step
        (``keep="last"``: every step runs and the last is kept)."""
        if keep not in ("best", "last"):
            raise ClipxferError(f"coop: keep must be 'best' or 'last', not {keep!r}")
        encoder = data.encoder
        tower = text_tower(encoder)
        generator = torch.Generator().manual_seed(data.seed)
        learner = PromptLearner(
            tower, data.classnames, n_ctx, ctx_init, class_token_position, class_specific_context, generator
        )
        scale = float(data.zeroshot.config.get("logit_scale", encoder.logit_scale))
        prompts = _PromptTraining(tower, learner, data, scale)
        steps_per_epoch = max(1, -(-len(prompts.train_x) // batch_size))
        total = epochs * steps_per_epoch if epochs else max_steps
        kept = _train_context(prompts, generator, total, steps_per_epoch, lr, batch_size, eval_every, patience,
                              progress, keep)
        config = {
            "variant": "coop",
            "n_ctx": learner.n_ctx,
            "ctx_init": ctx_init if isinstance(ctx_init, str) else ("vectors" if ctx_init is not None else ""),
            "class_token_position": class_token_position,
            "class_specific_context": class_specific_context,
            "logit_scale": scale,
            "lr": lr,
            "batch_size": batch_size,
            "max_steps": total,
            "steps_run": kept.steps_run,
            "best_step": kept.step,
            "eval_every": eval_every,
            "patience": patience,
            "keep": keep,
            "train_loss_initial": kept.initial_loss,
            "train_loss_final": kept.loss,
            "train_loss_history": kept.history,
            **fit_provenance(data),
            "val_accuracy": kept.score[0],
            "val_loss": -kept.score[1],
        }
        weights = {"class_weights": kept.text, "ctx": kept.ctx.float().numpy()}
        return cls(encoder.id, data.classnames, weights, config)
