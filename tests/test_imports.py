"""hpcseg's modules import downwards: no circle anywhere (module-level or function-level imports), and `test` and
`predict` never import the training loop. The imports are read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(root: Path) -> dict[str, Path]:
    """Every module under `root` by dotted name (a package by its own name, for its __init__.py)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(root: Path) -> dict[str, set[str]]:
    """For each module under `root`, the modules of that package it imports anywhere in its body (at the top, in a
    function, in a conditional), relative or absolute."""
    modules = module_names(root)
    package = root.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `.` is this module's package, each further dot one package up
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from . import volumes` imports the module volumes; `from .train import train` the module train
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import hpcseg.cluster.lsf.x`: the longest module
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == package and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle of imports as the modules around it (the first repeated at the end), one per strongly connected
    group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(_path_around(graph, sorted(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _path_around(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One circle through the group's first module, found breadth first inside the group."""
    start, inside = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return group  # not reached: a strongly connected group has a circle through each member


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_hpcseg_has_no_import_circle():
    found = circles(imports(SRC / "hpcseg"))
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_test_and_predict_do_not_import_the_training_loop():
    graph = imports(SRC / "hpcseg")
    for module in ("hpcseg.evaluate", "hpcseg.predict"):
        assert "hpcseg.train" not in reaches(graph, module), module
    # what they share they take from the modules below them
    assert {"hpcseg.trained", "hpcseg.views", "hpcseg.segment"} <= graph["hpcseg.evaluate"] & graph["hpcseg.predict"]
    assert "hpcseg.device" in graph["hpcseg.trained"] and "hpcseg.device" in graph["hpcseg.train"]


def test_the_walk_sees_function_level_relative_and_absolute_imports():
    graph = imports(SRC / "hpcseg")
    assert "hpcseg.train" in graph["hpcseg.cli"]  # `from .train import train as run_training` inside a command
    assert "hpcseg.train" in graph["hpcseg.cluster.jobrunner"]  # `from ..train import train`, two levels
    assert "hpcseg.volumes" in graph["hpcseg.demo_data"]  # `from hpcseg import volumes`, absolute
    assert "hpcseg" in graph["hpcseg.cluster.submit"]  # `from .. import __version__`: the package itself
    assert "hpcseg.cluster.backends" in graph["hpcseg.cluster.submit"]  # `from . import backends`: a module


@pytest.mark.parametrize("second", [
    "def late():\n    from .a import thing\n",  # a function-level relative import closes the circle
    "import pkg.a\n",  # an absolute one
    "from pkg.sub import c\n",  # through a subpackage: b -> c -> a -> b
])
def test_a_circle_is_found_and_named(tmp_path, second):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text(second)
    (pkg / "sub" / "c.py").write_text("from ..a import thing\n")
    graph = imports(pkg)
    found = circles(graph)
    assert len(found) == 1, found
    assert found[0][0] == found[0][-1] == "pkg.a" and "pkg.b" in found[0], found
    assert circles({**graph, "pkg.b": set()}) == []  # and none once the back edge is gone
