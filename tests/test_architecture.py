"""The house rules, checked on the code: imports run one way, down the declared layers, and nothing
imports in a loop (see docs/architecture.md). Imports are read with ``ast``, lazy ones inside
functions included, so a late ``from ..x import y`` cannot hide a loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clipxfer"

#: Bottom to top. A unit is a subpackage or a module at the package root; a unit may import units of
#: its own layer or below, never above, and units never import each other in a loop.
LAYERS = [
    ("foundations", ["clipxfer", "errors", "paths", "csvcells", "extras", "images", "device", "progress",
                     "sample_photos", "metrics", "plots", "vector_math"]),
    ("runtime", ["runtime"]),
    ("encoders", ["encoders"]),
    ("datasets", ["datasets"]),
    ("parts", ["heads", "index", "calibrate"]),
    ("tasks", ["classify", "fewshot", "metalearn", "finetune", "anomaly", "embed", "export", "autofit"]),
    ("benchmarks", ["bench"]),
    ("server", ["serve"]),
    ("command line", ["cli", "__main__"]),
]  # fmt: skip
LAYER_OF = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = ["clipxfer", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def unit_of(module: str) -> str:
    """``clipxfer.heads.probe`` -> ``heads``; ``clipxfer.errors`` -> ``errors``; ``clipxfer`` -> ``clipxfer``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(module: str) -> set[str]:
    """Every clipxfer module ``module`` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported_modules(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_unit_has_a_declared_layer():
    undeclared = sorted({unit_of(module) for module in MODULES} - set(LAYER_OF))
    assert not undeclared, f"add these to LAYERS (and docs/architecture.md): {undeclared}"


def test_no_import_runs_up_a_layer():
    upward = [
        f"{module} ({LAYERS[LAYER_OF[unit_of(module)]][0]}) imports {target} ({LAYERS[LAYER_OF[unit_of(target)]][0]})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if LAYER_OF[unit_of(target)] > LAYER_OF[unit_of(module)]
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_module_import_loop():
    # A package's __init__ re-exports its modules; a module importing its own package's __init__
    # would be a loop through it, so that edge counts too.
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_no_module_imports_the_package_it_lives_in():
    # A package's __init__ imports (or registers) its modules: a module importing that __init__ back
    # is a loop the registry hides. The root package is exempt: it imports nothing (its names are lazy).
    inward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if target != "clipxfer" and module.startswith(target + ".")
    ]
    assert not inward, "\n".join(inward)


def test_no_loop_between_units():
    units: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    cycle = find_cycle(units)
    assert cycle is None, "units import each other in a loop: " + " -> ".join(cycle)


def test_the_checks_catch_a_loop_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert LAYER_OF["heads"] > LAYER_OF["encoders"] and LAYER_OF["cli"] == len(LAYERS) - 1


def test_every_module_imports():
    # In a child process: importing everything here would leave optional packages in this worker's
    # sys.modules and hide "missing extra" paths from the tests that fake them.
    modules = sorted(m for m in MODULES if m != "clipxfer.__main__")
    script = (
        "import importlib, sys, traceback\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        print(name, traceback.format_exc(limit=1), file=sys.stderr)\n"
        "        sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]


def test_model_ids_are_read_without_torch():
    # Artifacts' ids are compared and turned into --model specs without loading a model.
    script = "import sys, clipxfer.encoders.ids as ids; ids.spec_for_id(ids.LITE_ID); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
