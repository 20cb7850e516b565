"""The tree shows the design: the producer meets the worker only in the shared modules, no module imports its way
back to itself, no module needs a table of contents, and the scripts use public names only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worker.testing import PROJECT_ROOT

# What a producer (a web backend, the bulk command) may import of the worker package: records, settings, errors, the
# task contract, the results store and the turn events. Never the engine, the tasks or the runtime (they bring torch
# and the model).
SHARED = {"worker.settings", "worker.schemas", "worker.errors", "worker.events", "worker.contract", "worker.store"}
MAX_LINES = 400  # a module over this is several modules


def modules(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    out = {}
    for package in packages:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """The modules a file imports (relative imports resolved), at module level only if asked."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def owning(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``worker.store.keys.Keys`` -> ``worker.store.keys``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def test_the_producer_imports_only_the_shared_modules_of_the_worker():
    known = modules("worker", "producer")
    wrong = {}
    for module, path in modules("producer").items():
        for name in imports(path, module):
            target = owning(name, known)
            if target and target.startswith("worker") and not any(
                target == s or target.startswith(s + ".") for s in SHARED
            ):
                wrong.setdefault(module, set()).add(target)
    assert wrong == {}, f"the producer reaches into the worker beyond {sorted(SHARED)}: {wrong}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle reachable in a module graph, each found once (depth-first search)."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_its_way_back_to_itself():
    # Module-level imports only: an import inside a function runs later, on purpose (torch enters a worker there).
    known = modules("worker", "producer")
    graph = {}
    for module, path in known.items():
        targets = {owning(name, known) for name in imports(path, module, top_level_only=True)}
        # A package's __init__ re-exporting its own modules is not a cycle of design.
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    assert import_cycles(graph) == []


@pytest.mark.parametrize("path", sorted(modules("worker", "producer").values()), ids=lambda p: str(p.name))
def test_no_module_is_several_modules(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines: split it by job"


def test_scripts_use_public_names_only():
    private = re.compile(r"(?:\bimport\s+_\w+|\w\._[a-z]\w*)")
    for path in sorted((PROJECT_ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not any(a.name.startswith("_") for a in node.names), f"{path.name} imports a private name"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                raise AssertionError(f"{path.name}:{node.lineno} reads the private {node.attr!r}")
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
    assert private.search("engine._cache_kw") and not private.search("engine.cache")


def test_every_file_the_readme_points_to_exists():
    readme = (PROJECT_ROOT / "README.md").read_text()
    table = readme.split("| where is… | file |", 1)[1].split("\n\n", 1)[0]
    paths = re.findall(r"`((?:worker|producer|scripts|docs|tests)/[\w/.-]*|celeryconfig\.py)`", table)
    assert len(paths) > 10
    missing = [p for p in paths if not (PROJECT_ROOT / p).exists()]
    assert missing == []
