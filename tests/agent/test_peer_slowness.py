"""A peer's verdict about its own speed: degraded on slow requests, restored by fast ones or
by a quiet spell (its apps were moved away)."""

from __future__ import annotations

import time

import pytest

from redge.agent.config import PeerConfig
from redge.agent.peer import SLO_QUIET_S, Peer


@pytest.fixture
def peer(tmp_path) -> Peer:
    config = PeerConfig(node_id="n1", http="127.0.0.1:1", raft="127.0.0.1:2", heartbeat="127.0.0.1:3", data_dir=tmp_path)
    return Peer(config)


@pytest.mark.parametrize(
    ("latencies_ms", "degraded"),
    [([10.0] * 20, False), ([31.0] * 20, True), ([25.0] * 20, False), ([31.0] * 3, False)],
)
def test_median_over_factor_times_slo_makes_the_node_degraded(peer: Peer, latencies_ms, degraded):
    for latency in latencies_ms:  # SLO 20 ms, factor 1.5: degraded above 30 ms
        peer.on_served("det", 20.0, latency)
    assert (peer.node_id in peer.slowness.degraded()) is degraded
    assert ("x SLO" in peer._slo_detail) is degraded


def test_restored_by_fast_requests_or_by_a_quiet_spell(peer: Peer):
    for _ in range(10):
        peer.on_served("det", 20.0, 100.0)
    assert peer.node_id in peer.slowness.degraded()
    now_s = time.monotonic()
    assert not peer._judge_slowness(now_s + SLO_QUIET_S / 2)  # not quiet long enough
    assert peer._judge_slowness(now_s + SLO_QUIET_S + 1)
    assert not peer.slowness.degraded() and "no requests" in peer._slo_detail
    for _ in range(10):
        peer.on_served("det", 20.0, 100.0)
    assert peer.node_id in peer.slowness.degraded()
    for _ in range(400):  # the window's median comes back within the SLO
        peer.on_served("det", 20.0, 5.0)
    assert not peer.slowness.degraded() and "within SLO" in peer._slo_detail
