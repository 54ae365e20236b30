"""The core reads top-down: no import cycles among editpeft's modules (function-level imports
count; ``if TYPE_CHECKING:`` blocks do not), and ``import editpeft`` needs no Unix-only module."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import editpeft

ROOT = Path(editpeft.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return getattr(t, "id", None) == "TYPE_CHECKING" or getattr(t, "attr", None) == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """editpeft modules imported anywhere in ``path`` at run time."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (child.level - 1)] if child.level else []
                target = ".".join(base + ([child.module] if child.module else []))
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            visit(child)
    visit(ast.parse(path.read_text()))
    # a package's __init__ re-exports; importing a submodule runs it, so it is not an edge here
    return {m for m in found if m in modules and m != name and not (ROOT / Path(*m.split(".")[1:]) / "__init__.py").exists()}


def _graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py") if p.name != "__init__.py"]
    modules = {_module_name(p) for p in files} | {"editpeft", "editpeft.evaluation"}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := dfs(w)):
                return found
        state[v] = 2
        path.pop()
        return None
    for v in sorted(graph):
        if v not in state and (found := dfs(v)):
            return found
    return None


def test_no_import_cycles_in_the_core():
    graph = _graph()
    assert "editpeft.adapters" in graph and graph["editpeft.editable"], "the import reader found nothing"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_reader_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_needs_no_unix_only_module():
    blocked = "import sys\nfor m in ('resource', 'fcntl', 'termios', 'pwd', 'grp'): sys.modules[m] = None\nimport editpeft\n"
    subprocess.run([sys.executable, "-c", blocked], check=True)
