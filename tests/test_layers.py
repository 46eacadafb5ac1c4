"""The package's modules import one another without circles, so that each floor can be read
and tested with only the floors below it. Imports under `if TYPE_CHECKING:` do not count."""

import ast
import re
from pathlib import Path

import gatekeeper

PACKAGE = Path(gatekeeper.__file__).parent


def _imports(path: Path) -> set[str]:
    """Sibling modules `path` imports at run time, at any depth (late imports included)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _cython_imports(path: Path) -> set[str]:
    """Cython is not Python: its (c)imports are read line by line."""
    pattern = re.compile(r"^\s*from\s+(?:\.|gatekeeper\.)(\w+)\s+c?import\b", re.M)
    return set(pattern.findall(path.read_text()))


def _graph() -> dict[str, set[str]]:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    for p in PACKAGE.glob("*.pyx"):
        # a module's declarations (its .pxd) cimport too
        parts = [p, *PACKAGE.glob(f"{p.stem}.pxd")]
        graph[p.stem] = set().union(*map(_cython_imports, parts))
    return {name: found & graph.keys() for name, found in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_finder_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_import_without_circles():
    graph = _graph()
    assert {"policy", "sockets", "auth", "cli", "demo", "control", "proxy"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_schema_sits_below_sockets_and_auth():
    graph = _graph()
    assert graph["policy"] <= {"rules", "keys", "redis_url"}, graph["policy"]
    assert graph["keys"] == set(), graph["keys"]
    assert graph["redis_url"] == set(), graph["redis_url"]  # a leaf, as keys


def test_control_and_metrics_do_not_import_the_proxy():
    graph = _graph()
    assert "proxy" not in graph["control"] and "proxy" not in graph["metrics"]
    assert "cli" not in graph["demo"], "the control client lives in control.py"
