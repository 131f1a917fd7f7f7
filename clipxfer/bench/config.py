"""What a benchmark run measures: datasets, methods, shots, seeds, model. Read from a TOML file
and/or command-line options; validated here so a bad config fails with one clear line."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ClipxferError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: bench names whose head method differs from the name (tipf is Tip-Adapter with finetune=True)
METHODS_BASE = {"tipf": "tip"}
#: bench method name -> (head method, fit options)
METHODS: dict[str, tuple[str, dict]] = {
    "zeroshot": ("zeroshot", {}),
    "probe": ("probe", {}),
    "tip": ("tip", {}),
    "tipf": ("tip", {"finetune": True}),
    "coop": ("coop", {}),
    "mix": ("mix", {}),
    "transductive": ("transductive", {}),
    # Meta-learned initialisations (clipxfer meta-train); the artifact comes from --meta PATH,
    # i.e. method_options {"meta-probe": {"init": PATH}}.
    "meta-probe": ("probe", {}),
    "meta-coop": ("coop", {}),
    # LP++ and CLAP (validation-free probes), and TransCLIP over the test batch on top of a head.
    "lpp": ("lpp", {}),
    "clap": ("clap", {}),
    **{f"{name}+trans": ("transclip", {"base": METHODS_BASE.get(name, name), **options})
       for name, options in (("zeroshot", {}), ("probe", {}), ("tip", {}), ("tipf", {"finetune": True}),
                             ("coop", {}), ("mix", {}), ("lpp", {}), ("clap", {}))},
}
DEFAULT_METHODS = ["zeroshot", "probe", "tip", "tipf", "mix"]
DEFAULT_SHOTS = [1, 2, 4, 8, 16]
DEFAULT_SEEDS = [1, 2, 3]
DEFAULT_MAX_TEST = 2000


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to benchmark on.

    ``source``: a built-in name (fashion-mnist, digits, mnist-5k), an ImageFolder or a CSV
    manifest. ``classes`` renames the classes for prompts (same order as the dataset's);
    ``templates`` is a template set name or file; ``max_test`` caps the test set (drawn once,
    the same for every cell).
    """

    source: str
    name: str = ""
    classes: tuple[str, ...] = ()
    templates: str = "simple"
    max_test: int | None = DEFAULT_MAX_TEST

    @property
    def label(self) -> str:
        return self.name or Path(self.source).stem or self.source


@dataclass(frozen=True)
class BenchConfig:
    """A full benchmark: every dataset x method x shots x seed is one cell."""

    datasets: tuple[DatasetSpec, ...]
    methods: tuple[str, ...] = tuple(DEFAULT_METHODS)
    shots: tuple[int, ...] = tuple(DEFAULT_SHOTS)
    seeds: tuple[int, ...] = tuple(DEFAULT_SEEDS)
    model: str | None = None
    leakage_threshold: float = 0.97
    method_options: dict = field(default_factory=dict)

    def validate(self) -> "BenchConfig":
        """Raise ClipxferError on the first bad value; return self for chaining."""
        if not self.datasets:
            raise ClipxferError("no dataset given: pass --data NAME|PATH or list [[datasets]] in the config file")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ClipxferError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ClipxferError("no methods given: use --methods zeroshot,probe,...")
        no_init = [m for m in self.methods if m.startswith("meta-") and not self.method_options.get(m, {}).get("init")]
        if no_init:
            raise ClipxferError(f"method(s) {', '.join(no_init)} need a meta-trained head: pass --meta PATH "
                                "(made by 'clipxfer meta-train')")
        bad_shots = [k for k in self.shots if not isinstance(k, int) or k < 1]
        if bad_shots or not self.shots:
            raise ClipxferError(f"shots must be whole numbers >= 1, got {list(self.shots)}")
        if not self.seeds or any(not isinstance(s, int) for s in self.seeds):
            raise ClipxferError(f"seeds must be whole numbers, got {list(self.seeds)}")
        if not 0 < self.leakage_threshold <= 1:
            raise ClipxferError(f"leakage_threshold {self.leakage_threshold} must be in (0, 1]")
        return self


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """``'1,2,4'`` -> (1, 2, 4), or one clear error naming the option."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ClipxferError(f"{option} '{text}': expected comma-separated whole numbers like 1,2,4") from None


_TOP_KEYS = {"model", "methods", "shots", "seeds", "leakage_threshold", "datasets", "method_options"}
_DATASET_KEYS = {"source", "name", "classes", "templates", "max_test"}


def load_config(path: str | Path) -> BenchConfig:
    """Read a TOML benchmark config (format documented in the README)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ClipxferError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClipxferError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ClipxferError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP_KEYS))}")
    datasets = []
    for number, entry in enumerate(raw.get("datasets", []), 1):
        if not isinstance(entry, dict) or "source" not in entry:
            raise ClipxferError(f"{path}: [[datasets]] entry {number} needs a 'source' (built-in name, folder or CSV)")
        extra = set(entry) - _DATASET_KEYS
        if extra:
            raise ClipxferError(f"{path}: [[datasets]] entry {number}: unknown key(s) {', '.join(sorted(extra))}")
        source = str(entry["source"])
        if not Path(source).is_absolute() and (path.parent / source).exists():
            source = str(path.parent / source)  # relative to the config file
        datasets.append(
            DatasetSpec(
                source=source,
                name=str(entry.get("name", "")),
                classes=tuple(entry.get("classes", ())),
                templates=str(entry.get("templates", "simple")),
                max_test=entry.get("max_test", DEFAULT_MAX_TEST),
            )
        )
    try:
        config = BenchConfig(
            datasets=tuple(datasets),
            methods=tuple(raw.get("methods", DEFAULT_METHODS)),
            shots=tuple(raw.get("shots", DEFAULT_SHOTS)),
            seeds=tuple(raw.get("seeds", DEFAULT_SEEDS)),
            model=raw.get("model"),
            leakage_threshold=float(raw.get("leakage_threshold", 0.97)),
            method_options=dict(raw.get("method_options", {})),
        )
    except (TypeError, ValueError) as exc:
        raise ClipxferError(f"{path}: {exc}") from None
    return config


def with_overrides(config: BenchConfig, **overrides) -> BenchConfig:
    """``config`` with the non-None ``overrides`` applied (command-line options win)."""
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})
