"""The leader's planning from committed state: the problem it builds, and its fallback when
only held-down or slow nodes could keep an app served."""

from __future__ import annotations

import pytest

from redge.agent.clock import FakeClock
from redge.agent.leader import build_problem as build_from_sightings
from redge.agent.leader import placements_of, plan_with_fallback
from redge.agent.sightings import Sightings
from redge.consensus import commands as c
from redge.consensus.state import ClusterState
from redge.placement.planner import plan_for
from redge.placement.problem import Health, Role

GIB = 1 << 30


def artifact(name: str, params: int, size: int, accuracy: float) -> c.ArtifactSummary:
    return c.ArtifactSummary(name=name, version="1-onnx", format="onnx", size_bytes=size, parameter_count=params,
                             family="f", accuracy=accuracy)


def state_with(nodes: list[str], now_ms: int = 1_000_000) -> ClusterState:
    state = ClusterState()
    for index, node in enumerate(nodes):
        state.apply(c.Join(node, f"h:{index}", f"r:{index}", f"b:{index}", 1, 0, memory_bytes=8 * GIB, storage_bytes=10 * GIB))
    state.apply(c.StoreReport(nodes[0], (artifact("big", 25_000_000, 100_000_000, 80.0), artifact("small", 5_000_000, 20_000_000, 70.0)), 0, 0))
    state.apply(c.RegisterApp("det", ("big", "small"), "critical", 200.0, "warm", 0))
    state.apply(c.RegisterApp("tag", ("small",), "standard", 200.0, "cold", 0))
    return state


def build_problem(state: ClusterState, sightings: Sightings | None = None):
    sightings = sightings or Sightings(FakeClock())
    sightings.observe(state)
    return build_from_sightings(state, sightings)


def fail_and_recover(state: ClusterState, node: str, observer: str) -> None:
    member = state.members[node]
    assert state.apply(c.Suspect(observer, node, member.incarnation, "timeout", 5)).accepted
    assert state.members[node].status == "failed"
    m = state.members[node]
    assert state.apply(c.Join(node, m.http_address, m.raft_address, m.heartbeat_address, m.incarnation + 1, 6,
                              memory_bytes=m.memory_bytes, storage_bytes=m.storage_bytes)).accepted


def test_problem_reflects_members_catalog_and_percent_accuracy():
    state = state_with(["n1", "n2", "n3"])
    problem = build_problem(state)
    assert [n.node_id for n in problem.nodes] == ["n1", "n2", "n3"]
    det = next(a for a in problem.apps if a.name == "det")
    assert [v.name for v in det.variants] == ["big", "small"]
    assert det.variants[0].accuracy == pytest.approx(0.80)
    assert det.variants[0].latency_ms("cpu") == pytest.approx(25.0)
    assert problem.artifacts["n1"] == frozenset({"big", "small"})


def test_planning_from_state_places_every_app_and_commits_cleanly():
    state = state_with(["n1", "n2", "n3"])
    result = plan_for(build_problem(state))
    outcome = state.apply(c.CommitPlan(1, placements_of(result), "n1", "test", 1))
    assert outcome.accepted, outcome.reason
    assert state.primary_of("det") is not None and state.primary_of("tag") is not None
    # Planning again on the committed result changes nothing.
    assert not plan_for(build_problem(state)).changed


def test_fallback_uses_held_down_nodes_rather_than_shed():
    state = state_with(["n1", "n2"])
    fail_and_recover(state, "n1", observer="n2")  # every node just recovered
    fail_and_recover(state, "n2", observer="n1")
    problem = build_problem(state)
    assert all(n.hold_down for n in problem.nodes)
    strict = plan_for(problem)
    assert strict.plan.primary_of("det") is None  # held-down nodes take no primaries
    result = plan_with_fallback(problem)
    assert result.plan.primary_of("det") is not None and result.plan.primary_of("tag") is not None


def test_fallback_keeps_the_strict_plan_when_it_sheds_nothing():
    state = state_with(["n1", "n2", "n3"])
    state.members["n3"].degraded = True
    problem = build_problem(state)
    assert next(n for n in problem.nodes if n.node_id == "n3").health is Health.DEGRADED
    result = plan_with_fallback(problem)
    assert result == plan_for(problem)
    assert all(r.node_id != "n3" or r.role is not Role.PRIMARY for r in result.plan.replicas)


def test_a_failed_load_moves_the_replica_elsewhere_until_the_avoidance_ends():
    from redge.agent.leader import LOAD_FAILURE_AVOID_MS

    state = state_with(["n1", "n2", "n3"])
    clock = FakeClock()
    sightings = Sightings(clock)
    result = plan_for(build_problem(state, sightings))
    assert state.apply(c.CommitPlan(1, placements_of(result), "n1", "test", 1)).accepted
    primary = state.primary_of("det")
    assert primary is not None
    sightings.load_failed(primary.node_id, primary.variant)
    moved = plan_with_fallback(build_problem(state, sightings))
    assert moved.changed
    assert not [r for r in moved.plan.replicas if (r.node_id, r.variant) == (primary.node_id, primary.variant)]
    assert moved.plan.primary_of("det") is not None
    clock.advance(LOAD_FAILURE_AVOID_MS)
    assert build_problem(state, sightings).unloadable == frozenset()


@pytest.mark.parametrize(("forget", "left"), [
    (lambda s: s.load_succeeded("n1", "big"), {("n1", "small")}),
    (lambda s: s.load_succeeded("n1"), set()),  # the node restarted
    (lambda s: s.load_succeeded("n2", "big"), {("n1", "big"), ("n1", "small")}),
])
def test_a_load_that_works_or_a_restart_ends_the_avoidance(forget, left):
    sightings = Sightings(FakeClock())
    sightings.load_failed("n1", "big")
    sightings.load_failed("n1", "small")
    forget(sightings)
    assert set(sightings.unloadable(1000)) == left


def test_when_only_a_node_that_failed_a_load_could_serve_it_is_tried_again():
    state = state_with(["n1"])
    sightings = Sightings(FakeClock())
    sightings.load_failed("n1", "big")
    sightings.load_failed("n1", "small")
    problem = build_problem(state, sightings)
    assert plan_for(problem).plan.primary_of("det") is None
    assert plan_with_fallback(problem).plan.primary_of("det") is not None


@pytest.mark.parametrize(("members", "format_version", "rotation_s", "due_after_ms"), [
    (9, 2, 60.0, 60_000),
    (12, 2, 10.0, 10_000),
    (8, 2, 60.0, None),   # everyone watches everyone: nothing to rotate
    (9, 1, 60.0, None),   # the previous build's peers turn by their wall clocks
    (9, 2, 0.0, None),    # rotation off
])
def test_the_leader_commits_the_next_watch_round_on_its_own_clock(members, format_version, rotation_s, due_after_ms):
    from types import SimpleNamespace

    from redge.agent.leader import LeaderDuty

    state = state_with([f"n{i}" for i in range(1, members + 1)])
    if format_version > 1:
        state.apply(c.RaiseFormat(format_version, "n1", 1))
    clock = FakeClock()
    duty = LeaderDuty(SimpleNamespace(node_id="n1"), clock=clock, watch_rotation_s=rotation_s)
    left = duty._rotation_left_ms(state)
    if due_after_ms is None:
        assert left is None
        return
    assert left == due_after_ms
    clock.advance(due_after_ms)
    assert duty._rotation_left_ms(state) == 0
    state.apply(c.RotateWatch(1, "n1", 2))
    assert duty._rotation_left_ms(state) == due_after_ms  # a new round: timed from when it was seen
