"""The package's shape: data flows one way, and no module reaches into another's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gemmalite"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in `path`, relative ones resolved."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            names = [a.name for a in node.names]
            for name in names:  # `from . import x` imports the module x
                if f"{target}.{name}" in MODULES:
                    found.append((f"{target}.{name}", []))
            found.append((target, names))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return [(m, n) for m, n in found if m == "gemmalite" or m.startswith("gemmalite.")]


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{module_name(path)} imports {name} from {target}"
        for path in FILES
        for target, names in imports(path)
        for name in names
        if name.startswith("_") and not name.endswith("__") and target != module_name(path)
    ]
    assert not offenders, offenders


def import_graph() -> dict[str, set[str]]:
    return {name: {t for t, _ in imports(path) if t in MODULES and t != name} for name, path in MODULES.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # A package's __init__ re-exporting its own modules is not a cycle of ideas: drop child -> parent edges.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_there_is_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = import_graph()
    graph["gemmalite.cache"] = graph["gemmalite.cache"] | {"gemmalite.engine"}  # engine -> ... -> cache -> engine
    assert find_cycles(graph)
