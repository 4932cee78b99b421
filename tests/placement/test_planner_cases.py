"""Table-driven cases for the heuristic planner: one scenario per rule."""

from __future__ import annotations

import dataclasses

import pytest

from redge.placement.capacity import violations
from redge.placement.planner import ReasonKind, plan_for
from redge.placement.problem import (
    App,
    BackupPolicy,
    Health,
    Node,
    Plan,
    Priority,
    Problem,
    Replica,
    Role,
    Settings,
    Variant,
)
from redge.placement.transition import ActionKind

MB = 1_000_000


def variant(
    name: str, memory_mb: int, gpu_ms: float = 5.0, accuracy: float = 0.8, size_mb: int = 10
) -> Variant:
    return Variant(name, memory_mb * MB, (("gpu", gpu_ms),), accuracy, size_mb * MB)


BIG = variant("big", 600, 10.0, 0.80)
SMALL = variant("small", 200, 4.0, 0.70)


def app(
    name: str,
    priority: Priority = Priority.STANDARD,
    backup: BackupPolicy = BackupPolicy.AUTO,
    variants: tuple[Variant, ...] = (BIG, SMALL),
    slo_ms: float = 50.0,
) -> App:
    return App(name, priority, slo_ms, variants, request_rate_per_s=1.0, backup=backup)


def node(
    node_id: str,
    memory_mb: int = 1000,
    storage_mb: int = 1000,
    health: Health = Health.ALIVE,
    hold_down: bool = False,
) -> Node:
    return Node(node_id, "gpu", memory_mb * MB, memory_mb * MB, storage_mb * MB, health, hold_down)


SETTINGS = Settings(headroom_fraction=0.0)


def problem(
    nodes, apps, current=(), artifacts=None, settings=SETTINGS, restore_allowed=True
) -> Problem:
    return Problem(
        nodes=tuple(nodes),
        apps=tuple(apps),
        current=Plan(epoch=7, replicas=tuple(current)),
        artifacts=artifacts or {},
        settings=settings,
        restore_allowed=restore_allowed,
    )


def roles(plan: Plan, app_name: str) -> dict[str, tuple[str, Role]]:
    return {r.node_id: (r.variant, r.role) for r in plan.replicas_of(app_name)}


def shed(result) -> set[str]:
    return {r.app for r in result.reasons if r.kind is ReasonKind.SHED}


def test_failed_primary_node_promotes_warm_backup_in_one_plan() -> None:
    before = problem(
        [node("a"), node("b"), node("c")],
        [app("detector", Priority.CRITICAL)],
        current=[
            Replica("detector", "a", "big", Role.PRIMARY),
            Replica("detector", "b", "small", Role.WARM),
        ],
    )
    # Right after a failure the leader holds restores down: no reshuffling yet.
    failed = dataclasses.replace(
        before, nodes=(node("a", health=Health.FAILED), node("b"), node("c")), restore_allowed=False
    )
    result = plan_for(failed)
    assert result.plan.primary_of("detector") == Replica("detector", "b", "small", Role.PRIMARY)
    assert result.actions[0].kind is ActionKind.PROMOTE
    assert not any(a.kind is ActionKind.LOAD and a.role is Role.PRIMARY for a in result.actions)
    # redundancy is restored in the same plan, on the node that is left
    assert roles(result.plan, "detector")["c"][1] is Role.WARM
    assert result.plan.epoch == 8
    assert not violations(failed, result.plan)
    # Once the hold-down is over, the larger variant comes back, in place.
    restored = plan_for(dataclasses.replace(failed.advanced(result.plan), restore_allowed=True))
    assert restored.plan.primary_of("detector") == Replica("detector", "b", "big", Role.PRIMARY)
    assert [a.kind for a in restored.actions] == [ActionKind.LOAD, ActionKind.UNLOAD]


def test_short_memory_gives_smaller_warm_backup() -> None:
    result = plan_for(
        problem([node("a", 700), node("b", 300)], [app("detector", Priority.CRITICAL)])
    )
    assert roles(result.plan, "detector") == {"a": ("big", Role.PRIMARY), "b": ("small", Role.WARM)}


def test_no_memory_for_warm_backup_falls_back_to_cold() -> None:
    result = plan_for(
        problem([node("a", 700), node("b", 100)], [app("detector", Priority.CRITICAL)])
    )
    assert roles(result.plan, "detector") == {"a": ("big", Role.PRIMARY), "b": ("big", Role.COLD)}
    assert ReasonKind.BACKUP_COLD in {r.kind for r in result.reasons}
    assert any(a.kind is ActionKind.PREFETCH and a.node_id == "b" for a in result.actions)


def test_smaller_variants_before_shedding() -> None:
    apps = [
        app("x", Priority.STANDARD, BackupPolicy.NONE),
        app("y", Priority.STANDARD, BackupPolicy.NONE),
    ]
    result = plan_for(problem([node("a", 800)], apps))
    variants = sorted(r.variant for r in result.plan.replicas)
    assert variants == ["big", "small"]
    assert not shed(result)


@pytest.mark.parametrize(
    ("priorities", "expected_shed"),
    [
        ((Priority.CRITICAL, Priority.STANDARD, Priority.BEST_EFFORT), {"app2"}),
        ((Priority.BEST_EFFORT, Priority.CRITICAL, Priority.STANDARD), {"app0"}),
        ((Priority.STANDARD, Priority.BEST_EFFORT, Priority.CRITICAL), {"app1"}),
    ],
)
def test_lowest_priority_is_shed_first(priorities, expected_shed) -> None:
    apps = [app(f"app{k}", p, BackupPolicy.NONE) for k, p in enumerate(priorities)]
    result = plan_for(problem([node("a", 450)], apps))  # room for two small variants
    assert shed(result) == expected_shed


def test_critical_app_is_never_shed_for_a_standard_one() -> None:
    # The standard app runs; the critical app's node fails and the only room is
    # where the standard one is: the standard one is evicted, not the critical.
    before = problem(
        [node("a", 700), node("b", 700)],
        [
            app("critical", Priority.CRITICAL, BackupPolicy.NONE, variants=(BIG,)),
            app("standard", Priority.STANDARD, BackupPolicy.NONE, variants=(BIG,)),
        ],
        current=[
            Replica("critical", "a", "big", Role.PRIMARY),
            Replica("standard", "b", "big", Role.PRIMARY),
        ],
    )
    failed = dataclasses.replace(
        before, nodes=(node("a", 700, health=Health.FAILED), node("b", 700))
    )
    result = plan_for(failed)
    assert result.plan.primary_of("critical") is not None
    assert result.plan.primary_of("standard") is None
    assert {(r.app, r.kind) for r in result.reasons} >= {
        ("standard", ReasonKind.EVICTED),
        ("standard", ReasonKind.SHED),
    }
    assert [a.kind for a in result.actions] == [ActionKind.UNLOAD, ActionKind.LOAD]


@pytest.mark.parametrize("health", [Health.SUSPECTED, Health.DEGRADED, Health.FAILED, Health.LEFT])
def test_unhealthy_node_gets_no_new_load(health) -> None:
    apps = [app(f"app{k}", Priority.CRITICAL) for k in range(3)]
    result = plan_for(
        problem([node("a", 5000), node("sick", 5000, health=health), node("c", 5000)], apps)
    )
    assert all(r.node_id != "sick" for r in result.plan.replicas)


def test_suspected_node_keeps_its_replicas_but_gets_nothing_new() -> None:
    result = plan_for(
        problem(
            [node("a", 5000, health=Health.SUSPECTED), node("b", 5000)],
            [
                app("kept", Priority.STANDARD, BackupPolicy.NONE),
                app("new", Priority.STANDARD, BackupPolicy.NONE),
            ],
            current=[Replica("kept", "a", "big", Role.PRIMARY)],
        )
    )
    assert roles(result.plan, "kept") == {"a": ("big", Role.PRIMARY)}
    assert roles(result.plan, "new") == {"b": ("big", Role.PRIMARY)}


def test_node_near_capacity_gets_no_new_load() -> None:
    settings = Settings(headroom_fraction=0.2)
    result = plan_for(
        problem([node("a", 700)], [app("x", backup=BackupPolicy.NONE)], settings=settings)
    )
    assert roles(result.plan, "x") == {"a": ("small", Role.PRIMARY)}  # 600 MB > 80 % of 700 MB


def test_hold_down_node_takes_backups_not_primaries() -> None:
    result = plan_for(
        problem([node("a", 5000, hold_down=True), node("b", 5000)], [app("x", Priority.CRITICAL)])
    )
    assert roles(result.plan, "x") == {"b": ("big", Role.PRIMARY), "a": ("big", Role.WARM)}


def test_cold_backup_is_loaded_in_place_on_failover() -> None:
    before = problem(
        [node("a"), node("b"), node("c")],
        [app("x", Priority.STANDARD, BackupPolicy.COLD)],
        current=[Replica("x", "a", "big", Role.PRIMARY), Replica("x", "c", "big", Role.COLD)],
        artifacts={"c": frozenset({"big"})},
    )
    failed = dataclasses.replace(
        before, nodes=(node("a", health=Health.FAILED), node("b"), node("c"))
    )
    result = plan_for(failed)
    assert result.plan.primary_of("x") == Replica("x", "c", "big", Role.PRIMARY)
    assert roles(result.plan, "x")["b"] == ("big", Role.COLD)


def test_failover_order_promotes_then_loads_by_priority_then_backups() -> None:
    apps = [
        app("crit", Priority.CRITICAL),
        app("std", Priority.STANDARD, BackupPolicy.COLD),
        app("best", Priority.BEST_EFFORT, BackupPolicy.NONE),
    ]
    current = [
        Replica("crit", "a", "big", Role.PRIMARY),
        Replica("crit", "b", "big", Role.WARM),
        Replica("std", "a", "big", Role.PRIMARY),
        Replica("best", "a", "small", Role.PRIMARY),
    ]
    nodes = [node("a", 5000, health=Health.FAILED), node("b", 5000), node("c", 5000)]
    result = plan_for(problem(nodes, apps, current=current))
    kinds = [(a.kind, a.app, a.role) for a in result.actions]
    assert kinds[0] == (ActionKind.PROMOTE, "crit", Role.PRIMARY)
    loads = [(app_name, role) for kind, app_name, role in kinds if kind is ActionKind.LOAD]
    assert loads[:2] == [("std", Role.PRIMARY), ("best", Role.PRIMARY)]
    assert ("crit", Role.WARM) in loads[2:]


def test_load_bound_defers_work_to_the_next_plan() -> None:
    settings = Settings(headroom_fraction=0.0, loads_per_plan_max=2)
    apps = [app(f"app{k}", Priority.CRITICAL) for k in range(3)]
    first = problem([node(f"n{k}", 5000) for k in range(4)], apps, settings=settings)
    result = plan_for(first)
    assert sum(a.kind is ActionKind.LOAD for a in result.actions) == 2
    assert not result.complete
    plans = 1
    while not result.complete:
        result = plan_for(first.advanced(result.plan))
        plans += 1
        assert sum(a.kind is ActionKind.LOAD for a in result.actions) <= 2
        assert plans < 10
    assert all(result.plan.primary_of(a.name) for a in apps)


def test_restore_waits_for_the_hold_down() -> None:
    current = [Replica("x", "b", "small", Role.PRIMARY)]
    held = problem(
        [node("a"), node("b")],
        [app("x", backup=BackupPolicy.NONE)],
        current=current,
        restore_allowed=False,
    )
    assert plan_for(held).plan.primary_of("x").variant == "small"
    assert not plan_for(held).changed
    released = dataclasses.replace(held, restore_allowed=True)
    assert plan_for(released).plan.primary_of("x").variant == "big"


def test_co_location_that_would_break_an_slo_is_avoided() -> None:
    # Each alone meets a 5.2 ms SLO at 5 ms; together (8 % inflation) neither would.
    tight = variant("only", 100, 5.0)
    apps = [
        app(f"app{k}", variants=(tight,), slo_ms=5.2, backup=BackupPolicy.NONE) for k in range(2)
    ]
    result = plan_for(problem([node("a", 5000), node("b", 5000)], apps))
    assert {r.node_id for r in result.plan.replicas} == {"a", "b"}
    result = plan_for(problem([node("a", 5000)], apps))
    assert len(result.plan.replicas) == 1 and len(shed(result)) == 1


def test_removed_app_is_unloaded_and_unchanged_plan_keeps_its_epoch() -> None:
    current = [Replica("gone", "a", "big", Role.PRIMARY), Replica("x", "a", "small", Role.PRIMARY)]
    result = plan_for(problem([node("a")], [app("x", backup=BackupPolicy.NONE)], current=current))
    assert (result.actions[0].kind, result.actions[0].app) == (ActionKind.UNLOAD, "gone")
    again = plan_for(
        problem([node("a")], [app("x", backup=BackupPolicy.NONE)], current=result.plan.replicas)
    )
    assert not again.changed and not again.actions and again.plan.epoch == 7


def test_planning_is_independent_of_input_order() -> None:
    apps = [app(f"app{k}", Priority(k % 3)) for k in range(6)]
    nodes = [node(f"n{k}", 700 + 100 * k) for k in range(4)]
    one = plan_for(problem(nodes, apps))
    two = plan_for(problem(list(reversed(nodes)), list(reversed(apps))))
    assert one == two


def test_tightened_slo_moves_the_app_to_a_variant_that_meets_it() -> None:
    current = [Replica("x", "a", "big", Role.PRIMARY), Replica("x", "b", "big", Role.COLD)]
    tight = app("x", backup=BackupPolicy.COLD, slo_ms=8.0)  # big takes 10 ms, small 4 ms
    result = plan_for(problem([node("a"), node("b")], [tight], current=current))
    assert {r.variant for r in result.plan.replicas} == {"small"}
    assert not violations(problem([node("a"), node("b")], [tight]), result.plan)
