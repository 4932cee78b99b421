"""The leader's timers are durations on its own clock: a proposer's wall clock, however far
off, changes none of them (agent/sightings.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.agent.clock import FakeClock
from redge.agent.leader import RESTORE_HOLD_DOWN_MS, build_problem
from redge.agent.sightings import Sightings
from redge.consensus import commands as c
from redge.consensus.state import ClusterState

HOUR_MS = 3_600_000
WALL_MS = 1_780_000_000_000


def cluster(nodes: int = 3) -> ClusterState:
    state = ClusterState()
    for index in range(nodes):
        node = f"n{index + 1}"
        assert state.apply(c.Join(node, f"h:{index}", f"r:{index}", f"b:{index}", 1, WALL_MS)).accepted
    return state


def fail(state: ClusterState, node: str, at_ms: int = WALL_MS) -> None:
    observers = [n for n in state.live_member_ids() if n != node]
    for observer in observers[: state.observers_needed(node)]:
        state.apply(c.Suspect(observer, node, state.members[node].incarnation, "timeout", at_ms))
    assert state.members[node].status == "failed"


def rejoin(state: ClusterState, node: str, at_ms: int) -> None:
    member = state.members[node]
    join = c.Join(node, member.http_address, member.raft_address, member.heartbeat_address, member.incarnation + 1, at_ms)
    assert state.apply(join).accepted


@pytest.mark.parametrize("skew_ms", [-HOUR_MS, -1, 0, 1, HOUR_MS], ids=lambda s: f"skew{s:+d}ms")
def test_a_rejoining_nodes_clock_does_not_change_its_hold_down(skew_ms: int) -> None:
    clock = FakeClock(500.0)
    sightings = Sightings(clock)
    state = cluster()
    fail(state, "n3")
    sightings.observe(state)
    rejoin(state, "n3", at_ms=WALL_MS + skew_ms)
    sightings.observe(state)
    hold_ms = state.settings.hold_down_ms
    assert sightings.hold_down_left_ms(state, state.members["n3"]) == hold_ms
    assert next(n for n in build_problem(state, sightings).nodes if n.node_id == "n3").hold_down
    clock.advance(hold_ms - 1)
    assert sightings.hold_down_left_ms(state, state.members["n3"]) == 1
    clock.advance(1)
    assert sightings.hold_down_left_ms(state, state.members["n3"]) == 0
    assert not next(n for n in build_problem(state, sightings).nodes if n.node_id == "n3").hold_down


@settings(deadline=None)
@given(skew_ms=st.integers(-24 * HOUR_MS, 24 * HOUR_MS), elapsed_ms=st.floats(0, 60_000))
def test_hold_down_is_the_setting_less_the_time_seen_here(skew_ms: int, elapsed_ms: float) -> None:
    clock = FakeClock()
    sightings = Sightings(clock)
    state = cluster()
    fail(state, "n2")
    rejoin(state, "n2", at_ms=WALL_MS + skew_ms)
    sightings.observe(state)
    clock.advance(elapsed_ms)
    sightings.observe(state)
    expected = max(0.0, state.settings.hold_down_ms - elapsed_ms)
    assert sightings.hold_down_left_ms(state, state.members["n2"]) == pytest.approx(expected)


def test_a_restart_during_a_hold_down_does_not_end_it_and_a_new_recovery_starts_another() -> None:
    clock = FakeClock()
    sightings = Sightings(clock)
    state = cluster()
    sightings.observe(state)
    assert sightings.hold_down_left_ms(state, state.members["n1"]) == 0  # never failed
    fail(state, "n1")
    rejoin(state, "n1", at_ms=WALL_MS)
    sightings.observe(state)
    hold_ms = state.settings.hold_down_ms
    clock.advance(1000)
    rejoin(state, "n1", at_ms=WALL_MS + 1)  # a plain restart, not after a confirmed failure
    sightings.observe(state)
    assert sightings.hold_down_left_ms(state, state.members["n1"]) == hold_ms - 1000
    clock.advance(hold_ms)
    assert sightings.hold_down_left_ms(state, state.members["n1"]) == 0
    fail(state, "n1")
    rejoin(state, "n1", at_ms=WALL_MS + 2)  # failed and back again: a new hold-down
    sightings.observe(state)
    assert sightings.hold_down_left_ms(state, state.members["n1"]) == hold_ms


def test_a_recovery_seen_keeps_its_hold_down_when_its_event_leaves_the_window() -> None:
    clock = FakeClock()
    sightings = Sightings(clock)
    state = cluster()
    fail(state, "n2")
    rejoin(state, "n2", at_ms=WALL_MS)
    sightings.observe(state)
    for index in range(state.settings.events_max + 10):
        state.apply(c.Report("n1", "load_started", WALL_MS, app="a", detail=str(index)))
    assert not any(e.kind == "member_recovered" for e in state.events)
    sightings.observe(state)
    assert sightings.hold_down_left_ms(state, state.members["n2"]) == state.settings.hold_down_ms


@pytest.mark.parametrize("skew_ms", [-HOUR_MS, 0, HOUR_MS], ids=lambda s: f"skew{s:+d}ms")
def test_the_restore_pause_after_a_failure_is_timed_from_when_this_peer_saw_it(skew_ms: int) -> None:
    clock = FakeClock()
    sightings = Sightings(clock)
    state = cluster()
    sightings.observe(state)
    assert build_problem(state, sightings).restore_allowed
    fail(state, "n1", at_ms=WALL_MS + skew_ms)
    sightings.observe(state)
    assert not build_problem(state, sightings).restore_allowed
    clock.advance(RESTORE_HOLD_DOWN_MS)
    assert not build_problem(state, sightings).restore_allowed
    clock.advance(1)
    assert build_problem(state, sightings).restore_allowed


def test_a_peer_that_learns_late_waits_the_whole_setting_from_then() -> None:
    """A new leader that missed the recovery (it restarted, or got a snapshot) times the
    hold-down from when it first saw that incarnation: longer than the setting, never shorter."""
    state = cluster()
    fail(state, "n3")
    rejoin(state, "n3", at_ms=WALL_MS)
    clock = FakeClock(1_000_000.0)
    late = Sightings(clock)
    late.observe(ClusterState.from_bytes(state.to_bytes()))
    assert late.hold_down_left_ms(state, state.members["n3"]) == state.settings.hold_down_ms
