"""The package's imports run one way: no module reaches, through any chain of imports (at the top or inside a
function), a module that imports it back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import shadow

PACKAGE = Path(shadow.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` names in its imports, each as the most specific module it names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shadow") and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One chain per module that can reach itself: the path back to it, found depth first."""
    found = []
    for start in sorted(graph):
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop()
            for nxt in sorted(graph[path[-1]]):
                if nxt == start:
                    found.append([*path, start])
                    paths = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append([*path, nxt])
    return found


def test_no_module_imports_itself_through_others():
    loops = cycles(import_graph())
    assert not loops, "import cycles: " + "; ".join(" → ".join(loop) for loop in loops)


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                        ["c", "a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_error_types_and_the_schema_import_nothing_of_shadow():
    graph = import_graph()
    assert graph["shadow.errors"] == set() and graph["shadow.config"] == set()


def test_the_wheel_lists_every_package():
    """pyproject.toml names the packages (conf/ maps into the wheel as shadow.conf): every one there is."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    listed = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    found = {module_name(path.parent / "__init__.py") for path in PACKAGE.rglob("__init__.py")}
    assert set(re.findall(r'"([\w.]+)"', listed)) == found | {"shadow.conf"}
