"""The arrows of docs/architecture.md, checked on every import of every module: a part
imports only the parts its arrows allow (imports inside functions count; those under
`if TYPE_CHECKING:` do not, they are types only), agent/ has no import cycle, and parsing a
config does not import pysyncobj."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("agent", "chaos", "consensus", "placement", "runtime")


def allowed_arrows() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- arrows -->\n(.*?)<!-- /arrows -->", text, re.S)
    assert block, "docs/architecture.md lost its arrows block"
    arrows = {}
    for line in block.group(1).strip().splitlines():
        source, _, targets = line.strip().partition("->")
        arrows[source.strip()] = set(targets.split())
    assert set(arrows) == set(PARTS), f"the arrows name {sorted(arrows)}, the parts are {PARTS}"
    return arrows


def imports_of(path: pathlib.Path) -> list[tuple[str, int]]:
    """(redge module imported, line) for every import outside `if TYPE_CHECKING:` blocks."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "redge":
                    found.extend((f"redge.{alias.name}", child.lineno) for alias in child.names)
                else:
                    found.extend((f"{child.module}.{alias.name}", child.lineno) for alias in child.names)
            elif isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno) for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return [(name, line) for name, line in found if name.startswith("redge.")]


def modules(part: str) -> list[pathlib.Path]:
    return sorted((ROOT / part).glob("*.py"))


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_its_arrows_allow(part: str) -> None:
    allowed = allowed_arrows()[part] | {part}
    wrong = []
    for path in modules(part):
        for name, line in imports_of(path):
            target = name.split(".")[1]
            if target in PARTS and target not in allowed:
                wrong.append(f"{part}/{path.name}:{line} imports {name}")
    assert wrong == [], "\n".join(wrong)


def test_the_agent_modules_import_each_other_without_a_cycle() -> None:
    graph = {path.stem: set() for path in modules("agent")}
    for path in modules("agent"):
        for name, _ in imports_of(path):
            parts = name.split(".")
            if parts[1] == "agent" and len(parts) > 2 and parts[2] in graph and parts[2] != path.stem:
                graph[path.stem].add(parts[2])
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the path, 2 done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if state[nxt] == 0 and (found := cycle_from(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if state[start] == 0:
            found = cycle_from(start, [start])
            assert found is None, " -> ".join(found)


def test_the_checker_sees_a_wrong_arrow(tmp_path: pathlib.Path) -> None:
    """The import reader itself: one inside a function counts, one for types only does not."""
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from redge.agent.peer import Peer\n"
        "def f():\n    from redge.chaos.cluster import LocalCluster\n"
        "import redge.runtime.store\n"
        "from redge import consensus\n"
    )
    assert [name for name, _ in imports_of(path)] == ["redge.chaos.cluster.LocalCluster", "redge.runtime.store",
                                                      "redge.consensus"]


def test_parsing_a_config_imports_neither_pysyncobj_nor_torch() -> None:
    code = ("import sys; import redge.agent.config, redge.agent.profile; "
            "print(sorted(m for m in ('pysyncobj', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
