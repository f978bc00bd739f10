"""minidiff has no import circle: lower layers never import higher ones (STYLE.md, principle 12).

Every module under minidiff/ is parsed with `ast` (nothing is imported, so this takes a fraction
of a second). Each `import` / `from ... import` statement, at module level or inside a function
(a function-local import is still a dependency, only a hidden one), that names a minidiff module
becomes an edge of the module graph; relative imports are resolved against the importing
module's package. `from minidiff.models import attention` is an edge to minidiff.models.attention
when that is a module, else to the package minidiff.models.

A package's own `__init__` is not counted as a dependency of its submodules: importing
minidiff.models.unet runs minidiff/models/__init__.py first, but an `__init__` that imports its
submodules (minidiff/memory/__init__.py) is the usual re-export, not a circle in the design.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "minidiff"


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every importable .py file of the package. Folders whose
    names are no Python identifiers (package data such as data/clip-tokenizer/) are skipped."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if not all(p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name an import statement of `module` may load, relative ones resolved."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names += [f"{base}.{alias.name}" for alias in node.names] + [base]
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the minidiff modules it imports."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported_names(module, path):
            # The longest prefix that is a module: "minidiff.models.attention.Attention" (a
            # `from` import of a name) -> minidiff.models.attention.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            own_package = module.startswith(name + ".")  # a submodule "depending" on its __init__
            if name and name != module and not own_package:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Depth-first search with three colours."""
    state = dict.fromkeys(graph, "new")  # "new" -> "open" (on the stack) -> "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == "open":
                return stack[stack.index(nxt):] + [nxt]
            if state[nxt] == "new" and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if state[node] == "new" and (cycle := visit(node)):
            return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle, so that one failure reports them all: find a cycle, keep it, drop its
    edges, look again (a tangle of several circles shows as several cycles)."""
    graph = {m: set(ts) for m, ts in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        for a, b in itertools.pairwise(cycle):
            graph[a].discard(b)
    return cycles


def test_the_graph_is_read():
    """The walk sees the package and the edges every model has (a broken parser would find no
    cycle because it found no edges)."""
    graph = import_graph(package_modules())
    assert {"minidiff.models.unet", "minidiff.loading", "minidiff.kernels.flash_attention"} <= graph.keys()
    assert "minidiff.loading" in graph["minidiff.models.unet"]
    assert "minidiff.models.attention" in graph["minidiff.models.transformer"]


def test_a_circle_is_found(tmp_path):
    """Negative control: a two-module circle through a function-local relative import is reported."""
    pkg = tmp_path / "minidiff"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from minidiff.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .a import g\n")
    cycle = find_cycle(import_graph(package_modules(pkg)))
    assert cycle == ["minidiff.sub.a", "minidiff.sub.b", "minidiff.sub.a"]


def test_no_import_circle():
    cycles = all_cycles(import_graph(package_modules()))
    assert not cycles, "import circles in minidiff:\n" + "\n".join(" -> ".join(c) for c in cycles)
