"""Choosing a method by cross-validation on the labelled shots alone (:func:`fit_auto`): every
candidate is fitted on k-1 folds and scored on the held-out fold, the calibrated ensemble of the
feature-level candidates is scored on the same held-out predictions, and the best is refitted on
all the shots. Nothing outside the shots (no test image) is looked at."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..datasets.features import take
from ..errors import ClipxferError
from ..heads.base import FewShotData, Head, softmax
from ..heads.ensemble import EnsembleHead, fit_temperature, fit_weights
from ..heads.fitting import fit_head
from ..images import ImageLike
from .candidates import CANDIDATES, ENSEMBLE, ENSEMBLE_MEMBERS, Candidate, parse_candidates
from .folds import DEFAULT_FOLDS, Fold, make_folds, pooled


@dataclass
class CandidateScore:
    """A candidate's cross-validation: pooled held-out accuracy, per-fold accuracies, time, status."""

    name: str
    status: str = "ok"  # ok | skipped: ... | failed: ...
    accuracy: float = float("nan")
    fold_accuracies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""
    heldout_logits: np.ndarray | None = None

    @property
    def spread(self) -> float:
        """Standard deviation of the per-fold accuracies."""
        return float(np.std(self.fold_accuracies)) if self.fold_accuracies else float("nan")

    def row(self) -> dict[str, Any]:
        def number(value: float) -> float | None:
            return None if np.isnan(value) else round(float(value), 4)

        return {"candidate": self.name, "status": self.status, "cv_accuracy": number(self.accuracy),
                "spread": number(self.spread),
                "folds": len(self.fold_accuracies), "seconds": round(self.seconds, 2), "detail": self.detail}


@dataclass
class AutoResult:
    """The refitted head of the chosen candidate and the table of every candidate."""

    head: Head
    chosen: str
    scores: list[CandidateScore]
    folds: int

    def table(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.scores]


class OverBudget(Exception):
    """Raised between fine-tuning epochs when the pace so far says the candidate cannot finish in time."""


def fit_candidate(candidate: Candidate, data: FewShotData, images=None, on_epoch=None) -> Head:
    """Fit one candidate on ``data`` (``images``: the training and validation images, for fine-tuning;
    ``on_epoch``: called after each fine-tuning epoch)."""
    if candidate.trains_encoder:
        from ..finetune import fit_finetune_head

        return fit_finetune_head(data, images, on_epoch=on_epoch, **candidate.options)
    return fit_head(candidate.method, data, **candidate.options)


def epoch_watch(candidate: Candidate, folds: int, deadline: float | None) -> Callable[[dict], None] | None:
    """For a fine-tuning candidate under a ``deadline``: a callback that raises :class:`OverBudget` as
    soon as the epochs left (this fold's, the other folds' and the final refit's), at the pace of the
    epochs so far, cannot end before the deadline. So a budget too small for fine-tuning costs one
    epoch, not a whole fold."""
    if not candidate.trains_encoder or deadline is None:
        return None
    from ..finetune.settings import make_settings

    per_fit = make_settings(**candidate.options).epochs
    total = per_fit * (folds + 1)
    started, done = time.monotonic(), [0]

    def check(record: dict) -> None:
        done[0] += 1
        now = time.monotonic()
        needed = (now - started) / done[0] * (total - done[0])
        if now + needed > deadline:
            raise OverBudget(f"over the time budget (~{needed:.0f} s more needed)")

    return check


def fold_images(images, fold: Fold):
    """The (train, val) images of a fold from the pooled image list."""
    return [images[i] for i in fold.train_rows], [images[i] for i in fold.val_rows]


def cross_validate(
    candidate: Candidate, folds: list[Fold], pooled_images: Sequence[ImageLike] | None, encoding, labels: np.ndarray,
    deadline: float | None,
) -> CandidateScore:
    """Held-out logits of ``candidate`` over every fold, or a skipped/failed score. With a
    ``deadline``, the candidate stops (skipped) as soon as its remaining folds plus the final refit,
    at the pace of the folds so far, cannot end before it."""
    score = CandidateScore(candidate.name)
    if candidate.trains_encoder and pooled_images is None:
        score.status, score.detail = "skipped", "needs the images (features only given)"
        return score
    if deadline is not None and time.monotonic() >= deadline:
        score.status, score.detail = "skipped", "time budget spent"
        return score
    logits = np.zeros((len(labels), len(folds[0].data.classnames)))
    started = time.monotonic()
    watch = epoch_watch(candidate, len(folds), deadline)
    for done, fold in enumerate(folds, 1):
        try:
            images = fold_images(pooled_images, fold) if candidate.trains_encoder else None
            head = fit_candidate(candidate, fold.data, images, watch)
            if candidate.trains_encoder:
                heldout = head.encoder.embed_images([pooled_images[i] for i in fold.heldout_rows])
            else:
                heldout = take(encoding, fold.heldout_rows)
            logits[fold.heldout_rows] = head.logits(heldout)
        except ClipxferError as error:
            score.status, score.detail = "failed", str(error)
            return score
        except OverBudget as reason:
            score.status, score.detail, score.seconds = "skipped", str(reason), time.monotonic() - started
            return score
        fold_labels = labels[fold.heldout_rows]
        score.fold_accuracies.append(float((logits[fold.heldout_rows].argmax(1) == fold_labels).mean()))
        score.seconds = time.monotonic() - started
        if deadline is not None and done < len(folds):
            needed = score.seconds / done * (len(folds) - done + 1)
            if time.monotonic() + needed > deadline:
                score.status = "skipped"
                score.detail = f"over the time budget (~{needed:.0f} s more needed)"
                return score
    score.heldout_logits = logits
    score.accuracy = float((logits.argmax(1) == labels).mean())
    return score


def ensemble_score(scores: list[CandidateScore], folds: list[Fold], labels: np.ndarray) -> tuple[CandidateScore, dict]:
    """The calibrated ensemble of the feature-level candidates that ran: per member the temperature
    and the simplex weights minimising the held-out cross-entropy; its accuracy is on the same
    held-out predictions (the weights are fitted there too, so it is slightly optimistic)."""
    members = [s for s in scores if s.name in ENSEMBLE_MEMBERS and s.heldout_logits is not None]
    score = CandidateScore(ENSEMBLE)
    if len(members) < 2:
        score.status, score.detail = "skipped", "fewer than two members ran"
        return score, {}
    temperatures = [fit_temperature(s.heldout_logits, labels) for s in members]
    probs = [softmax(s.heldout_logits / t) for s, t in zip(members, temperatures)]
    weights = fit_weights(probs, labels)
    mixed = sum(w * p for w, p in zip(weights, probs))
    score.accuracy = float((mixed.argmax(1) == labels).mean())
    score.fold_accuracies = [float((mixed[f.heldout_rows].argmax(1) == labels[f.heldout_rows]).mean()) for f in folds]
    score.seconds = sum(s.seconds for s in members)
    score.detail = ", ".join(f"{s.name} {w:.2f}" for s, w in zip(members, weights) if w > 0)
    score.heldout_logits = np.log(np.clip(mixed, 1e-30, None))
    plan = {s.name: (t, float(w)) for s, t, w in zip(members, temperatures, weights) if w > 0}
    return score, plan


def fit_auto(
    data: FewShotData,
    images: tuple[Sequence[ImageLike], Sequence[ImageLike]] | None = None,
    candidates: Sequence[str] | str | None = None,
    folds: int = DEFAULT_FOLDS,
    budget_s: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    pick: str | None = None,
) -> AutoResult:
    """Choose among ``candidates`` (default: every method of :data:`~.candidates.CANDIDATES` and the
    ensemble) by stratified ``folds``-fold cross-validation on ``data``'s training and validation
    images (leave-one-out per class when a class has fewer images than folds), then refit the best
    on all of them. ``images``: the (train, val) images, needed by ``finetune`` (skipped without).
    ``budget_s``: wall seconds for the whole choice and refit; candidates that cannot finish are
    skipped (cheapest run first). Ties go to the cheaper candidate. ``pick``: refit this candidate
    whatever the cross-validation says (``ensemble``: the calibrated ensemble, by default of
    :data:`~.candidates.ENSEMBLE_MEMBERS` only); the table is still computed."""
    if pick == ENSEMBLE and candidates is None:
        candidates = [*ENSEMBLE_MEMBERS, ENSEMBLE]
    names = parse_candidates(candidates)
    if pick is not None and pick not in names:
        raise ClipxferError(f"auto: pick {pick!r} is not among the candidates ({', '.join(names)})")
    log = log or (lambda line: print(line, file=sys.stderr))
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    fold_list = make_folds(data, folds, seed)
    encoding, labels, _ = pooled(data)
    pooled_images = list(images[0]) + list(images[1]) if images is not None else None
    scores = []
    for name in names:
        if name == ENSEMBLE:
            continue
        score = cross_validate(CANDIDATES[name], fold_list, pooled_images, encoding, labels, deadline)
        log(f"auto: {name:<14} {score.status:<8} cv accuracy {score.accuracy:.3f} +- {score.spread:.3f} "
            f"({score.seconds:.1f} s){' ' + score.detail if score.detail else ''}")
        scores.append(score)
    plan: dict = {}
    if ENSEMBLE in names:
        ensemble, plan = ensemble_score(scores, fold_list, labels)
        scores.append(ensemble)
        log(f"auto: {ENSEMBLE:<14} {ensemble.status:<8} cv accuracy {ensemble.accuracy:.3f} +- "
            f"{ensemble.spread:.3f} {ensemble.detail}")
    ran = [s for s in scores if s.status == "ok"]
    if not ran:
        raise ClipxferError("auto: no candidate finished its cross-validation ("
                            + "; ".join(f"{s.name}: {s.detail}" for s in scores) + "); raise --budget")
    order = {s.name: i for i, s in enumerate(scores)}
    best = max(ran, key=lambda s: (s.accuracy, -order[s.name]))
    if pick is not None:
        best = next((s for s in ran if s.name == pick), None)
        if best is None:
            raise ClipxferError(f"auto: {pick} did not finish its cross-validation")
    if best.name == ENSEMBLE:
        members = [fit_candidate(CANDIDATES[name], data) for name in plan]
        head = EnsembleHead.combine(members, [t for t, _ in plan.values()], [w for _, w in plan.values()])
    else:
        head = fit_candidate(CANDIDATES[best.name], data, images)
    head.config.update({
        "auto": {"chosen": best.name, "folds": len(fold_list),
                 "candidates": [{k: v for k, v in s.row().items() if k != "detail"} for s in scores]},
    })
    return AutoResult(head, best.name, scores, len(fold_list))
