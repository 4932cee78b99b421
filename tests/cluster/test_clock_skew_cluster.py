"""Peers whose wall clocks are an hour off: they join, they are failed and recover like any
other, and the hold-down after the recovery lasts the setting on each peer's own clock, not
the setting plus the skew (REDGE_FAULT_WALL_CLOCK_OFFSET_S shifts a peer's wall clock)."""

from __future__ import annotations

import signal
import time

import pytest

from redge.agent.clock import WALL_CLOCK_OFFSET_ENV
from redge.chaos.cluster import LocalCluster, http_json, wait_until
from redge.consensus.commands import FORMAT_VERSION
from redge.consensus.state import Settings

pytestmark = pytest.mark.cluster

HOUR_S = 3600
HOLD_DOWN_MS = Settings().hold_down_ms


def member(cluster: LocalCluster, via: str, node_id: str) -> dict:
    return next(m for m in cluster.peers[via].snapshot()["members"] if m["node_id"] == node_id)


def events(cluster: LocalCluster, via: str) -> list[dict]:
    status, body = http_json("GET", cluster.peers[via].url + "/cluster/events?limit=2000", timeout_s=5)
    assert status == 200
    return body["events"]


@pytest.mark.parametrize("skew_s", [HOUR_S, -HOUR_S], ids=["ahead-1h", "behind-1h"])
def test_a_skewed_peer_is_held_down_for_the_setting_after_it_recovers(skew_s):
    cluster = LocalCluster(size=3)
    cluster.peers["n3"].env[WALL_CLOCK_OFFSET_ENV] = str(skew_s)
    with cluster:
        cluster.wait_leader()
        via = "n1"  # every peer times hold-downs on its own clock, leader or not
        wait_until(lambda: cluster.peers[via].snapshot().get("format_version") == FORMAT_VERSION, 20,
                   interval_s=0.05, what="the format raised")
        incarnation = member(cluster, via, "n3")["incarnation"]
        cluster.peers["n3"].signal(signal.SIGSTOP)
        try:
            wait_until(lambda: member(cluster, via, "n3")["status"] == "failed", 10, interval_s=0.02,
                       what="the stopped skewed peer confirmed failed")
        finally:
            cluster.peers["n3"].signal(signal.SIGCONT)
        back = wait_until(lambda: (m := member(cluster, via, "n3"))["status"] == "alive"
                          and m["incarnation"] > incarnation and m, 15, interval_s=0.02, what="n3 back")
        seen_back_s = time.monotonic()
        # The replicated stamp is the skewed peer's own clock: an hour off, and it says so.
        assert abs(back["hold_down_until_ms"] - HOLD_DOWN_MS - time.time() * 1000 - skew_s * 1000) < 60_000
        recovered = next(e for e in reversed(events(cluster, via))
                         if e["kind"] == "member_recovered" and e["node"] == "n3")
        assert recovered["clock"] == "n3"
        # Each peer times the hold-down itself: the setting, not the setting plus an hour.
        assert 0 < back["hold_down_left_ms"] <= HOLD_DOWN_MS
        wait_until(lambda: member(cluster, via, "n3")["hold_down_left_ms"] == 0, HOLD_DOWN_MS / 1000 + 5,
                   interval_s=0.1, what="the hold-down over")
        # Not over at once either (this side saw it back late on a busy machine, hence the slack).
        assert time.monotonic() - seen_back_s > HOLD_DOWN_MS / 2000
        for node_id in ("n1", "n2"):
            assert member(cluster, node_id, "n3")["status"] == "alive"


def test_a_peer_an_hour_ahead_joins_through_http():
    with LocalCluster(size=3) as cluster:
        leader = cluster.wait_leader()
        joined = cluster.add_peer(leader, env={WALL_CLOCK_OFFSET_ENV: str(HOUR_S)})
        cluster.wait_ready([joined.node_id], timeout_s=60)
        assert member(cluster, leader, joined.node_id)["status"] == "alive"
        assert not any(e["kind"] in ("suspicion", "failure_confirmed") for e in events(cluster, leader))
