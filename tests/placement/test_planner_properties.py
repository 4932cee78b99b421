"""Hypothesis properties of the planner on seeded random clusters.

Instances come from `testbed.random_problem` with a `random.Random` seeded by
hypothesis, so a failure prints the seed that reproduces it.
"""

from __future__ import annotations

import dataclasses
import random
import statistics

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redge.placement.capacity import violations
from redge.placement.objective import objective
from redge.placement.planner import ReasonKind, plan_for
from redge.placement.problem import Health, Plan, Problem, Replica, Role, Settings
from redge.placement.solver import solve
from redge.placement.testbed import random_problem
from redge.placement.transition import ActionKind

UNBOUNDED = Settings(loads_per_plan_max=None, prefetches_per_plan_max=None)
GAP_INSTANCE_MAX = 0.4
"""A bound, not a guarantee: the worst of 200 benchmark instances was 23 %."""
GAP_MEAN_MAX = 0.03


def instance(
    seed: int, node_count: int, app_count: int, pressure: float, settings: Settings = UNBOUNDED
) -> Problem:
    return random_problem(
        random.Random(seed), node_count, app_count, memory_pressure=pressure, settings=settings
    )


problems = st.builds(
    instance,
    seed=st.integers(0, 2**32 - 1),
    node_count=st.integers(1, 8),
    app_count=st.integers(0, 24),
    pressure=st.floats(0.3, 2.5),
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fail_nodes(problem: Problem, node_ids: set[str], health: Health = Health.FAILED) -> Problem:
    nodes = tuple(
        dataclasses.replace(n, health=health) if n.node_id in node_ids else n for n in problem.nodes
    )
    return dataclasses.replace(problem, nodes=nodes)


@PROPERTY
@given(problems)
def test_plan_is_feasible(problem: Problem) -> None:
    result = plan_for(problem)
    assert violations(problem, result.plan) == []
    for app in problem.apps:
        assert sum(r.role is Role.PRIMARY for r in result.plan.replicas_of(app.name)) <= 1


@PROPERTY
@given(problems, st.integers(1, 6), st.integers(1, 6))
def test_loads_and_prefetches_stay_within_their_bounds(
    problem: Problem, loads: int, prefetches: int
) -> None:
    bounded = dataclasses.replace(
        problem, settings=Settings(loads_per_plan_max=loads, prefetches_per_plan_max=prefetches)
    )
    result = plan_for(bounded)
    kinds = [a.kind for a in result.actions]
    assert kinds.count(ActionKind.LOAD) <= loads
    assert kinds.count(ActionKind.PREFETCH) <= prefetches
    assert violations(bounded, result.plan) == []


@PROPERTY
@given(problems)
def test_planning_again_on_the_result_changes_nothing(problem: Problem) -> None:
    first = plan_for(problem)
    assert first.complete
    second = plan_for(problem.advanced(first.plan))
    assert second.plan == first.plan
    assert second.actions == () and not second.changed


@PROPERTY
@given(problems, st.data())
def test_replanning_after_failures_is_feasible_and_then_stable(problem: Problem, data) -> None:
    settled = problem.advanced(plan_for(problem).plan)
    node_ids = sorted(n.node_id for n in problem.nodes)
    lost = data.draw(st.sets(st.sampled_from(node_ids), max_size=2)) if node_ids else set()
    health = data.draw(st.sampled_from([Health.FAILED, Health.LEFT, Health.SUSPECTED]))
    hurt = dataclasses.replace(
        fail_nodes(settled, lost, health), restore_allowed=data.draw(st.booleans())
    )
    result = plan_for(hurt)
    assert violations(hurt, result.plan) == []
    if health is not Health.SUSPECTED:
        assert all(r.node_id not in lost for r in result.plan.replicas)
    before = {(r.app, r.node_id): r for r in settled.current.replicas}
    for (
        replica
    ) in result.plan.replicas:  # nothing new on a lost node: no replica, promotion, variant
        if replica.node_id in lost:
            old = before.get((replica.app, replica.node_id))
            assert old == replica or (
                old is not None and old.role is Role.WARM and replica.role is Role.COLD
            )
    explained = {(r.app, r.kind) for r in result.reasons}
    for app in hurt.apps:  # a surviving warm backup keeps its app served, or a reason says why not
        if any(
            r.role is Role.WARM and r.node_id not in lost
            for r in settled.current.replicas_of(app.name)
        ):
            assert (
                result.plan.primary_of(app.name) is not None
                or (app.name, ReasonKind.SHED) in explained
            )
    again = plan_for(hurt.advanced(result.plan))
    assert again.plan.assignment() == result.plan.assignment()


def _fits_after_clearing(problem: Problem, plan: Plan, app_name: str) -> bool:
    """Whether `app_name` could get a primary on some node once everything
    there of lower priority (and backups of its priority or lower) were gone,
    judged by the shared checker with the headroom taken off capacities, and
    with storage claimed per replica as the planner does for new load."""
    keep = 1.0 - problem.settings.headroom_fraction
    strict = dataclasses.replace(
        problem,
        nodes=tuple(
            dataclasses.replace(
                n,
                memory_bytes=int(n.memory_bytes * keep),
                accelerator_memory_bytes=int(n.accelerator_memory_bytes * keep),
                storage_bytes=int(n.storage_bytes * keep),
            )
            for n in problem.nodes
        ),
        apps=tuple(
            dataclasses.replace(a, request_rate_per_s=a.request_rate_per_s / keep)
            for a in problem.apps
        ),
    )
    priority = {a.name: a.priority for a in problem.apps}
    mine = priority[app_name]
    app = next(a for a in problem.apps if a.name == app_name)
    for node in problem.nodes:
        if node.health is not Health.ALIVE or node.hold_down:
            continue
        others = tuple(
            r
            for r in plan.replicas
            if r.node_id == node.node_id
            and r.app != app_name
            and not (r.role is Role.PRIMARY and priority[r.app] < mine)
            and not (r.role is not Role.PRIMARY and priority[r.app] <= mine)
        )
        sizes = {v.name: v.size_bytes for a in problem.apps for v in a.variants}
        claimed_bytes = sum(sizes[r.variant] for r in others)
        for variant in app.variants:
            # the planner claims storage per replica for new load (docs/placement.md)
            if claimed_bytes + variant.size_bytes > node.storage_bytes * keep:
                continue
            trial = Plan(
                replicas=others + (Replica(app_name, node.node_id, variant.name, Role.PRIMARY),)
            )
            if not violations(strict, trial):
                return True
    return False


@PROPERTY
@given(problems)
def test_higher_priority_is_never_shed_while_a_lower_one_runs(problem: Problem) -> None:
    plan = plan_for(problem).plan
    served = {a.name for a in problem.apps if plan.primary_of(a.name) is not None}
    for high in problem.apps:
        if high.name in served:
            continue
        if any(low.priority < high.priority and low.name in served for low in problem.apps):
            assert not _fits_after_clearing(problem, plan, high.name), high.name


def normalised_gap(problem: Problem) -> float:
    """(exact - heuristic) / the most the objective could be: every app at its
    best variant. The exact solver's optimum bounds the heuristic's value."""
    heuristic = objective(problem, plan_for(problem).plan)
    exact = solve(problem, time_limit_s=30.0)
    assert exact.optimal
    assert violations(problem, exact.plan) == []
    assert heuristic <= exact.objective + 1e-6
    best = sum(problem.settings.weight(a.priority) * a.variants[0].accuracy for a in problem.apps)
    return (exact.objective - heuristic) / best if best else 0.0


def small_instance(seed: int) -> Problem:
    rng = random.Random(seed)
    return random_problem(
        rng,
        rng.randint(2, 4),
        rng.randint(3, 7),
        memory_pressure=0.6 + rng.random(),
        settings=UNBOUNDED,
        variants_max=3,
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_heuristic_is_within_its_gap_of_the_exact_solver(seed: int) -> None:
    assert normalised_gap(small_instance(seed)) <= GAP_INSTANCE_MAX


def test_mean_gap_on_fixed_seeds_is_within_three_percent() -> None:
    gaps = [normalised_gap(small_instance(seed)) for seed in range(40)]
    assert statistics.mean(gaps) <= GAP_MEAN_MAX, statistics.mean(gaps)


@settings(max_examples=30, deadline=None)
@given(problems)
def test_planning_is_deterministic(problem: Problem) -> None:
    shuffled = dataclasses.replace(
        problem, nodes=tuple(reversed(problem.nodes)), apps=tuple(reversed(problem.apps))
    )
    assert plan_for(problem) == plan_for(problem) == plan_for(shuffled)


@PROPERTY
@given(problems, st.data())
def test_any_current_plan_even_an_invalid_one_is_repaired(problem: Problem, data) -> None:
    """The current plan comes from committed state that may predate changes
    to apps, nodes or settings: duplicates, unknown names, overfull nodes."""
    if not problem.apps or not problem.nodes:
        return
    names = [a.name for a in problem.apps] + ["gone"]
    node_ids = [n.node_id for n in problem.nodes] + ["nowhere"]
    variants = sorted({v.name for a in problem.apps for v in a.variants})
    replicas = data.draw(
        st.lists(
            st.builds(
                Replica,
                st.sampled_from(names),
                st.sampled_from(node_ids),
                st.sampled_from(variants),
                st.sampled_from(list(Role)),
            ),
            max_size=40,
        )
    )
    messy = dataclasses.replace(problem, current=Plan(epoch=3, replicas=tuple(replicas)))
    result = plan_for(messy)
    assert violations(messy, result.plan) == []
    if result.complete:
        again = plan_for(messy.advanced(result.plan))
        assert again.plan.assignment() == result.plan.assignment()
