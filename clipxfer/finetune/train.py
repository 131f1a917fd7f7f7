"""Fine-tuning the image tower on a few labelled images: ``top`` (the default), LP-FT, partial,
full and LoRA, with augmentation, frozen BatchNorm statistics, L2-SP, early stopping and WiSE-FT.

``top`` (the default; chosen on held-out training-pool images of Fashion-MNIST with ``lite``,
benchmarks/RESULTS.md, never on the test split):

- Why the top: a probe on lite's last stage output (320-d, before ``conv_head``) beats the probe on
  the 1280-d features after ``conv_head`` + BatchNorm + ReLU6 (dev accuracy 0.830 / 0.800 / 0.762
  against 0.812 / 0.794 / 0.724 over three 16-shot draws): the ImageNet-tuned top throws away what
  grayscale garments need. ``top`` moves the last block and the layers after it (``conv_head``,
  ``bn2``; for a ViT the last residual block, ``ln_post``, ``proj``), nothing else.
- It trains on ALL labelled images (training and validation split together, ``fit_on="all"``)
  for a fixed 10 epochs at lr 1e-3 (head 1e-2), no L2-SP, the last epoch kept, no WiSE (alpha 1),
  milder crops than the other methods (area 0.8-1: 0.810 dev accuracy against 0.799 with 0.6-1 and 0.799
  without crops).
  Selecting epochs or alpha on 4 validation images per class was a coin toss that always returned
  the probe; fixed settings chosen on 500 held-out training-pool images per draw are not, and
  the validation images are worth more as training images (20 instead of 16 per class).
- The head is then refitted (``head="refit"``): L-BFGS logistic regression (as the probe,
  :func:`clipxfer.heads.probe.fit_logistic`) on the adapted features of all labelled images with a
  fixed L2 of ``refit_l2``, rather than keeping the head SGD trained along the tower.

The other methods (each ``None`` setting takes :data:`GENERIC`'s value; ``top`` its own, :data:`RECIPES`):

- The head is linear on the encoder's outputs (:mod:`clipxfer.heads.linear`) and starts from the
  linear probe fitted on the pretrained features (LP-FT, Kumar et al. 2022), or from the zero-shot
  head for ``full``; it trains with a learning rate ``head_lr_scale`` times the backbone's.
- Which parameters move: everything but the ConSE / text side (``lp-ft``, ``full``), the last
  ``blocks`` stages (``partial``), or rank-``lora_rank`` LoRA factors on those stages' linear and
  1x1-conv layers (``lora``, via ``peft``).
- The module stays in eval mode, so BatchNorm keeps its pretrained statistics and dropout is off.
  (Re-estimating the statistics on the few-shot images, AdaBN, was measured and costs accuracy:
  16-shot dev accuracy 0.742-0.758 against 0.812 for the probe, RESULTS.md.)
- L2-SP (Li et al. 2018): ``l2sp * sum ||w - w0||^2`` keeps the moving weights near the start.
- Augmentation per image (random resized crop, flip, small brightness/contrast jitter), off with
  ``augment=False`` for tasks where a flip or crop changes the label.
- After every epoch the validation split is scored; the best epoch's weights are kept (epoch 0
  is the starting point, so fine-tuning never returns something validation finds worse).
- WiSE-FT (Wortsman et al. 2022): the kept weights are interpolated with the starting ones,
  ``w0 + alpha (w - w0)`` for the tower and the head alike; ``alpha`` given, or ``auto``:
  the best of a grid on validation. ``alpha = 0`` gives back the pretrained tower exactly.

Ctrl-C during training stops it and keeps the best epoch so far (``interrupted`` in the result).
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.adapter import apply_tensors, run_in_torch, trainable_root
from ..encoders.base import Encoder
from ..encoders.ids import ENCODER_PREFIX, LORA_PREFIX
from ..errors import ClipxferError
from ..extras import import_extra
from ..heads.base import FewShotData
from ..heads.linear import PARTS, cross_entropy, zeroshot_parts
from ..images import ImageLike, load_model_input

METHODS = ("top", "lp-ft", "partial", "full", "lora")
#: The settings a method takes when not given (``None``): :data:`GENERIC`, updated by the method's
#: own entry in :data:`RECIPES` (see the module docstring for why ``top`` differs).
GENERIC = {"epochs": 12, "lr": 1e-4, "l2sp": 0.01, "blocks": 2, "crop_scale": 0.6, "keep": "best", "wise": "auto",
           "fit_on": "train", "head": "trained"}
RECIPES = {
    "top": {"epochs": 10, "lr": 1e-3, "l2sp": 0.0, "blocks": 1, "crop_scale": 0.8, "keep": "last", "wise": 1.0,
            "fit_on": "all", "head": "refit"},
}
#: alpha values tried by ``wise="auto"``.
WISE_GRID = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))


@dataclass
class FinetuneSettings:
    """Hyperparameters of one fine-tune. ``None`` means the method's recipe (:data:`RECIPES`,
    else :data:`GENERIC`), filled in by :meth:`check`."""

    strategy: str = "top"
    epochs: int | None = None
    lr: float | None = None
    head_lr_scale: float = 10.0
    weight_decay: float = 0.0
    l2sp: float | None = None
    batch_size: int = 32
    blocks: int | None = None
    lora_rank: int = 2
    lora_alpha: float = 4.0
    augment: bool = True
    crop_scale: float | None = None
    label_smoothing: float = 0.1
    patience: int = 4
    #: ``best``: keep the epoch validation scores best (early stopping); ``last``: the last epoch.
    keep: str | None = None
    wise: str | float | None = None
    #: ``train``: train on the training split, choose on validation; ``all``: train on both
    #: splits (nothing is left to choose by: the last epoch, a given WiSE alpha).
    fit_on: str | None = None
    #: ``trained``: the head trained with the tower; ``refit``: an L-BFGS probe on the adapted
    #: features of the training images (all labelled images with ``fit_on="all"``), L2 ``refit_l2``.
    head: str | None = None
    refit_l2: float = 1e-3

    def check(self) -> "FinetuneSettings":
        """Fill the method's recipe into unset fields; raise ClipxferError on the first bad value."""
        if self.strategy not in METHODS:
            raise ClipxferError(f"--method {self.strategy}: use one of {', '.join(METHODS)}")
        recipe = {**GENERIC, **RECIPES.get(self.strategy, {})}
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.epochs < 0:
            raise ClipxferError(f"--epochs {self.epochs}: must be 0 or more")
        if not self.lr > 0:
            raise ClipxferError(f"--lr {self.lr}: must be positive")
        if self.wise != "auto":
            try:
                self.wise = float(self.wise)
            except ValueError:
                raise ClipxferError(f"--wise {self.wise}: a number in [0, 1] or auto") from None
            if not 0.0 <= self.wise <= 1.0:
                raise ClipxferError(f"--wise {self.wise}: a number in [0, 1] or auto")
        if self.keep not in ("best", "last"):
            raise ClipxferError(f"keep={self.keep!r}: use best or last")
        if self.blocks < 1:
            raise ClipxferError(f"--blocks {self.blocks}: at least 1")
        if self.fit_on not in ("train", "all"):
            raise ClipxferError(f"fit_on={self.fit_on!r}: use train or all")
        if self.head not in ("trained", "refit"):
            raise ClipxferError(f"head={self.head!r}: use trained or refit")
        if self.fit_on == "all" and self.wise == "auto":
            raise ClipxferError(f"--wise auto chooses on validation images, which --method {self.strategy} trains on: "
                                "give --wise a number")
        if not self.refit_l2 > 0:
            raise ClipxferError(f"refit_l2={self.refit_l2}: must be positive")
        return self


def make_settings(**options) -> FinetuneSettings:
    """:class:`FinetuneSettings` from keyword options, checked; unknown names are one clear error."""
    unknown = set(options) - set(FinetuneSettings.__dataclass_fields__)
    if unknown:
        known = ", ".join(FinetuneSettings.__dataclass_fields__)
        raise ClipxferError(f"finetune: unknown option(s) {', '.join(sorted(unknown))} (known: {known})")
    return FinetuneSettings(**options).check()


@dataclass
class FinetuneResult:
    """What :func:`finetune_encoder` returns: the adapter tensors (encoder part and head parts),
    the adapted encoder, and how training went."""

    tensors: dict[str, np.ndarray]
    encoder: Encoder
    settings: FinetuneSettings
    best_epoch: int
    epochs_run: int
    alpha: float
    val_accuracy: float
    val_loss: float
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False


# --------------------------------------------------------------------------- parameters


def _units(names: Sequence[str]) -> list[str]:
    """The ordered block prefixes of a tower: timm EfficientNet stages (``blocks.N``) or ViT
    residual blocks (``visual.transformer.resblocks.N``)."""
    units: list[str] = []
    for name in names:
        match = re.match(r"(blocks\.\d+|visual\.transformer\.resblocks\.\d+)\.", name)
        if match and match.group(1) not in units:
            units.append(match.group(1))
    return units


def _is_tower(name: str, attribute: str) -> bool:
    """Parameters of the image tower proper: not lite's ConSE ImageNet classifier, not CLIP's text side."""
    if attribute == "model":
        return name.startswith("visual.")
    return not name.startswith("classifier.")


def _is_top(name: str) -> bool:
    """Layers after the last block, which ``partial`` and ``lora`` always move."""
    return name.startswith(("conv_head.", "bn2.", "visual.ln_post.", "visual.proj"))


def moving_parameters(root: torch.nn.Module, attribute: str, settings: FinetuneSettings) -> list[str]:
    """Names (relative to ``root``) of the parameters the method trains directly (none for LoRA)."""
    names = [n for n, _ in root.named_parameters() if _is_tower(n, attribute)]
    if settings.strategy in ("lp-ft", "full"):
        return names
    if settings.strategy == "lora":
        return []
    last = _units(names)[-settings.blocks :]  # partial and top
    return [n for n in names if _is_top(n) or any(n.startswith(u + ".") for u in last)]


def lora_targets(root: torch.nn.Module, attribute: str, settings: FinetuneSettings) -> list[str]:
    """Module names LoRA adapts in the last ``blocks`` blocks: the Linear and 1x1 Conv2d layers
    (EfficientNet's pointwise convolutions; a ViT's MLP projections) and a ViT's attention.

    ``nn.MultiheadAttention`` reads its projection weights directly instead of calling Linear
    layers, so it is targeted whole: peft's LoRA for it adapts the packed query/key/value
    projection (CLIP-LoRA's places, see :func:`_inject_lora`), and its ``out_proj`` is not
    targeted on its own (an adapter there would never run)."""
    names = [n for n, _ in root.named_parameters() if _is_tower(n, attribute)]
    last = _units(names)[-settings.blocks :]
    attention = {n for n, m in root.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    inside_attention = {f"{n}.out_proj" for n in attention}
    targets = []
    for name, module in root.named_modules():
        inside = any(name.startswith(u + ".") for u in last) or name in ("conv_head",)
        if not inside or name in inside_attention:
            continue
        if name in attention or isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        ):
            targets.append(name)
    if not targets:
        raise ClipxferError(f"--method lora: no Linear, attention or 1x1 conv layers found in the last {settings.blocks} blocks")
    return targets


def _inject_lora(root: torch.nn.Module, targets: list[str], settings: FinetuneSettings) -> dict[str, torch.nn.Module]:
    """Add LoRA layers with peft; returns ``{target name: peft LoRA layer}``."""
    import_extra("peft", "finetune", "--method lora")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, root)
    layers = {name: module for name, module in root.named_modules() if isinstance(module, LoraLayer)}
    # peft adapts an attention's output projection together with its query/key/value projection,
    # and peft 0.21 adds the output projection's delta twice in the forward pass. As in CLIP-LoRA's
    # default, only q, k and v move: the output projection's factors stay zero and frozen.
    output_projections = {name for name in layers if name.endswith(".base_layer.out_proj")}
    for name, param in root.named_parameters():
        param.requires_grad_("lora_" in name and not any(name.startswith(p + ".") for p in output_projections))
    return {name: layer for name, layer in layers.items() if name not in output_projections}


def lora_factors(layers: dict[str, torch.nn.Module], attribute: str, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """LoRA factors as adapter tensors, scaling (and WiSE ``alpha``) folded into ``B``."""
    out = {}
    for wrapped_name, layer in layers.items():
        # peft nests the wrapped module as ``base_layer``; the adapter names the plain model's module.
        name = wrapped_name.replace(".base_layer", "")
        a = layer.lora_A["default"].weight.detach().float()
        b = layer.lora_B["default"].weight.detach().float() * (layer.scaling["default"] * alpha)
        out[f"{LORA_PREFIX}{attribute}.{name}.A"] = a.cpu().numpy()
        out[f"{LORA_PREFIX}{attribute}.{name}.B"] = b.cpu().numpy()
    return out


# --------------------------------------------------------------------------- data


def decode_pixels(images: Sequence[ImageLike], size: int) -> np.ndarray:
    """Images decoded once to ``uint8 (n, size, size, 3)``: every epoch augments these."""
    return np.stack([load_model_input(item, size) for item in images])


def augment_batch(pixels: np.ndarray, generator: torch.Generator, crop_scale: float) -> torch.Tensor:
    """Per image: random resized crop (area ``crop_scale``..1, aspect 3/4..4/3), horizontal flip,
    brightness and contrast jitter of +-10%; ``uint8 (n, s, s, 3)`` in and out."""
    batch = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    n, _, height, width = batch.shape
    out = torch.empty_like(batch)
    for i in range(n):
        draw = torch.rand(6, generator=generator).tolist()
        area = (crop_scale + (1 - crop_scale) * draw[0]) * height * width
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draw[1])
        h = min(height, int(round(math.sqrt(area / aspect))))
        w = min(width, int(round(math.sqrt(area * aspect))))
        top, left = int(draw[2] * (height - h)), int(draw[3] * (width - w))
        crop = batch[i : i + 1, :, top : top + h, left : left + w]
        image = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
        if draw[4] < 0.5:
            image = image.flip(-1)
        mean = image.mean()
        contrast = 1 + 0.2 * (torch.rand(1, generator=generator).item() - 0.5)
        brightness = 1 + 0.2 * (draw[5] - 0.5)
        out[i] = ((image - mean) * contrast + mean) * brightness
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- model


def working_copy(encoder: Encoder) -> tuple[Encoder, str, torch.nn.Module]:
    """A float32 copy of ``encoder`` whose image tower can be trained; ``encoder`` is untouched."""
    attribute, root = trainable_root(encoder)
    # The original's compiled runtime holds the original weights; the working copy's must be seen.
    work = run_in_torch(copy.copy(encoder))
    module = copy.deepcopy(root).float().eval()
    setattr(work, attribute, module)
    work.dtype = torch.float32
    work.precision = "fp32"
    for param in module.parameters():
        param.requires_grad_(False)
    return work, attribute, module


def adapted_copy(encoder: Encoder, tensors: dict[str, np.ndarray], model_id: str) -> Encoder:
    """A copy of ``encoder`` (same device and precision) with the adapter tensors applied."""
    attribute, root = trainable_root(encoder)
    adapted = copy.copy(encoder)
    setattr(adapted, attribute, copy.deepcopy(root))
    apply_tensors(adapted, tensors)
    adapted.id = model_id
    return adapted


def head_logits(head: dict[str, torch.Tensor], embeddings: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """:func:`clipxfer.heads.linear.linear_logits` in torch, on raw tower outputs."""
    embeddings = F.normalize(embeddings.float(), dim=-1)
    features = embeddings if features is None else F.normalize(features.float(), dim=-1)
    logits = 0
    if "embedding_weights" in head:
        logits = logits + embeddings @ head["embedding_weights"].T
    if "feature_weights" in head:
        logits = logits + features @ head["feature_weights"].T
    if "bias" in head:
        logits = logits + head["bias"]
    return logits


def forward_logits(work: Encoder, head: dict[str, torch.Tensor], pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Class logits of a uint8 batch through the working tower and head."""
    embeddings, features = work._forward_images(work.pixels_to_tensor(pixels))
    return head_logits(head, embeddings, features)


@torch.no_grad()
def evaluate(work: Encoder, head: dict[str, torch.Tensor], pixels: np.ndarray, labels: np.ndarray,
             batch_size: int = 64) -> tuple[float, float]:
    """``(accuracy, cross-entropy)`` on a labelled uint8 set."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    logits = torch.cat([forward_logits(work, head, pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])
    logits = logits.numpy().astype(np.float64)
    return float((logits.argmax(1) == labels).mean()), cross_entropy(logits, labels)


def start_head(data: FewShotData, settings: FinetuneSettings) -> dict[str, np.ndarray]:
    """The head fine-tuning starts from: the validated linear probe (LP-FT), or zero-shot for ``full``."""
    if settings.strategy == "full":
        parts = dict(zeroshot_parts(data.zeroshot))
        parts["bias"] = np.zeros(len(data.classnames), np.float32)
        return parts
    from ..heads.probe import ProbeHead

    probe = ProbeHead.fit(data)
    return {name: value for name, value in probe.weights.items() if name in PARTS}


# --------------------------------------------------------------------------- training


def finetune_encoder(
    data: FewShotData,
    train_images: Sequence[ImageLike],
    val_images: Sequence[ImageLike],
    settings: FinetuneSettings | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``data.encoder``'s image tower on ``train_images`` (labels ``data.train_labels``),
    choosing the epoch and the WiSE alpha on ``val_images``; see the module docstring."""
    settings = (settings or FinetuneSettings()).check()
    if len(train_images) != len(data.train_labels) or len(val_images) != len(data.val_labels):
        raise ClipxferError("finetune: the images and labels of the training or validation split differ in number")
    torch.manual_seed(data.seed)
    generator = torch.Generator().manual_seed(data.seed)
    encoder = data.encoder
    work, attribute, root = working_copy(encoder)
    train_px = decode_pixels(train_images, encoder.input_size)
    val_px = decode_pixels(val_images, encoder.input_size) if len(val_images) else train_px[:0]
    train_labels = torch.as_tensor(data.train_labels, dtype=torch.long)
    val_labels = np.asarray(data.val_labels)
    if settings.fit_on == "all":  # the validation images become training images
        train_px = np.concatenate([train_px, val_px])
        train_labels = torch.cat([train_labels, torch.as_tensor(val_labels, dtype=torch.long)])
        val_px, val_labels = train_px[:0], val_labels[:0]

    head0 = {k: torch.tensor(v, dtype=torch.float32) for k, v in start_head(data, settings).items()}
    head = {k: v.clone().requires_grad_(True) for k, v in head0.items()}
    moving = moving_parameters(root, attribute, settings)
    layers: dict[str, torch.nn.Module] = {}
    if settings.strategy == "lora":
        layers = _inject_lora(root, lora_targets(root, attribute, settings), settings)
        tower_params = [p for p in root.parameters() if p.requires_grad]
    else:
        tower_params = [root.get_parameter(n).requires_grad_(True) for n in moving]
    start = {n: root.get_parameter(n).detach().clone() for n in moving}

    def snapshot() -> dict:
        return {
            "head": {k: v.detach().clone() for k, v in head.items()},
            "tower": {n: root.get_parameter(n).detach().clone() for n in moving},
            "lora": {n: p.detach().clone() for n, p in root.named_parameters() if "lora_" in n},
        }

    def restore(state: dict) -> None:
        with torch.no_grad():
            for k, v in state["head"].items():
                head[k].copy_(v)
            for n, v in state["tower"].items():
                root.get_parameter(n).copy_(v)
            for n, p in root.named_parameters():
                if n in state["lora"]:
                    p.copy_(state["lora"][n])

    optimizer = torch.optim.AdamW(
        [
            {"params": tower_params, "lr": settings.lr, "weight_decay": settings.weight_decay},
            {"params": list(head.values()), "lr": settings.lr * settings.head_lr_scale, "weight_decay": 0.0},
        ]
    )
    steps_per_epoch = max(1, math.ceil(len(train_px) / settings.batch_size))
    total = max(1, settings.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))

    val_acc, val_loss = evaluate(work, head, val_px, val_labels)
    history = [{"epoch": 0, "train_loss": float("nan"), "val_accuracy": val_acc, "val_loss": val_loss}]
    best_key, best_epoch, best_state = (val_acc, -val_loss), 0, snapshot()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.epochs, desc=f"finetune {settings.strategy}", unit="epoch", file=sys.stderr)
        if len(val_labels):
            bar.set_postfix_str(f"val_acc {val_acc:.3f}")
    interrupted, epoch = False, 0
    try:
        for epoch in range(1, settings.epochs + 1):
            order = torch.randperm(len(train_px), generator=generator).numpy()
            losses = []
            for step in range(steps_per_epoch):
                rows = order[step * settings.batch_size : (step + 1) * settings.batch_size]
                batch = augment_batch(train_px[rows], generator, settings.crop_scale) if settings.augment else train_px[rows]
                logits = forward_logits(work, head, batch)
                loss = F.cross_entropy(logits, train_labels[rows], label_smoothing=settings.label_smoothing)
                if settings.l2sp and moving:
                    drift = sum((root.get_parameter(n) - w0).pow(2).sum() for n, w0 in start.items())
                    loss = loss + settings.l2sp * drift
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
            val_acc, val_loss = evaluate(work, head, val_px, val_labels)
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_acc, "val_loss": val_loss}
            history.append(record)
            # Without validation images there is nothing to choose by: keep the last epoch.
            if (val_acc, -val_loss) > best_key or settings.keep == "last" or not len(val_labels):
                best_key, best_epoch, best_state = (val_acc, -val_loss), epoch, snapshot()
            if bar:
                bar.update()
                shown = f" val_acc {val_acc:.3f} best {best_key[0]:.3f}@{best_epoch}" if len(val_labels) else ""
                bar.set_postfix_str(f"loss {record['train_loss']:.3f}{shown}")
            if on_epoch:
                on_epoch(record)
            if settings.keep == "best" and epoch - best_epoch >= settings.patience:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar:
            bar.close()
    restore(best_state)

    alpha, val_acc, val_loss = _choose_alpha(work, root, head, head0, start, layers, settings, val_px, val_labels,
                                             best_key, interrupted)
    if settings.head == "refit":
        refit_head(work, head, train_px, train_labels.numpy(), len(data.classnames), settings.refit_l2)
        val_acc, val_loss = evaluate(work, head, val_px, val_labels)
    tensors = _adapter_tensors(root, attribute, head, head0, start, layers, alpha)
    from ..encoders.ids import adapted_id

    model_id = adapted_id(encoder.id, tensors)
    return FinetuneResult(
        tensors=tensors, encoder=adapted_copy(encoder, tensors, model_id), settings=settings, best_epoch=best_epoch,
        epochs_run=epoch if not interrupted else len(history) - 1, alpha=alpha, val_accuracy=val_acc,
        val_loss=val_loss, history=history, interrupted=interrupted,
    )


def refit_head(work: Encoder, head: dict[str, torch.Tensor], pixels: np.ndarray, labels: np.ndarray,
               num_classes: int, l2: float, batch_size: int = 64) -> None:
    """Replace ``head`` (in place) by an L-BFGS logistic regression on the adapted tower's features
    of ``pixels`` (unaugmented): ``feature_weights`` and ``bias``, L2 ``l2`` fixed (the probe's
    loss, :func:`clipxfer.heads.probe.fit_logistic`). The SGD-trained head saw augmented views
    and a moving tower; the refitted one is the optimum for the features the adapter gives."""
    from ..heads.linear import probe_inputs
    from ..heads.probe import fit_logistic

    encodings = [work.encode_pixels(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    features = np.concatenate([probe_inputs(e) for e in encodings]).astype(np.float64)
    params = fit_logistic(features, labels, num_classes, l2)
    head.clear()
    head["feature_weights"] = params["W"].float()
    head["bias"] = params["b"].float()


def _set_alpha(root, head, head0, start, tuned, layers, alpha: float) -> None:
    """Put ``w0 + alpha (w - w0)`` into the tower and the head (LoRA: ``B`` scaled by alpha)."""
    with torch.no_grad():
        for k in head:
            head[k].copy_(_mix(head0[k], tuned["head"][k], alpha))
        for n in start:
            root.get_parameter(n).copy_(_mix(start[n], tuned["tower"][n], alpha))
        for name, layer in layers.items():
            layer.scaling["default"] = tuned["scaling"][name] * alpha


def _mix(w0: torch.Tensor, w1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exactly ``w0`` at alpha 0 and exactly ``w1`` at alpha 1."""
    if alpha == 0.0:
        return w0
    if alpha == 1.0:
        return w1
    return w0 + alpha * (w1 - w0)


def _choose_alpha(work, root, head, head0, start, layers, settings, val_px, val_labels, best_key, interrupted):
    """The WiSE alpha (given, or the best of :data:`WISE_GRID` on validation) applied to the model."""
    tuned = {
        "head": {k: v.detach().clone() for k, v in head.items()},
        "tower": {n: root.get_parameter(n).detach().clone() for n in start},
        "scaling": {name: layer.scaling["default"] for name, layer in layers.items()},
    }
    if settings.wise != "auto":
        alpha = float(settings.wise)
        _set_alpha(root, head, head0, start, tuned, layers, alpha)
        acc, loss = evaluate(work, head, val_px, val_labels) if alpha != 1.0 else (best_key[0], -best_key[1])
        return alpha, acc, loss
    if len(val_labels) == 0:
        return 1.0, float("nan"), float("nan")
    scored = []
    for alpha in WISE_GRID:
        _set_alpha(root, head, head0, start, tuned, layers, alpha)
        acc, loss = evaluate(work, head, val_px, val_labels)
        scored.append(((acc, -loss), alpha))
    # Ties go to the smaller alpha: the model closer to the pretrained one.
    (acc, neg_loss), alpha = max(scored, key=lambda item: (item[0], -item[1]))
    _set_alpha(root, head, head0, start, tuned, layers, alpha)
    return alpha, acc, -neg_loss


def _adapter_tensors(root, attribute, head, head0, start, layers, alpha) -> dict[str, np.ndarray]:
    """The head parts plus the moved tower tensors (or LoRA factors), as stored in the adapter."""
    tensors = {k: v.detach().float().numpy().copy() for k, v in head.items()}
    for n in start:
        tensors[f"{ENCODER_PREFIX}{attribute}.{n}"] = root.get_parameter(n).detach().float().numpy().copy()
    if layers:
        # The current scaling already carries alpha (see _set_alpha).
        tensors.update(lora_factors(layers, attribute))
    return tensors


def settings_dict(settings: FinetuneSettings) -> dict:
    """JSON-able settings for the adapter's metadata."""
    return asdict(settings)
