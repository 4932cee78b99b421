"""Faults as data: idempotent apply/heal, selectors from the seed, clear refusals, real signals."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from redge.chaos.cluster import wait_until
from redge.chaos.faults import (
    Bandwidth,
    Cascade,
    CpuLoad,
    Crash,
    Delay,
    FaultUnavailable,
    Hang,
    KillLeader,
    Nemesis,
    PacketLoss,
    Partition,
    SlowNode,
    minority,
    process_tree,
)


@dataclass
class FakePeer:
    node_id: str
    alive: bool = True
    kills: int = 0
    starts: int = 0
    log_file: object = None
    pid: int | None = None

    def running(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.kills += 1
        self.alive = False

    def start(self) -> None:
        assert not self.alive
        self.starts += 1
        self.alive = True


@dataclass
class FakeCluster:
    leader_id: str = "n2"
    mode: str = "loopback"
    network: object = None
    peers: dict = field(default_factory=lambda: {n: FakePeer(n) for n in ("n1", "n2", "n3")})

    def wait_leader(self, timeout_s: float = 0) -> str:
        return self.leader_id


def nemesis(seed: int = 0, **kwargs) -> Nemesis:
    return Nemesis(FakeCluster(**kwargs), random.Random(seed))


def test_crash_apply_and_heal_are_idempotent():
    n = nemesis()
    fault = Crash("n3")
    first = n.apply(fault)
    assert n.apply(fault) is first
    assert n.cluster.peers["n3"].kills == 1
    n.heal(fault)
    n.heal(fault)
    assert n.cluster.peers["n3"].starts == 1
    assert first.targets == ("n3",) and first.healed_at_ms >= first.applied_at_ms


def test_kill_leader_records_which_node_it_killed():
    n = nemesis(leader_id="n3")
    record = n.apply(KillLeader())
    assert record.targets == ("n3",) and record.kind == "kill-leader"
    assert not n.cluster.peers["n3"].alive


def test_follower_selection_comes_from_the_seed_and_never_picks_the_leader():
    picks = {seed: nemesis(seed).apply(Crash("follower")).targets for seed in range(30)}
    assert all(targets[0] in ("n1", "n3") for targets in picks.values())
    assert picks == {seed: nemesis(seed).apply(Crash("follower")).targets for seed in range(30)}
    assert len(set(picks.values())) == 2


def test_unknown_node_is_refused():
    with pytest.raises(FaultUnavailable, match="unknown node 'n9'"):
        nemesis().apply(Crash("n9"))


@pytest.mark.parametrize("fault", [Partition((("n1",), ("rest",))), PacketLoss(("n1",), 10), Delay(("n1",), 20, 5),
                                   Bandwidth("n1", 1.0)])
def test_network_faults_refuse_loopback_and_say_why(fault):
    n = nemesis()
    with pytest.raises(FaultUnavailable, match="netns"):
        n.apply(fault)
    assert n.records == [] and not n.is_active(fault)


@pytest.mark.parametrize(
    "groups, one_way, expected",
    [
        ([["n1"], ["n2", "n3"]], False, ("n1",)),
        ([["n1", "n2"], ["n3"]], False, ("n3",)),
        ([["n1"], ["n2"], ["n3", "n4", "n5"]], False, ("n1", "n2")),
        ([["n1", "n2", "n3"], ["n4", "n5"]], True, ("n1", "n2", "n3")),
    ],
)
def test_a_partition_may_confirm_only_its_minority(groups, one_way, expected):
    assert minority(groups, one_way) == expected


def test_heal_all_heals_newest_first_and_leaves_nothing_active():
    n = nemesis()
    crash, other = Crash("n1"), Crash("n3")
    n.apply(crash)
    n.apply(other)
    assert n.heal_all() == []
    assert not n.is_active(crash) and not n.is_active(other)
    assert all(p.alive for p in n.cluster.peers.values())


def test_cascade_runs_its_schedule_in_order():
    n = nemesis()
    cascade = Cascade(((0.0, Crash("n1"), 0.05), (0.02, Crash("n3"), None)))
    assert cascade.length_s() == pytest.approx(0.05)
    assert n.apply(cascade).targets == ("n1", "n3")
    assert n.cluster.peers["n1"].alive and not n.cluster.peers["n3"].alive
    n.heal(cascade)
    assert n.cluster.peers["n3"].alive


def test_cascades_are_bounded_and_flat():
    with pytest.raises(ValueError, match="at most"):
        Cascade(((0.0, Crash("n1"), 10_000.0),))
    with pytest.raises(TypeError, match="cannot hold a cascade"):
        Cascade(((0.0, Cascade(()), None),))


def test_faults_are_values():
    assert Crash("n1") == Crash("n1") and hash(Partition((("n1",), ("n2",)))) == hash(Partition((("n1",), ("n2",))))
    assert KillLeader() != Crash("leader")


# ---------------------------------------------------------------------- real processes


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import signal\nwhile True: signal.pause()"],
                               start_new_session=True)
    yield process
    process.kill()
    process.wait(timeout=10)


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def test_hang_stops_and_continues_a_real_process(sleeper):
    n = nemesis()
    n.cluster.peers["n1"].pid = sleeper.pid
    assert process_tree(sleeper.pid) == [sleeper.pid]
    n.apply(Hang("n1"))
    wait_until(lambda: process_state(sleeper.pid) == "T", 5, what="the process to stop")
    n.heal(Hang("n1"))
    wait_until(lambda: process_state(sleeper.pid) != "T", 5, what="the process to continue")


@pytest.mark.skipif(SlowNode().unavailable_reason("loopback") is not None,
                    reason=str(SlowNode().unavailable_reason("loopback")))
def test_slow_node_caps_the_cpu_of_a_real_process_and_cleans_up():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        n = nemesis()
        n.cluster.peers["n1"].pid = busy.pid
        n.apply(SlowNode("n1", cpu_fraction=0.05))
        group = n.cpu_groups._groups[f"{n.tag}-n1"][0]
        assert str(busy.pid) in (group / "cgroup.procs").read_text().split()

        def cpu_s() -> float:
            fields = Path(f"/proc/{busy.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before, started = cpu_s(), time.monotonic()
        threshold = started + 1.0
        wait_until(lambda: time.monotonic() >= threshold, 5, what="one second of wall time")
        used = (cpu_s() - before) / (time.monotonic() - started)
        assert used < 0.3, f"a 5% quota let the process use {used:.0%} of a CPU"
        assert n.close() == []
        assert not group.exists()
    finally:
        busy.send_signal(signal.SIGKILL)
        busy.wait(timeout=10)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_cpu_load_runs_busy_workers_touching_no_node_and_heal_stops_them():
    n = nemesis()
    record = n.apply(CpuLoad(workers=2, busy_fraction=0.5))
    assert record.targets == ()  # every peer stays alive: a confirmation meanwhile is false
    assert n.apply(CpuLoad(workers=2, busy_fraction=0.5)) is record
    workers = n._workers[CpuLoad(workers=2, busy_fraction=0.5)]
    assert len(workers) == 2 and all(w.poll() is None for w in workers)
    wait_until(lambda: all(cpu_ticks(w.pid) > 0 for w in workers), 10, what="the workers to burn CPU")
    n.heal(CpuLoad(workers=2, busy_fraction=0.5))
    assert all(w.poll() is not None for w in workers) and not n._workers
    n.heal(CpuLoad(workers=2, busy_fraction=0.5))  # healing twice changes nothing


def test_cpu_load_is_bounded_and_closed_with_the_nemesis():
    with pytest.raises(ValueError):
        CpuLoad(workers=0)
    with pytest.raises(ValueError):
        CpuLoad(busy_fraction=1.5)
    n = nemesis()
    n.apply(CpuLoad(workers=1))
    [worker] = n._workers[CpuLoad(workers=1)]
    assert n.close() == []
    assert worker.poll() is not None
