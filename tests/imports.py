"""The import graph of onnx_qubo read with ast, and its circles.

An edge ``a -> b`` is any import of module ``b`` written in ``a`` (at module level, inside a
function, or under ``TYPE_CHECKING``: a type-only import still ties the two modules' designs).
``from .pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
A circle is a strongly connected component of more than one module.

    python tests/imports.py     # lists the circles, one per line
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_qubo"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name (``onnx_qubo.forms.base``) -> file, the passes link left out (passes/ is
    a layer of its own, checked by tests/passes/test_pass_layer.py)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if len(parts) > 1 and parts[1] == "passes":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _is_module(name: str, root: Path) -> bool:
    """Whether ``name`` is a module or package of the package at ``root`` (the passes link included)."""
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def edges(found: dict[str, Path], root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package (at ``root``) it imports."""
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = _package_of(name, path).split(".")
                    package = package[:len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}", root) else base
                           for alias in node.names]
            graph[name] |= {t for t in targets if t in found and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


if __name__ == "__main__":
    circles = cycles(edges(modules()))
    for circle in circles:
        print(" <-> ".join(circle))
    print(f"{len(circles)} import circle(s) inside onnx_qubo")
