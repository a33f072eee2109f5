"""The package's layering, read from the source: imports inside functions count as much as those at the top.

An import inside a function hides a circle from Python (nothing fails at import time) but not from a reader; and a
module that takes another's private name depends on what that module may change at will.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import lmforge

PACKAGE = Path(lmforge.__file__).parent
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# Third-party modules a runtime install may lack: module -> the extra that brings it. Each is imported only by the
# module that exists for it (eval/lm_eval_adapter.py), never on a path a subcommand takes.
OPTIONAL = {"lm_eval": "lm-eval"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("lmforge", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name) for every lmforge import anywhere in `tree`; name is None for `import lmforge.x`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmforge"):
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("lmforge")]
    return found


def _graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the lmforge modules it imports (`from lmforge.quant import layers` imports lmforge.quant.layers)."""
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        targets = set()
        for module, member in _imports(tree):
            target = f"{module}.{member}" if f"{module}.{member}" in modules else module
            while target not in modules:
                target = target.rpartition(".")[0]
            targets.add(target)
        graph[name] = targets - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that can reach itself (depth-first search from it)."""
    circles = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    circles.append([*path, start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return circles


def test_no_import_circles() -> None:
    assert _circles(_graph(_modules())) == []


def test_the_circle_finder_finds_one() -> None:  # so that the test above cannot pass by finding nothing
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [" -> ".join(c) for c in _circles(graph)] == ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]
    hidden = {"lmforge": ast.parse("from lmforge import x"), "lmforge.y": ast.parse("import lmforge"),
              "lmforge.x": ast.parse("def f():\n    from lmforge.y import g\n")}  # the import inside a function
    assert ["lmforge", "lmforge.x", "lmforge.y", "lmforge"] in _circles(_graph(hidden))


def test_no_module_takes_another_modules_private_names() -> None:
    taken = [
        f"{name} <- {module}.{member}"
        for name, tree in _modules().items()
        for module, member in _imports(tree)
        if member and member.startswith("_") and not member.startswith("__")
    ]
    assert taken == []


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """`make setup` installs `dependencies` only: a module imported at run time from elsewhere (psutil once came
    from the test extras) fails for a new user and passes the suite. .ci/smoke_runtime.sh checks the same by
    running every subcommand in an install without extras; this catches it before CI does."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    declared = {_distribution(r) for r in project["dependencies"]}
    extras = {name: {_distribution(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    providers = importlib.metadata.packages_distributions()
    imported = {module.split(".")[0] for tree in _modules().values() for node in ast.walk(tree)
                for module in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                               [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])}
    third_party = sorted(imported - set(sys.stdlib_module_names) - {"lmforge", "__future__"})
    assert "torch" in third_party and "psutil" in third_party  # the scan sees imports inside functions
    undeclared = []
    for module in third_party:
        names = {_distribution(d) for d in providers.get(module, [module])}
        wanted = extras.get(OPTIONAL[module], set()) if module in OPTIONAL else declared
        if not names & wanted:
            undeclared.append(f"{module} (from {', '.join(sorted(names))})")
    assert undeclared == [], undeclared


def test_the_cache_path_lives_below_everything() -> None:
    graph = _graph(_modules())
    assert graph["lmforge.paths"] == set()
    assert "lmforge.catalog" not in graph["lmforge.kernels"]
