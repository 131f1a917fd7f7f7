"""The settings of one fine-tune (:class:`FinetuneSettings`) and the recipe each method takes when a
setting is not given; why ``top`` differs from the others is in :mod:`clipxfer.finetune.train`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ClipxferError

METHODS = ("top", "lp-ft", "partial", "full", "lora")
#: The settings a method takes when not given (``None``): :data:`GENERIC`, updated by the method's
#: own entry in :data:`RECIPES` (see :mod:`.train`'s docstring for why ``top`` differs).
GENERIC = {"epochs": 12, "lr": 1e-4, "l2sp": 0.01, "blocks": 2, "crop_scale": 0.6, "keep": "best", "wise": "auto",
           "fit_on": "train", "head": "trained"}
RECIPES = {
    "top": {"epochs": 10, "lr": 1e-3, "l2sp": 0.0, "blocks": 1, "crop_scale": 0.8, "keep": "last", "wise": 1.0,
            "fit_on": "all", "head": "refit"},
}


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
        """Fill the method's recipe into unset fields; raise ClipxferError on the first bad value. Every
        number is checked (finite, in range, :data:`NUMBERS`) before any loading or training."""
        if self.strategy not in METHODS:
            raise ClipxferError(f"--method {self.strategy}: use one of {', '.join(METHODS)}")
        recipe = {**GENERIC, **RECIPES.get(self.strategy, {})}
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, (kind, low, high, closed) in NUMBERS.items():
            setattr(self, name, _checked_number(name, getattr(self, name), kind, low, high, closed))
        if self.wise != "auto":
            try:
                self.wise = float(self.wise)
            except (TypeError, ValueError):
                raise ClipxferError(f"--wise {self.wise}: a number in [0, 1] or auto") from None
            if not 0.0 <= self.wise <= 1.0:
                raise ClipxferError(f"--wise {self.wise}: a number in [0, 1] or auto")
        if self.keep not in ("best", "last"):
            raise ClipxferError(f"keep={self.keep!r}: use best or last")
        if self.fit_on not in ("train", "all"):
            raise ClipxferError(f"fit_on={self.fit_on!r}: use train or all")
        if self.head not in ("trained", "refit"):
            raise ClipxferError(f"head={self.head!r}: use trained or refit")
        if self.fit_on == "all" and self.wise == "auto":
            raise ClipxferError(f"--wise auto chooses on validation images, which --method {self.strategy} trains on: "
                                "give --wise a number")
        return self


#: The numeric settings and what each accepts: ``(int or float, low, high, closed)``, where a bound of
#: None is open-ended and ``closed`` says whether ``low`` itself is allowed (``high`` always is).
NUMBERS = {
    "epochs": (int, 0, None, True),
    "lr": (float, 0.0, None, False),
    "head_lr_scale": (float, 0.0, None, False),
    "weight_decay": (float, 0.0, None, True),
    "l2sp": (float, 0.0, None, True),
    "batch_size": (int, 1, None, True),
    "blocks": (int, 1, None, True),
    "lora_rank": (int, 1, None, True),
    "lora_alpha": (float, 0.0, None, False),
    "crop_scale": (float, 0.0, 1.0, False),
    "label_smoothing": (float, 0.0, 0.99, True),
    "patience": (int, 1, None, True),
    "refit_l2": (float, 0.0, None, False),
}
#: Settings that are command-line options, named as such in errors.
OPTIONS = {"epochs", "lr", "l2sp", "blocks"}


def _checked_number(name: str, value, kind: type, low, high, closed: bool):
    """``value`` as ``kind`` when it is a finite number in range, else one line naming the setting."""
    label = f"--{name.replace('_', '-')} {value}" if name in OPTIONS else f"{name}={value!r}"
    low_text = "" if low is None else f"{'at least' if closed else 'more than'} {low:g}"
    rule = " and ".join(part for part in (low_text, "" if high is None else f"at most {high:g}") if part)
    what = "a whole number" if kind is int else "a finite number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or (kind is int and number != int(number)):
        raise ClipxferError(f"{label}: must be {what}, {rule}")
    if (low is not None and (number < low or (number == low and not closed))) or (high is not None and number > high):
        raise ClipxferError(f"{label}: must be {what}, {rule}")
    return int(number) if kind is int else number


def make_settings(**options) -> FinetuneSettings:
    """:class:`FinetuneSettings` from keyword options, checked; unknown names are one clear error."""
    unknown = set(options) - set(FinetuneSettings.__dataclass_fields__)
    if unknown:
        known = ", ".join(FinetuneSettings.__dataclass_fields__)
        raise ClipxferError(f"finetune: unknown option(s) {', '.join(sorted(unknown))} (known: {known})")
    return FinetuneSettings(**options).check()


def settings_dict(settings: FinetuneSettings) -> dict:
    """JSON-able settings for the adapter's metadata."""
    return asdict(settings)
