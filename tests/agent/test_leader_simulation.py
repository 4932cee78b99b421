"""The leader's duty in a deterministic simulation: the real LeaderDuty over an in-memory
cluster (agent/ports.py over a plain ClusterState, commands through their wire encoding) and
a fake clock. No Raft, no network, no sleeps: every step and every timer is exact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest

from redge.agent.clock import FakeClock
from redge.agent.leader import LOAD_FAILURE_AVOID_MS, RESTORE_HOLD_DOWN_MS, LeaderDuty
from redge.consensus import commands as c
from redge.consensus.state import ClusterState, Outcome

T = TypeVar("T")
GIB = 1 << 30


class SimulatedCluster:
    """A ClusterPort: one replica, commands applied at once through encode / apply_entry,
    and every commit handed to the duty as the peer's commit hook would."""

    def __init__(self, node_id: str = "n1") -> None:
        self.node_id = node_id
        self.state = ClusterState()
        self.duty: LeaderDuty | None = None
        self.voters: list[str] = []
        self.removed: list[str] = []

    def read(self, reader: Callable[[ClusterState], T]) -> T:
        return reader(self.state)

    def leading(self) -> bool:
        return True

    def following(self) -> bool:
        return True

    def partners(self) -> list[str]:
        return list(self.voters)

    async def propose(self, command: c.Command, timeout_s: float | None = None) -> Outcome:
        return self.commit(command)

    def commit(self, command: c.Command) -> Outcome:
        decoded, outcome = self.state.apply_entry(c.encode(command, self.state.format_version))
        if self.duty is not None:
            self.duty.on_commit(decoded, outcome)
        return outcome

    async def remove_voter(self, raft_address: str) -> None:
        self.voters.remove(raft_address)
        self.removed.append(raft_address)


def artifact(name: str, params: int, size: int) -> c.ArtifactSummary:
    return c.ArtifactSummary(name=name, version="1-onnx", format="onnx", size_bytes=size, parameter_count=params,
                             family="f", accuracy=0.8)


@pytest.fixture
def world():
    clock = FakeClock(1_000.0)
    cluster = SimulatedCluster()
    duty = LeaderDuty(cluster, clock=clock, watch_rotation_s=60.0)
    cluster.duty = duty
    for index in (1, 2, 3):
        node = f"n{index}"
        cluster.commit(c.Join(node, f"h:{index}", f"r:{index}", f"b:{index}", 1, 0, memory_bytes=8 * GIB,
                              storage_bytes=10 * GIB, reads_format=c.FORMAT_VERSION))
    cluster.commit(c.StoreReport("n1", (artifact("big", 20_000_000, 80_000_000),), 0, 0))
    cluster.commit(c.RegisterApp("det", ("big",), "critical", 500.0, "warm", 0))
    return clock, cluster, duty


def run(coroutine):
    return asyncio.run(coroutine)


def roles(cluster: SimulatedCluster, app: str = "det") -> dict[str, str]:
    return {r.role: r.node_id for r in cluster.state.plan.get(app, ())}


def fail(cluster: SimulatedCluster, node: str, at_ms: int = 5) -> None:
    for observer in [n for n in cluster.state.live_member_ids() if n != node][:2]:
        cluster.commit(c.Suspect(observer, node, cluster.state.members[node].incarnation, "timeout", at_ms))
    assert cluster.state.members[node].status == "failed"


def test_the_leader_places_fails_over_and_holds_a_recovered_node_down_by_its_own_clock(world):
    clock, cluster, duty = world
    assert run(duty.plan_and_commit()).changed
    placed = roles(cluster)
    assert set(placed) == {"primary", "warm"}
    primary = placed["primary"]
    fail(cluster, primary)
    run(duty.plan_and_commit())
    assert roles(cluster)["primary"] == placed["warm"]  # the warm backup promoted
    # The failed node comes back with a clock an hour off: held down by the setting, on this clock.
    member = cluster.state.members[primary]
    cluster.commit(c.Join(primary, member.http_address, member.raft_address, member.heartbeat_address,
                          member.incarnation + 1, 3_600_000, memory_bytes=8 * GIB, storage_bytes=10 * GIB,
                          reads_format=c.FORMAT_VERSION))
    hold_ms = cluster.state.settings.hold_down_ms
    assert duty.sightings.hold_down_left_ms(cluster.state, cluster.state.members[primary]) == hold_ms
    assert held_down(cluster, duty, primary)
    run(duty.plan_and_commit())
    assert roles(cluster).get("primary") != primary
    # The duty sleeps until the next timer ends (here the hold-down and the restore pause).
    clock.advance(hold_ms - 4_000)
    assert duty._next_deadline_s() == pytest.approx(4.01)
    clock.advance(4_000)
    assert not held_down(cluster, duty, primary)


def held_down(cluster: SimulatedCluster, duty: LeaderDuty, node_id: str) -> bool:
    from redge.agent.leader import _problem_and_epoch

    problem, _ = cluster.read(lambda state: _problem_and_epoch(state, duty.sightings))
    return next(n for n in problem.nodes if n.node_id == node_id).hold_down


def test_the_restore_pause_and_a_failed_load_are_timed_on_the_leaders_clock(world):
    clock, cluster, duty = world
    run(duty.plan_and_commit())
    warm = roles(cluster)["warm"]
    cluster.commit(c.Report(warm, "load_failed", 0, app="det", variant="big", epoch=cluster.state.epoch))
    run(duty.plan_and_commit())
    assert roles(cluster).get("warm") not in (warm, None)  # planned around at once
    clock.advance(LOAD_FAILURE_AVOID_MS)
    assert duty.sightings.unloadable(LOAD_FAILURE_AVOID_MS) == {}
    third = next(n for n in ("n1", "n2", "n3") if n not in roles(cluster).values())
    fail(cluster, third)
    problem_restore = run(_problem_restore(cluster, duty))
    assert problem_restore is False
    clock.advance(RESTORE_HOLD_DOWN_MS + 1)
    assert run(_problem_restore(cluster, duty)) is True


async def _problem_restore(cluster: SimulatedCluster, duty: LeaderDuty) -> bool:
    from redge.agent.leader import _problem_and_epoch

    problem, _ = cluster.read(lambda state: _problem_and_epoch(state, duty.sightings))
    return problem.restore_allowed


def test_the_leader_raises_the_format_and_rotates_the_watch_only_when_it_may(world, monkeypatch):
    clock, cluster, duty = world
    answers: dict[str, int | None] = {"n2": c.FORMAT_VERSION, "n3": None}

    async def ask(addresses):
        return {node: answers[node] for node in addresses}

    monkeypatch.setattr("redge.agent.upgrade.ask_formats", ask)

    async def raise_once() -> None:
        await duty.raise_format()
        if duty._format_task is not None:
            await duty._format_task

    run(raise_once())
    assert cluster.state.format_version == 1  # n3 did not answer
    answers["n3"] = c.FORMAT_VERSION
    run(raise_once())
    assert cluster.state.format_version == 1  # asked again only after FORMAT_CHECK_S
    clock.advance(2_000)
    run(raise_once())
    assert cluster.state.format_version == c.FORMAT_VERSION
    # Rotation: only above 8 members, every watch_rotation_s of the leader's clock.
    run(duty.rotate_watch())
    assert cluster.state.watch_round == 0
    for index in range(4, 10):
        cluster.commit(c.Join(f"n{index}", f"h:{index}", f"r:{index}", f"b:{index}", 1, 0, reads_format=c.FORMAT_VERSION))
    run(duty.rotate_watch())
    assert cluster.state.watch_round == 0
    clock.advance(60_000)
    run(duty.rotate_watch())
    assert cluster.state.watch_round == 1


def test_a_departed_voter_is_removed_after_the_grace_on_the_leaders_clock(world):
    from redge.agent.leader import DEPARTED_VOTER_GRACE_MS

    clock, cluster, duty = world
    cluster.voters = ["r:2", "r:3"]
    cluster.commit(c.Leave("n3", 10**13))  # its clock far ahead: no matter
    run(duty.remove_departed_voters())
    assert cluster.removed == []
    clock.advance(DEPARTED_VOTER_GRACE_MS + 1)
    run(duty.remove_departed_voters())
    assert cluster.removed == ["r:3"]
