"""placement/ is the pure core: no I/O, no clock, no randomness of its own."""

from __future__ import annotations

import ast
import pathlib

import pytest

PLACEMENT = pathlib.Path(__file__).resolve().parents[2] / "placement"
FORBIDDEN = {
    "asyncio",
    "aiohttp",
    "torch",
    "time",
    "random",
    "socket",
    "threading",
    "pysyncobj",
    "os",
    "subprocess",
}


def imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(PLACEMENT.glob("*.py")), ids=lambda p: p.name)
def test_module_imports_nothing_impure(path: pathlib.Path) -> None:
    for name in imported(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {name}"
        if top == "scipy":  # a development dependency: only the exact solver may use it
            assert path.name == "solver.py", f"{path.name} imports {name}"
        if top == "redge":
            assert name.startswith(("redge.placement", "redge.consensus")), (
                f"{path.name} imports {name}"
            )


@pytest.mark.parametrize("path", sorted(PLACEMENT.glob("*.py")), ids=lambda p: p.name)
def test_module_says_why_it_exists(path: pathlib.Path) -> None:
    if path.name == "__init__.py":
        return
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"
