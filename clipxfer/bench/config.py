"""What a benchmark run measures: datasets, methods, shots, seeds, model. Read from a TOML file
and/or command-line options; validated here so a bad config fails with one clear line."""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ClipxferError


class ConfigMistakes(ClipxferError):
    """Every mistake found in a benchmark config, one line each (``lines``), so one run reports them all."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("; ".join(self.lines))


def raise_mistakes(lines: list[str]) -> None:
    """Raise :class:`ConfigMistakes` when ``lines`` names any mistake."""
    if lines:
        raise ConfigMistakes(lines)

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
    # Fine-tunes the encoder (clipxfer finetune): its cells re-encode the test set per adapted encoder.
    "finetune": ("finetune", {}),
    # Meta-learned initialisations (clipxfer meta-train); the artifact comes from --meta PATH,
    # i.e. method_options {"meta-probe": {"init": PATH}}.
    "meta-probe": ("probe", {}),
    "meta-coop": ("coop", {}),
    # LP++ and CLAP (validation-free probes), and TransCLIP over the test batch on top of a head.
    "lpp": ("lpp", {}),
    "clap": ("clap", {}),
    # clipxfer fit --method auto: the method chosen by cross-validation on the shots (clipxfer.autofit);
    # "ensemble" is the calibrated ensemble of the feature-level methods, weights by cross-validation.
    "auto": ("auto", {}),
    "ensemble": ("auto", {"pick": "ensemble"}),
    # The fine-tuned encoder, then another head on its features, or TransCLIP over the test set.
    **{f"finetune+{then}": ("finetune", {"then": then}) for then in ("lpp", "clap", "trans")},
    **{f"{name}+trans": ("transclip", {"base": METHODS_BASE.get(name, name), **options})
       for name, options in (("zeroshot", {}), ("probe", {}), ("tip", {}), ("tipf", {"finetune": True}),
                             ("coop", {}), ("mix", {}), ("lpp", {}), ("clap", {}))},
}
DEFAULT_METHODS = ["zeroshot", "probe", "tip", "tipf", "mix"]
#: What a benchmark measures: single-label accuracy (classify) or multi-label mAP and F1 (multilabel:
#: mosaics of a built-in dataset's images, or a multi-label manifest), whose methods are these.
TASKS = ("classify", "multilabel")
MULTILABEL_METHODS = ("zeroshot", "probe")
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
        """The dataset's name in results and summaries (file names use ``safe_filename(label)``)."""
        return self.name or Path(self.source).stem or self.source

    def mistakes(self, where: str) -> list[str]:
        """One line per bad field (types and ranges), each naming ``where``."""
        found = []
        if not isinstance(self.source, str) or not self.source:
            found.append(f"{where}: source must be a built-in name, folder or CSV path, got {self.source!r}")
        if not isinstance(self.name, str):
            found.append(f"{where}: name must be a string, got {self.name!r}")
        if not _is_list_of(self.classes, str):
            found.append(f"{where}: classes must be a list of class names (strings), got {_show(self.classes)}")
        if not isinstance(self.templates, str) or not self.templates:
            found.append(f"{where}: templates must be a template set name or file, got {self.templates!r}")
        if self.max_test is not None and (not _is_int(self.max_test) or self.max_test < 1):
            found.append(f"{where}: max_test must be a whole number >= 1, got {self.max_test!r}")
        return found

    def validate(self, where: str) -> None:
        """Raise :class:`ConfigMistakes` listing every bad field."""
        raise_mistakes(self.mistakes(where))


@dataclass(frozen=True)
class BenchConfig:
    """A full benchmark: every dataset x method x shots x seed is one cell."""

    datasets: tuple[DatasetSpec, ...]
    methods: tuple[str, ...] = tuple(DEFAULT_METHODS)
    shots: tuple[int, ...] = tuple(DEFAULT_SHOTS)
    seeds: tuple[int, ...] = tuple(DEFAULT_SEEDS)
    model: str | None = None
    method_options: dict = field(default_factory=dict)
    task: str = "classify"

    def mistakes(self, need_datasets: bool = True) -> list[str]:
        """One line per bad value (types, ranges, unknown names); ``need_datasets=False`` while the
        command line may still add ``--data``."""
        found = []
        if need_datasets and not self.datasets:
            found.append("no dataset given: pass --data NAME|PATH or list [[datasets]] in the config file")
        for number, spec in enumerate(self.datasets, 1):
            found.extend(spec.mistakes(f"dataset {number}"))
        if self.task not in TASKS:
            found.append(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not _is_list_of(self.methods, str):
            found.append(f"methods must be a list of method names, got {self.methods!r}")
        elif self.task == "multilabel":
            unknown = [m for m in self.methods if m not in MULTILABEL_METHODS]
            if unknown or not self.methods:
                found.append(f"task multilabel: method(s) {', '.join(unknown) or '(none)'} unknown; choose from "
                             f"{', '.join(MULTILABEL_METHODS)}")
        else:
            unknown = [m for m in self.methods if m not in METHODS]
            if unknown:
                found.append(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
            if not self.methods:
                found.append("no methods given: use --methods zeroshot,probe,...")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            found.append(f"model must be a model name such as \"lite\" or \"tiny\", got {self.model!r}")
        found.extend(method_option_mistakes(self.method_options))
        if _is_list_of(self.methods, str) and isinstance(self.method_options, dict):
            no_init = [m for m in self.methods if m.startswith("meta-")
                       and not (self.method_options.get(m) or {}).get("init")]
            if no_init:
                found.append(f"method(s) {', '.join(no_init)} need a meta-trained head: pass --meta PATH "
                             "(made by 'clipxfer meta-train')")
        if not _is_list_of(self.shots, int) or not self.shots or any(k < 0 for k in self.shots):
            found.append(f"shots must be whole numbers >= 0, got {_show(self.shots)}")
        if not _is_list_of(self.seeds, int) or not self.seeds:
            found.append(f"seeds must be whole numbers, got {_show(self.seeds)}")
        return found

    def validate(self) -> "BenchConfig":
        """Raise :class:`ConfigMistakes` listing every bad value before any work starts; return self."""
        raise_mistakes(self.mistakes())
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1 here


def _is_list_of(values, kind) -> bool:
    check = _is_int if kind is int else (lambda v: isinstance(v, kind))
    return isinstance(values, (list, tuple)) and all(check(v) for v in values)


def _show(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _type_matches(value, hint) -> bool:
    """Whether a TOML value fits a simple annotation (bool, int, float, str, None, unions and
    lists of them); other annotations are left to the method to check."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_type_matches(v, args[0]) for v in value))
    return True


#: fit() parameters that are not settings: the data, the test images transductive methods get.
_NOT_OPTIONS = {"cls", "data", "unlabelled", "images", "log", "seed"}



def fit_function(head_method: str):
    """The function that fits ``head_method``, whose parameters are the method's options: the head's
    ``fit``, or for the fine-tuning head (which trains the encoder) :func:`clipxfer.finetune.fit_finetune_head`."""
    from ..heads import HEAD_TYPES

    if head_method == "auto":
        from ..autofit import fit_auto

        return fit_auto
    if getattr(HEAD_TYPES[head_method], "trains_encoder", False):
        from ..finetune import fit_finetune_head

        return fit_finetune_head
    return HEAD_TYPES[head_method].fit


def check_method_options(method_options) -> None:
    """``{bench method: {option: value}}`` with known methods and, for methods whose ``fit``
    names its options, known option names of the right types; :class:`ConfigMistakes` lists every one wrong."""
    raise_mistakes(method_option_mistakes(method_options))


def method_option_mistakes(method_options) -> list[str]:
    """One line per unknown method, unknown option or option of the wrong type (see :func:`check_method_options`)."""
    import inspect

    if not isinstance(method_options, dict):
        return [f"method_options must be a table of tables, got {method_options!r}"]
    found = []
    for method, options in method_options.items():
        if method not in METHODS:
            found.append(f"method_options.{method}: unknown method; choose from {', '.join(METHODS)}")
            continue
        if not isinstance(options, dict):
            found.append(f"method_options.{method} must be a table of options, got {options!r}")
            continue
        fit = fit_function(METHODS[method][0])
        parameters = {name: p for name, p in inspect.signature(fit).parameters.items() if name not in _NOT_OPTIONS}
        try:
            hints = typing.get_type_hints(fit)
        except Exception:  # an annotation that does not resolve: names are still checked
            hints = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        named = {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        for option, value in options.items():
            if option == "init":  # a meta-trained head, for any method (see transfer.fit_head)
                if not isinstance(value, str):
                    found.append(f"method_options.{method}.init must be a file path, got {value!r}")
                continue
            if option not in named:
                if not takes_any:
                    known = ", ".join(sorted(named))
                    found.append(f"method_options.{method}: unknown option '{option}'; known: {known}")
                continue
            if option in hints and not _type_matches(value, hints[option]):
                wanted = getattr(hints[option], "__name__", str(hints[option]))
                found.append(f"method_options.{method}.{option} must be {wanted}, got {value!r}")
    return found


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """``'1,2,4'`` -> (1, 2, 4), or one clear error naming the option."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ClipxferError(f"{option} '{text}': expected comma-separated whole numbers like 1,2,4") from None


_TOP_KEYS = {"model", "methods", "shots", "seeds", "datasets", "method_options", "task"}
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
    found = []  # every mistake in the file, reported together
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        found.append(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP_KEYS))}")
    entries = raw.get("datasets", [])
    if not isinstance(entries, list):
        found.append("datasets must be [[datasets]] tables, each with a 'source'")
        entries = []
    datasets = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "source" not in entry:
            found.append(f"[[datasets]] entry {number} needs a 'source' (built-in name, folder or CSV)")
            continue
        extra = set(entry) - _DATASET_KEYS
        if extra:
            found.append(f"[[datasets]] entry {number}: unknown key(s) {', '.join(sorted(extra))}")
        source = entry["source"]
        if isinstance(source, str) and not Path(source).is_absolute() and (path.parent / source).exists():
            source = str(path.parent / source)  # relative to the config file
        # Values are kept as written (no str()/tuple() coercion) so validate() sees what the
        # file said: classes = "abc" is an error, not three classes.
        spec = DatasetSpec(
            source=source,
            name=entry.get("name", ""),
            classes=_as_tuple(entry.get("classes", ())),
            templates=entry.get("templates", "simple"),
            max_test=entry.get("max_test", DEFAULT_MAX_TEST),
        )
        found.extend(spec.mistakes(f"[[datasets]] entry {number}"))
        datasets.append(spec)
    task = raw.get("task", "classify")
    config = BenchConfig(
        datasets=tuple(datasets),
        task=task,
        methods=_as_tuple(raw.get("methods", MULTILABEL_METHODS if task == "multilabel" else DEFAULT_METHODS)),
        shots=_as_tuple(raw.get("shots", DEFAULT_SHOTS)),
        seeds=_as_tuple(raw.get("seeds", DEFAULT_SEEDS)),
        model=raw.get("model"),
        method_options=raw.get("method_options", {}),
    )
    # The file's own values, all checked now (the command line may still add --data; run_bench
    # validates the merged config again).
    found.extend(replace(config, datasets=()).mistakes(need_datasets=False))
    raise_mistakes([f"{path}: {line}" for line in found])
    return config


def _as_tuple(value):
    """Lists as tuples (the config is frozen); anything else as given, for validate() to refuse."""
    return tuple(value) if isinstance(value, list) else value


def with_overrides(config: BenchConfig, **overrides) -> BenchConfig:
    """``config`` with the non-None ``overrides`` applied (command-line options win)."""
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})
