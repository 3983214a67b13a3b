"""The import graph among the bench/ modules has no cycle: every import a module runs counts, function-level ones
included (a cycle hidden inside a function is still a cycle); imports under ``if TYPE_CHECKING:`` run only for the
type checker and do not."""

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
