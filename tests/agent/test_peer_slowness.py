"""A peer's verdict about its own speed: degraded on slow requests or timeouts, restored by
fast requests or by a quiet spell (its apps were moved away)."""

from __future__ import annotations

import time

import pytest

from redge.agent.config import PeerConfig
from redge.agent.peer import SLO_QUIET_S, Peer
from redge.consensus import commands as c
from redge.consensus.state import ClusterState


@pytest.fixture
def peer(tmp_path) -> Peer:
    config = PeerConfig(node_id="n1", http="127.0.0.1:1", raft="127.0.0.1:2", heartbeat="127.0.0.1:3", data_dir=tmp_path)
    return Peer(config)


def judged_degraded(peer: Peer) -> bool:
    peer._judge_slowness(time.monotonic())
    return peer.node_id in peer.slowness.degraded()


@pytest.mark.parametrize(
    ("latencies_ms", "degraded"),
    [([10.0] * 20, False), ([31.0] * 20, True), ([25.0] * 20, False), ([31.0] * 3, False)],
)
def test_median_over_factor_times_slo_makes_the_node_degraded(peer: Peer, latencies_ms, degraded):
    for latency in latencies_ms:  # SLO 20 ms, factor 1.5: degraded above 30 ms
        peer.on_served(20.0, latency)
    assert judged_degraded(peer) is degraded
    assert ("x SLO" in peer._slo_detail) is degraded


def test_timeouts_make_the_node_degraded_too(peer: Peer):
    for _ in range(2):
        peer.on_timed_out()
    assert not judged_degraded(peer)
    peer.on_timed_out()
    assert judged_degraded(peer)


def test_restored_by_fast_requests_or_by_a_quiet_spell(peer: Peer):
    for _ in range(10):
        peer.on_served(20.0, 100.0)
    assert judged_degraded(peer)
    now_s = time.monotonic()
    assert not peer._judge_slowness(now_s + SLO_QUIET_S / 2)  # not quiet long enough
    assert peer._judge_slowness(now_s + SLO_QUIET_S + 1)
    assert not peer.slowness.degraded() and "no requests" in peer._slo_detail
    for _ in range(10):
        peer.on_served(20.0, 100.0)
    assert judged_degraded(peer)
    for _ in range(400):  # the window's median comes back within the SLO
        peer.on_served(20.0, 5.0)
    assert not judged_degraded(peer) and "within SLO" in peer._slo_detail


def test_a_node_s_own_verdict_and_its_observers_never_clear_each_other():
    state = ClusterState()
    for node in ("n1", "n2", "n3"):
        state.apply(c.Join(node, f"127.0.0.1:1{node[1]}", f"127.0.0.1:2{node[1]}", f"127.0.0.1:3{node[1]}", 1, 1000))
    assert state.apply(c.Report("n1", "degraded", 2000, detail="median latency 3.0 x SLO")).accepted
    assert state.members["n1"].slow and not state.members["n1"].degraded
    state.apply(c.Unsuspect("n2", "n1", 2100))  # an observer that sees n1 fine clears only its own view
    assert state.members["n1"].slow
    state.apply(c.Report("n1", "recovered", 2200))
    assert not state.members["n1"].slow
    state.apply(c.Report("n1", "degraded", 2300))
    state.apply(c.Join("n1", "127.0.0.1:11", "127.0.0.1:21", "127.0.0.1:31", 2, 2400))  # a new life starts clean
    assert not state.members["n1"].slow
