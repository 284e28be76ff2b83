"""The package's import graph has no circle: arrows only go downward (docs/architecture.md).

Every ``import`` / ``from ... import`` in ``squeezer/`` counts, at module level or inside a function
(a late import that dodges a circle at run time is still an arrow back up). An edge goes to the
module a statement names: ``from .pkg import name`` to ``pkg/name.py`` when that is a module, else to
``pkg/__init__.py``. The implicit import of a module's parent packages is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import squeezer

ROOT = Path(squeezer.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The squeezer modules that ``name`` (at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "squeezer.cli" in graph and "squeezer.api" in graph
    assert "squeezer.api" in graph["squeezer"], "the package's face imports the API"


def test_circle_detection_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    graph = import_graph()
    found = circles(graph)
    detail = "\n".join(
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found
    )
    assert not found, f"import circles in squeezer/:\n{detail}"


ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"


def floors() -> dict[str, int]:
    """The ```floors block of docs/architecture.md: ``N name: prefix prefix ...`` per line, prefixes relative
    to ``squeezer`` (``.`` is the package's face); a module's floor is that of its longest matching prefix."""
    text = ARCHITECTURE.read_text()
    block = text.split("```floors\n", 1)[1].split("```", 1)[0]
    table: dict[str, int] = {}
    for line in block.strip().splitlines():
        number, _, rest = line.partition(" ")
        for prefix in rest.partition(":")[2].split():
            table["squeezer" if prefix == "." else f"squeezer.{prefix}"] = int(number)
    return table


def floor_of(module: str, table: dict[str, int]) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table and (n > 1 or module == "squeezer"):
            return table[".".join(parts[:n])]
    return None


def test_every_module_has_a_floor_in_the_architecture_doc() -> None:
    table = floors()
    missing = sorted(m for m in import_graph() if floor_of(m, table) is None)
    assert not missing, f"modules missing from the floors block of docs/architecture.md: {missing}"


def test_arrows_only_go_down_the_floors_of_the_architecture_doc() -> None:
    table = floors()
    up = [f"{m} (floor {floor_of(m, table)}) -> {t} (floor {floor_of(t, table)})"
          for m, targets in sorted(import_graph().items()) for t in sorted(targets)
          if (floor_of(t, table) or 0) > (floor_of(m, table) or 0)]
    assert not up, "imports that run up the floors of docs/architecture.md:\n" + "\n".join(up)
