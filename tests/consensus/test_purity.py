"""consensus/ is a pure state machine with one thin adapter to pysyncobj around it.

The state, the commands and their errors import no I/O, no clock and no randomness; only the
adapter (raft.py, and shim.py for pysyncobj's internals) may touch threads, sockets, time
or pysyncobj. This pins both halves, so neither can grow into the other unnoticed.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

CONSENSUS = pathlib.Path(__file__).resolve().parents[2] / "consensus"
IMPURE = {"asyncio", "aiohttp", "torch", "time", "random", "socket", "threading", "pysyncobj", "os", "subprocess",
          "structlog", "errno", "select"}
ADAPTER = {"raft.py", "shim.py"}


def imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(p for p in CONSENSUS.glob("*.py") if p.name not in ADAPTER), ids=lambda p: p.name)
def test_the_state_machine_and_its_commands_import_nothing_impure(path: pathlib.Path) -> None:
    assert imported(path) & IMPURE == set(), f"{path.name} imports {sorted(imported(path) & IMPURE)}"
    assert "redge.agent" not in path.read_text() and "redge.runtime" not in path.read_text()


def test_only_the_adapter_touches_threads_sockets_or_pysyncobj() -> None:
    impure = {path.name for path in CONSENSUS.glob("*.py") if imported(path) & IMPURE}
    assert impure == ADAPTER


def test_the_shim_reaches_into_pysyncobj_and_nothing_else_impure() -> None:
    """Threads, sockets, clocks and the event loop are raft.py's alone: the shim only reads
    and patches pysyncobj (errno for the codes its transport reports)."""
    assert imported(CONSENSUS / "shim.py") & IMPURE == {"pysyncobj", "errno"}
