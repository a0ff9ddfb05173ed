"""The package's import graph points down the layers and has no circles.

functional -> methods -> sparsify -> models / flops / budgets -> training -> export -> cli:
a module imports only from its own layer or the ones below, wherever the import stands
(an import inside a function counts), and no two modules import each other at run time
(a name used only in annotations, under ``if TYPE_CHECKING:``, may point back: e.g.
``strsparse.data`` types its argument as the ``DataConfig`` that validates dataset names).
"""

from __future__ import annotations

import ast
from pathlib import Path

import strsparse

PACKAGE = Path(strsparse.__file__).parent

# first matching prefix wins; lower numbers are lower layers
LAYERS = [
    ("strsparse.__main__", 7),
    ("strsparse.cli", 6),
    ("strsparse.export", 5),
    ("strsparse.inference.deploy", 5),  # convert --format sparse|onnx from a run
    ("strsparse.training", 4),
    ("strsparse.sparsify", 2),
    ("strsparse.methods", 1),
    ("strsparse.functional", 0),
    ("strsparse.atomic", 0),
    ("strsparse.layers", 0),
    ("strsparse.errors", 0),
    ("strsparse.formatting", 0),
    ("strsparse.", 3),  # models, flops, budgets, report, data, config, plots
]
FACADE = "strsparse"  # __init__: the public API, re-exports every layer
BASE = "strsparse.methods.base"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + "."):
            return layer
    raise AssertionError(f"no layer for {module}")


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    return {
        node
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def _imports(module: str, *, run_time: bool = False) -> set[str]:
    """The strsparse modules ``module`` imports anywhere in its file (``from strsparse import
    data`` counts as ``strsparse.data``); ``run_time`` leaves out ``TYPE_CHECKING`` blocks."""
    found: set[str] = set()
    tree = ast.parse(MODULES[module].read_text())
    skip = _type_checking_only(tree) if run_time else set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(n for n in names if n in MODULES)
            if not any(n in MODULES for n in names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != module}


def test_every_import_points_down_the_layers() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module in MODULES
        if module != FACADE
        for target in _imports(module)
        if target != FACADE and _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_library_code_never_imports_the_facade_or_the_cli() -> None:
    offenders = [
        f"{module} imports {target}"
        for module in MODULES
        if module not in (FACADE, "strsparse.__main__", "strsparse.cli")
        for target in _imports(module)
        if target in (FACADE, "strsparse.cli")
    ]
    assert not offenders, "\n".join(offenders)


def test_no_two_modules_import_each_other() -> None:
    graph = {m: _imports(m, run_time=True) - {FACADE} for m in MODULES}
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "\n".join(sorted(cycles))


def test_methods_stand_beside_each_other() -> None:
    """A method file imports the shared base and the pure math, never another method."""
    methods = [m for m in MODULES if m.startswith("strsparse.methods.") and m != BASE]
    peers = [f"{m} imports {t}" for m in methods for t in _imports(m) if t in methods]
    assert methods and not peers, "\n".join(peers)
