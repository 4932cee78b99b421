"""Scenario files, in the manner of etcd-io/raft's datadriven tests.

Each file under testdata/ is a list of blocks: a command, a line `----`, the
expected output, and a blank line. Commands build a cluster (`node`, `app`),
change it (`fail`, `suspect`, `recover`, `restore on|off`) and `plan`, which
prints the actions, the plan and the reasons, and carries the plan out.
Set REDGE_REWRITE=1 to rewrite the expected outputs from what the planner
does now, then review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest

from redge.placement.capacity import violations
from redge.placement.planner import plan_for
from redge.placement.problem import (
    App,
    BackupPolicy,
    Health,
    Node,
    Priority,
    Problem,
    Settings,
    Variant,
)

TESTDATA = pathlib.Path(__file__).parent / "testdata"
MB = 1_000_000


def parse_options(words: list[str]) -> dict[str, str]:
    return dict(word.split("=", 1) for word in words)


class Scenario:
    def __init__(self) -> None:
        self.problem = Problem(nodes=(), apps=(), settings=Settings(headroom_fraction=0.0))

    def run(self, command: str) -> str:
        verb, *words = command.split()
        return getattr(self, f"do_{verb.replace('-', '_')}")(words)

    def _replace(self, **changes) -> None:
        self.problem = dataclasses.replace(self.problem, **changes)

    def _set_node(self, node_id: str, **changes) -> None:
        nodes = tuple(
            dataclasses.replace(n, **changes) if n.node_id == node_id else n
            for n in self.problem.nodes
        )
        self._replace(nodes=nodes)

    def do_node(self, words: list[str]) -> str:
        # node ID KIND memory=MB storage=MB
        node_id, kind, *rest = words
        options = parse_options(rest)
        memory = int(options.get("memory", "1000")) * MB
        node = Node(node_id, kind, memory, memory, int(options.get("storage", "1000")) * MB)
        self._replace(nodes=self.problem.nodes + (node,))
        return "ok"

    def do_app(self, words: list[str]) -> str:
        # app NAME PRIORITY slo=MS backup=POLICY variants=NAME:MEMORY_MB:GPU_MS:ACCURACY,...
        name, priority, *rest = words
        options = parse_options(rest)
        variants = []
        for spec in options["variants"].split(","):
            variant_name, memory_mb, gpu_ms, accuracy = spec.split(":")
            variants.append(
                Variant(
                    variant_name,
                    int(memory_mb) * MB,
                    (("gpu", float(gpu_ms)),),
                    float(accuracy),
                    10 * MB,
                )
            )
        app = App(
            name,
            Priority.parse(priority),
            float(options.get("slo", "50")),
            tuple(variants),
            request_rate_per_s=float(options.get("rate", "1")),
            backup=BackupPolicy(options.get("backup", "auto")),
        )
        self._replace(apps=self.problem.apps + (app,))
        return "ok"

    def do_fail(self, words: list[str]) -> str:
        self._set_node(words[0], health=Health.FAILED)
        return "ok"

    def do_suspect(self, words: list[str]) -> str:
        self._set_node(words[0], health=Health.SUSPECTED)
        return "ok"

    def do_recover(self, words: list[str]) -> str:
        self._set_node(words[0], health=Health.ALIVE, hold_down=True)
        return "ok"

    def do_end_hold_down(self, words: list[str]) -> str:
        self._set_node(words[0], hold_down=False)
        return "ok"

    def do_restore(self, words: list[str]) -> str:
        self._replace(restore_allowed=words[0] == "on")
        return "ok"

    def do_plan(self, words: list[str]) -> str:
        result = plan_for(self.problem)
        assert violations(self.problem, result.plan) == []
        lines = [f"epoch {result.plan.epoch} changed={result.changed} complete={result.complete}"]
        for action in result.actions:
            role = action.role.value if action.role else "-"
            lines.append(
                f"  {action.kind.value} {action.app} on {action.node_id}: {action.variant} as {role}"
            )
        lines.append("plan:")
        for replica in result.plan.replicas:
            lines.append(
                f"  {replica.app} {replica.node_id} {replica.variant} {replica.role.value}"
            )
        for reason in result.reasons:
            lines.append(f"  because {reason.app} {reason.kind.value}: {reason.detail}")
        self.problem = self.problem.advanced(result.plan)
        return "\n".join(lines)


def blocks(text: str) -> list[tuple[str, str]]:
    found = []
    for chunk in text.strip("\n").split("\n\n"):
        lines = chunk.split("\n")
        separator = lines.index("----")
        found.append(("\n".join(lines[:separator]).strip(), "\n".join(lines[separator + 1 :])))
    return found


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txt")), ids=lambda p: p.stem)
def test_scenario(path: pathlib.Path) -> None:
    scenario = Scenario()
    rewritten = []
    for command, expected in blocks(path.read_text()):
        actual = scenario.run(command)
        rewritten.append(f"{command}\n----\n{actual}\n")
        if not os.environ.get("REDGE_REWRITE"):
            assert actual == expected, f"{path.name}: {command}"
    if os.environ.get("REDGE_REWRITE"):
        path.write_text("\n".join(rewritten))
