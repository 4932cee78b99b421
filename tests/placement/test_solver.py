"""The exact solver: feasible, optimal on cases with a known answer, bounded."""

from __future__ import annotations

import pytest

from redge.placement.capacity import violations
from redge.placement.errors import ProblemTooLarge
from redge.placement.objective import objective
from redge.placement.planner import plan_for
from redge.placement.problem import (
    App,
    BackupPolicy,
    Node,
    Priority,
    Problem,
    Role,
    Settings,
    Variant,
)
from redge.placement.solver import solve

MB = 1_000_000
BIG = Variant("big", 600 * MB, (("gpu", 10.0),), 0.80, 10 * MB)
SMALL = Variant("small", 200 * MB, (("gpu", 4.0),), 0.70, 10 * MB)
SETTINGS = Settings(headroom_fraction=0.0, loads_per_plan_max=None, prefetches_per_plan_max=None)


def node(node_id: str, memory_mb: int) -> Node:
    return Node(node_id, "gpu", memory_mb * MB, memory_mb * MB, 1000 * MB)


def app(name: str, priority: Priority, backup: BackupPolicy = BackupPolicy.AUTO) -> App:
    return App(name, priority, 50.0, (BIG, SMALL), request_rate_per_s=1.0, backup=backup)


def test_warm_backup_and_largest_variant_when_room() -> None:
    problem = Problem(
        (node("a", 1000), node("b", 1000)), (app("x", Priority.CRITICAL),), settings=SETTINGS
    )
    result = solve(problem)
    assert result.optimal
    assert not violations(problem, result.plan)
    assert result.plan.primary_of("x").variant == "big"
    assert {r.role for r in result.plan.replicas} == {Role.PRIMARY, Role.WARM}
    assert result.objective == pytest.approx(objective(problem, result.plan))


def test_solver_sheds_lowest_priority_like_the_planner() -> None:
    apps = (
        app("c", Priority.CRITICAL, BackupPolicy.NONE),
        app("s", Priority.STANDARD, BackupPolicy.NONE),
        app("b", Priority.BEST_EFFORT, BackupPolicy.NONE),
    )
    problem = Problem((node("a", 450),), apps, settings=SETTINGS)
    exact = solve(problem)
    heuristic = plan_for(problem)
    assert (
        {r.app for r in exact.plan.replicas}
        == {r.app for r in heuristic.plan.replicas}
        == {"c", "s"}
    )
    assert objective(problem, heuristic.plan) == pytest.approx(exact.objective)


def test_solver_refuses_problems_past_its_bound() -> None:
    apps = tuple(app(f"a{k}", Priority.STANDARD) for k in range(10))
    problem = Problem(tuple(node(f"n{k}", 1000) for k in range(10)), apps, settings=SETTINGS)
    with pytest.raises(ProblemTooLarge):
        solve(problem, variables_max=100)
