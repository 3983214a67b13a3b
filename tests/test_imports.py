"""No import cycle: among the bench/ modules, and among the project's packages (model, data, eval, training, app,
bench, layered in that order). Every import a module runs counts, function-level ones included (a cycle hidden
inside a function is still a cycle); imports under ``if TYPE_CHECKING:`` run only for the type checker and do not."""

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> set[str]:
    """The modules the code of ``tree`` imports when it runs, at any depth, outside ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from bench import compare
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def bench_graph() -> dict[str, set[str]]:
    """bench module -> the bench modules it imports."""
    modules = {f"bench.{path.stem}": path for path in BENCH.glob("*.py") if path.stem != "__init__"}
    return {
        name: {m for m in runtime_imports(ast.parse(path.read_text())) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (a depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_bench_modules_import_each_other_without_a_cycle():
    graph = bench_graph()
    assert {"bench.run", "bench.lengths", "bench.worker", "bench.memory"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize(
    "source, imported",
    [
        ("def f():\n    from bench.run import x\n", {"bench.run", "bench.run.x"}),
        ("if TYPE_CHECKING:\n    from bench.run import x\n", set()),
        ("if TYPE_CHECKING:\n    pass\nelse:\n    import bench.worker\n", {"bench.worker"}),
    ],
)
def test_function_level_imports_count_and_type_checking_ones_do_not(source, imported):
    assert runtime_imports(ast.parse(source)) == imported


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


PACKAGES = ("model", "data", "eval", "training", "app", "bench")
"""The project's packages, each importing only those before it (app and bench are both on top)."""


def package_graph() -> dict[str, set[str]]:
    """package -> the other project packages its modules import when they run (function-level imports included)."""
    root = BENCH.parent
    graph: dict[str, set[str]] = {name: set() for name in PACKAGES}
    for name in PACKAGES:
        for path in (root / name).rglob("*.py"):
            tops = {m.split(".")[0] for m in runtime_imports(ast.parse(path.read_text()))}
            graph[name] |= {top for top in tops if top in PACKAGES and top != name}
    return graph


def test_the_packages_are_layered_without_a_cycle():
    """model <- data <- eval <- training <- bench, app beside bench: data/tasks.py once imported eval/ while eval/
    imported data/ (the task protocol now lives in training/tasks.py)."""
    graph = package_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    order = {name: n for n, name in enumerate(PACKAGES)}
    upward = {(a, b) for a, deps in graph.items() for b in deps if order[b] > order[a] and {a, b} != {"app", "bench"}}
    assert not upward, f"imports against the layering: {sorted(upward)}"
    assert graph["model"] == set()
