"""The methods ``clipxfer fit --method auto`` chooses among: a name, the head method it fits and the
setting that distinguishes it, cheapest first (ties in cross-validated accuracy go to the cheaper)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ClipxferError


@dataclass(frozen=True)
class Candidate:
    """One method with its main setting."""

    name: str
    method: str
    options: dict = field(default_factory=dict)
    #: Fine-tuning: needs the images and trains the encoder (one fit is minutes, not seconds).
    trains_encoder: bool = False


CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate("probe", "probe", {"prior": "none"}),
        Candidate("probe-zsprior", "probe", {"prior": "zeroshot"}),
        Candidate("lpp", "lpp"),
        Candidate("clap", "clap"),
        Candidate("tip", "tip"),
        Candidate("tipf", "tip", {"finetune": True}),
        Candidate("mix", "mix"),
        Candidate("coop", "coop"),
        Candidate("finetune", "finetune", trains_encoder=True),
    )
}
#: Not a method of its own: the calibrated ensemble of the feature-level candidates above.
ENSEMBLE = "ensemble"
#: What ``auto`` tries by default (every candidate and the ensemble).
DEFAULT_CANDIDATES = (*CANDIDATES, ENSEMBLE)
#: Candidates the ensemble may combine: they score the base encoder's features (no fine-tuning) and
#: are quick to refit.
ENSEMBLE_MEMBERS = ("probe", "probe-zsprior", "lpp", "clap", "tip", "tipf")


def parse_candidates(names) -> list[str]:
    """``names`` (a comma-separated string or a list) checked against :data:`CANDIDATES`; empty: the default."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or DEFAULT_CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES and n != ENSEMBLE]
    if unknown:
        raise ClipxferError(f"unknown candidate(s) {', '.join(unknown)}: choose from "
                            f"{', '.join([*CANDIDATES, ENSEMBLE])}")
    return names
