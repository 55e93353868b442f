"""The package's shape, checked from the source: no import cycle, and the layers stay apart.

Every module of ``src/`` (``fedcore`` and each ``fedcore_*`` package) is parsed, and every
import counts, function-local and ``TYPE_CHECKING`` ones included: a cycle hidden in a
function is still a cycle a reader has to hold in their head.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Modules that sit under the researcher and the node: they import neither, nor governance.
LOWER = ("fedcore.wire", "fedcore.params", "fedcore.errors", "fedcore.plugins")
UPPER = ("fedcore.researcher", "fedcore.node", "fedcore.governance")
MAX_TOP_LEVEL = 8


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of src/: dotted name -> (file, is a package)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[0] != "fedcore" and not parts[0].startswith("fedcore_"):
            continue
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


MODULES = _modules()


def _imports(name: str, path: Path, package: bool) -> set[str]:
    """The modules ``name`` imports (``from a import b``: ``a.b`` if a module, else ``a``)."""
    here = name.split(".") if package else name.split(".")[:-1]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                deps.add(full if full in MODULES else module)
    return {d for d in deps if d != name}


GRAPH = {name: _imports(name, path, package) for name, (path, package) in MODULES.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w] & graph.keys()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def _describe(component: list[str]) -> str:
    members = set(component)
    edges = [f"  {m} -> {', '.join(sorted(GRAPH[m] & members))}" for m in component]
    return "\n".join([", ".join(component), *edges])


def test_the_module_walk_sees_the_package():
    assert "fedcore" in MODULES and "fedcore.researcher.experiment" in MODULES
    assert "fedcore.researcher.round" in GRAPH["fedcore.researcher.experiment"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "Import cycles (function-local and TYPE_CHECKING imports count):\n" + (
        "\n".join(_describe(c) for c in cycles))


@pytest.mark.parametrize(("side", "other"), [("fedcore.researcher", "fedcore.node"),
                                             ("fedcore.node", "fedcore.researcher")])
def test_researcher_and_node_never_import_each_other(side, other):
    crossing = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if _within(m, side)
                      for d in deps if _within(d, other))
    assert not crossing, f"{side} imports {other}:\n" + "\n".join(crossing)


def test_lower_layers_import_no_upper_layer():
    crossing = sorted(f"{m} -> {d}" for m, deps in GRAPH.items()
                      if any(_within(m, low) for low in LOWER)
                      for d in deps if any(_within(d, up) for up in UPPER))
    assert not crossing, ("The protocol, the currency, the errors and the registry sit "
                          "under the researcher, the node and governance:\n"
                          + "\n".join(crossing))


def test_few_modules_sit_directly_in_fedcore():
    top = sorted(p.name for p in (SRC / "fedcore").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, (
        f"{len(top)} modules directly under src/fedcore/ (at most {MAX_TOP_LEVEL}): {top}. "
        "Put the new one in the subpackage of its role.")


def test_every_package_ships_its_type_hints():
    root = SRC.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = data["package-data"]
    packages = [p for base in (SRC, root / "apps" / "node", root / "apps" / "researcher")
                for p in sorted(base.glob("fedcore*/__init__.py"))]
    assert len(packages) >= 8
    for init in packages:
        name = init.parent.name
        assert (init.parent / "py.typed").exists(), f"{name} has no py.typed"
        assert "py.typed" in shipped.get(name, []), f"pyproject does not ship {name}/py.typed"
