"""The package's shape: no import circles, no overlong functions, one plugin loader.

These read the source with :mod:`ast` (nothing is imported), so they also
hold for code paths the other tests do not reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pixicache"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every pixicache module ``module`` imports, at any depth (functions included),
    except under ``if TYPE_CHECKING:`` (annotations only: never executed)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def target(name: str) -> None:
        # "pixicache.a.b.c" may be a module or a name in "pixicache.a.b": take the longest module
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if not mod.startswith("pixicache"):
                    continue
                for alias in child.names:
                    target(f"{mod}.{alias.name}")
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that ends where it starts), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := dfs(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_of_pixicache_has_no_circles():
    graph = import_graph()
    assert len(graph) > 50  # the walk saw the package
    assert "pixicache.store.cas" in graph["pixicache.fetch.fetcher"] or "pixicache.store" in graph["pixicache.fetch.fetcher"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def _functions() -> list[tuple[int, str]]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                out.append((length, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_function_is_longer_than_100_lines():
    too_long = [f"{where} ({n} lines)" for n, where in _functions() if n > MAX_FUNCTION_LINES]
    assert not too_long, "split these: " + ", ".join(too_long)


@pytest.mark.parametrize("group", ["pixicache.sources", "pixicache.installers"])
def test_plugins_are_registered_once_in_pyproject_not_in_code(group):
    text = "".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "_BUILTIN" not in text and "load_entry_points" not in text
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert f'[project.entry-points."{group}"]' in pyproject
