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

The other methods (each ``None`` setting takes :data:`.settings.GENERIC`'s value; ``top`` its own,
:data:`.settings.RECIPES`):

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

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.base import Encoder
from ..encoders.ids import ENCODER_PREFIX
from ..errors import ClipxferError
from ..heads.base import FewShotData
from ..heads.linear import PARTS, zeroshot_parts
from ..images import ImageLike
from .lora import _inject_lora, lora_factors, lora_targets
from .model import adapted_copy, evaluate, forward_logits, working_copy
from .parameters import moving_parameters
from .pixels import augment_batch, decode_pixels
from .settings import FinetuneSettings
from .wise import choose_alpha


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


@dataclass
class _Pixels:
    """The decoded images and labels training sees (``train``) and chooses by (``val``, empty when
    ``fit_on="all"`` has moved the validation images into training)."""

    train: np.ndarray
    train_labels: torch.Tensor
    val: np.ndarray
    val_labels: np.ndarray


@dataclass
class _Trainee:
    """The working copy being trained: its tower ``root`` (``work``'s ``attribute``), the head being
    trained and the one it started from, the tower parameters that move with their starting values,
    the LoRA layers (none for the other methods) and the tower tensors the optimiser updates."""

    work: Encoder
    attribute: str
    root: torch.nn.Module
    head0: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    moving: list[str]
    start: dict[str, torch.Tensor]
    layers: dict[str, torch.nn.Module]
    tower_params: list[torch.Tensor]


@dataclass
class _Run:
    """How the epochs went: the history, the best epoch with its ``(accuracy, -loss)`` key on
    validation and its weights (:func:`_snapshot`), the last epoch begun, and whether Ctrl-C stopped it."""

    history: list[dict]
    best_key: tuple[float, float]
    best_epoch: int
    best_state: dict
    epoch: int = 0
    interrupted: bool = False


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
    work, attribute, root = working_copy(data.encoder)
    pixels = _labelled_pixels(data, train_images, val_images, settings)
    model = _trainee(data, settings, work, attribute, root)
    optimizer, schedule, steps_per_epoch = _optimiser(model, settings, len(pixels.train))
    run = _train(model, pixels, settings, optimizer, schedule, steps_per_epoch, generator, progress, on_epoch)
    return _result(data, settings, model, pixels, run)


def _labelled_pixels(data: FewShotData, train_images: Sequence[ImageLike], val_images: Sequence[ImageLike],
                     settings: FinetuneSettings) -> _Pixels:
    """Both splits decoded once, with their labels; ``fit_on="all"`` trains on the validation images too."""
    size = data.encoder.input_size
    train_px = decode_pixels(train_images, size)
    val_px = decode_pixels(val_images, size) if len(val_images) else train_px[:0]
    train_labels = torch.as_tensor(data.train_labels, dtype=torch.long)
    val_labels = np.asarray(data.val_labels)
    if settings.fit_on == "all":  # the validation images become training images
        train_px = np.concatenate([train_px, val_px])
        train_labels = torch.cat([train_labels, torch.as_tensor(val_labels, dtype=torch.long)])
        val_px, val_labels = train_px[:0], val_labels[:0]
    return _Pixels(train_px, train_labels, val_px, val_labels)


def _trainee(data: FewShotData, settings: FinetuneSettings, work: Encoder, attribute: str,
             root: torch.nn.Module) -> _Trainee:
    """The starting head, and the tower parameters the method moves (LoRA: the layers it adds)."""
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
    return _Trainee(work, attribute, root, head0, head, moving, start, layers, tower_params)


def start_head(data: FewShotData, settings: FinetuneSettings) -> dict[str, np.ndarray]:
    """The head fine-tuning starts from: the validated linear probe (LP-FT), or zero-shot for ``full``."""
    if settings.strategy == "full":
        parts = dict(zeroshot_parts(data.zeroshot))
        parts["bias"] = np.zeros(len(data.classnames), np.float32)
        return parts
    from ..heads.probe import ProbeHead

    probe = ProbeHead.fit(data)
    return {name: value for name, value in probe.weights.items() if name in PARTS}


def _optimiser(model: _Trainee, settings: FinetuneSettings, num_train: int):
    """AdamW (the head at ``head_lr_scale`` times the tower's rate), its cosine schedule over all
    steps, and the number of steps in an epoch."""
    optimizer = torch.optim.AdamW(
        [
            {"params": model.tower_params, "lr": settings.lr, "weight_decay": settings.weight_decay},
            {"params": list(model.head.values()), "lr": settings.lr * settings.head_lr_scale, "weight_decay": 0.0},
        ]
    )
    steps_per_epoch = max(1, math.ceil(num_train / settings.batch_size))
    total = max(1, settings.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return optimizer, schedule, steps_per_epoch


def _train(model: _Trainee, pixels: _Pixels, settings: FinetuneSettings, optimizer, schedule, steps_per_epoch: int,
           generator: torch.Generator, progress: bool, on_epoch: Callable[[dict], None] | None) -> _Run:
    """The epochs, each scored on validation, until the last, early stopping or Ctrl-C; the model
    is left holding the kept epoch's weights."""
    val_acc, val_loss = evaluate(model.work, model.head, pixels.val, pixels.val_labels)
    history = [{"epoch": 0, "train_loss": float("nan"), "val_accuracy": val_acc, "val_loss": val_loss}]
    run = _Run(history, (val_acc, -val_loss), 0, _snapshot(model))
    bar = _progress_bar(settings, val_acc, len(pixels.val_labels)) if progress else None
    try:
        for epoch in range(1, settings.epochs + 1):
            run.epoch = epoch
            train_loss = _train_epoch(model, pixels, settings, optimizer, schedule, steps_per_epoch, generator, epoch)
            val_acc, val_loss = evaluate(model.work, model.head, pixels.val, pixels.val_labels)
            record = {"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_acc, "val_loss": val_loss}
            run.history.append(record)
            # Without validation images there is nothing to choose by: keep the last epoch.
            if (val_acc, -val_loss) > run.best_key or settings.keep == "last" or not len(pixels.val_labels):
                run.best_key, run.best_epoch, run.best_state = (val_acc, -val_loss), epoch, _snapshot(model)
            if bar:
                _show_epoch(bar, record, run, len(pixels.val_labels))
            if on_epoch:
                on_epoch(record)
            if settings.keep == "best" and epoch - run.best_epoch >= settings.patience:
                break
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        if bar:
            bar.close()
    _restore(model, run.best_state)
    return run


def _progress_bar(settings: FinetuneSettings, val_acc: float, num_val: int):
    """A tqdm bar over the epochs on stderr, showing the starting validation accuracy if there is one."""
    from tqdm import tqdm

    bar = tqdm(total=settings.epochs, desc=f"finetune {settings.strategy}", unit="epoch", file=sys.stderr)
    if num_val:
        bar.set_postfix_str(f"val_acc {val_acc:.3f}")
    return bar


def _show_epoch(bar, record: dict, run: _Run, num_val: int) -> None:
    """Advance the bar and show the epoch's training loss (and validation accuracy, with the best so far)."""
    bar.update()
    shown = f" val_acc {record['val_accuracy']:.3f} best {run.best_key[0]:.3f}@{run.best_epoch}" if num_val else ""
    bar.set_postfix_str(f"loss {record['train_loss']:.3f}{shown}")


def _train_epoch(model: _Trainee, pixels: _Pixels, settings: FinetuneSettings, optimizer, schedule,
                 steps_per_epoch: int, generator: torch.Generator, epoch: int) -> float:
    """One pass over the training images in a fresh order, augmented; the mean training loss. A loss
    that is not finite stops the fine-tune with one line (every later step would be NaN too)."""
    order = torch.randperm(len(pixels.train), generator=generator).numpy()
    losses = []
    for step in range(steps_per_epoch):
        rows = order[step * settings.batch_size : (step + 1) * settings.batch_size]
        batch = augment_batch(pixels.train[rows], generator, settings.crop_scale) if settings.augment else pixels.train[rows]
        logits = forward_logits(model.work, model.head, batch)
        loss = F.cross_entropy(logits, pixels.train_labels[rows], label_smoothing=settings.label_smoothing)
        if settings.l2sp and model.moving:
            drift = sum((model.root.get_parameter(n) - w0).pow(2).sum() for n, w0 in model.start.items())
            loss = loss + settings.l2sp * drift
        if not torch.isfinite(loss.detach()):
            raise ClipxferError(f"finetune: the training loss became {float(loss.detach())} in epoch {epoch}, so "
                                f"training cannot go on; nothing was saved: lower --lr (now {settings.lr:g}) "
                                "and try again")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _snapshot(model: _Trainee) -> dict:
    """Copies of everything training moves: the head, the moving tower tensors, the LoRA factors."""
    return {
        "head": {k: v.detach().clone() for k, v in model.head.items()},
        "tower": {n: model.root.get_parameter(n).detach().clone() for n in model.moving},
        "lora": {n: p.detach().clone() for n, p in model.root.named_parameters() if "lora_" in n},
    }


def _restore(model: _Trainee, state: dict) -> None:
    """Put a :func:`_snapshot` back into the model."""
    with torch.no_grad():
        for k, v in state["head"].items():
            model.head[k].copy_(v)
        for n, v in state["tower"].items():
            model.root.get_parameter(n).copy_(v)
        for n, p in model.root.named_parameters():
            if n in state["lora"]:
                p.copy_(state["lora"][n])


def _result(data: FewShotData, settings: FinetuneSettings, model: _Trainee, pixels: _Pixels,
            run: _Run) -> FinetuneResult:
    """The kept epoch with WiSE applied and, for ``head="refit"``, the head refitted: the adapter
    tensors, the adapted encoder and how training went."""
    alpha, val_acc, val_loss = choose_alpha(model.work, model.root, model.head, model.head0, model.start, model.layers,
                                            settings, pixels.val, pixels.val_labels, run.best_key, run.interrupted)
    if settings.head == "refit":
        refit_head(model.work, model.head, pixels.train, pixels.train_labels.numpy(), len(data.classnames),
                   settings.refit_l2)
        val_acc, val_loss = evaluate(model.work, model.head, pixels.val, pixels.val_labels)
    tensors = _adapter_tensors(model.root, model.attribute, model.head, model.head0, model.start, model.layers, alpha)
    from ..encoders.ids import adapted_id

    model_id = adapted_id(data.encoder.id, tensors)
    return FinetuneResult(
        tensors=tensors, encoder=adapted_copy(data.encoder, tensors, model_id), settings=settings,
        best_epoch=run.best_epoch, epochs_run=run.epoch if not run.interrupted else len(run.history) - 1, alpha=alpha,
        val_accuracy=val_acc, val_loss=val_loss, history=run.history, interrupted=run.interrupted,
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


def _adapter_tensors(root, attribute, head, head0, start, layers, alpha) -> dict[str, np.ndarray]:
    """The head parts plus the moved tower tensors (or LoRA factors), as stored in the adapter."""
    tensors = {k: v.detach().float().numpy().copy() for k, v in head.items()}
    for n in start:
        tensors[f"{ENCODER_PREFIX}{attribute}.{n}"] = root.get_parameter(n).detach().float().numpy().copy()
    if layers:
        # The current scaling already carries alpha (see :mod:`.wise`).
        tensors.update(lora_factors(layers, attribute))
    return tensors
