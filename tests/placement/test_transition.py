"""Table-driven cases for the actions between two plans."""

from __future__ import annotations

import pytest

from redge.placement.problem import (
    App,
    Health,
    Node,
    Plan,
    Priority,
    Problem,
    Replica,
    Role,
    Variant,
)
from redge.placement.transition import Action, ActionKind, actions_between

MB = 1_000_000
BIG = Variant("big", 600 * MB, (("gpu", 10.0),), 0.8, 10 * MB)
SMALL = Variant("small", 200 * MB, (("gpu", 4.0),), 0.7, 10 * MB)


def problem(on_disk: frozenset[str] = frozenset(), failed: bool = False) -> Problem:
    nodes = (
        Node(
            "a", "gpu", 1000 * MB, 1000 * MB, 1000 * MB, Health.FAILED if failed else Health.ALIVE
        ),
        Node("b", "gpu", 1000 * MB, 1000 * MB, 1000 * MB),
    )
    apps = (
        App("x", Priority.STANDARD, 50.0, (BIG, SMALL)),
        App("y", Priority.CRITICAL, 50.0, (BIG, SMALL)),
    )
    return Problem(nodes, apps, artifacts={"b": on_disk})


def r(app: str, node: str, variant: str, role: Role) -> Replica:
    return Replica(app, node, variant, role)


P, W, C = Role.PRIMARY, Role.WARM, Role.COLD


@pytest.mark.parametrize(
    ("before", "after", "on_disk", "expected"),
    [
        ([], [r("x", "b", "big", P)], frozenset(), [Action(ActionKind.LOAD, "x", "b", "big", P)]),
        (
            [r("x", "b", "big", W)],
            [r("x", "b", "big", P)],
            frozenset(),
            [Action(ActionKind.PROMOTE, "x", "b", "big", P)],
        ),
        (
            [r("x", "b", "big", P)],
            [r("x", "b", "big", W)],
            frozenset(),
            [Action(ActionKind.DEMOTE, "x", "b", "big", W)],
        ),
        (
            [r("x", "b", "big", W)],
            [r("x", "b", "big", C)],
            frozenset(),
            [Action(ActionKind.DEMOTE, "x", "b", "big", C)],
        ),
        (
            [],
            [r("x", "b", "big", C)],
            frozenset(),
            [Action(ActionKind.PREFETCH, "x", "b", "big", C)],
        ),
        ([], [r("x", "b", "big", C)], frozenset({"big"}), []),
        (
            [r("x", "b", "big", C)],
            [r("x", "b", "big", P)],
            frozenset({"big"}),
            [Action(ActionKind.LOAD, "x", "b", "big", P)],
        ),
        (
            [r("x", "b", "big", P)],
            [],
            frozenset(),
            [Action(ActionKind.UNLOAD, "x", "b", "big", None)],
        ),
        ([r("x", "b", "big", C)], [], frozenset(), []),
        (
            [r("x", "b", "small", P)],
            [r("x", "b", "big", P)],
            frozenset(),
            [
                Action(ActionKind.LOAD, "x", "b", "big", P),
                Action(ActionKind.UNLOAD, "x", "b", "small", None),
            ],
        ),
        # nothing is asked of a failed node
        ([r("x", "a", "big", P)], [], frozenset(), []),
    ],
)
def test_actions_between(before, after, on_disk, expected) -> None:
    failed = any(rep.node_id == "a" for rep in before)
    actions = actions_between(
        problem(on_disk, failed), Plan(1, tuple(before)), Plan(2, tuple(after))
    )
    assert list(actions) == expected


def test_order_promotes_then_frees_then_loads_by_priority_then_prefetches() -> None:
    before = [r("x", "b", "big", W), r("y", "b", "small", P)]
    after = [
        r("x", "b", "big", P),
        r("y", "a", "big", P),
        r("x", "a", "small", C),
        r("y", "b", "small", W),
    ]
    kinds = [
        (a.kind, a.app)
        for a in actions_between(problem(), Plan(1, tuple(before)), Plan(2, tuple(after)))
    ]
    assert kinds == [
        (ActionKind.PROMOTE, "x"),
        (ActionKind.DEMOTE, "y"),
        (ActionKind.LOAD, "y"),
        (ActionKind.PREFETCH, "x"),
    ]
