"""A rolling upgrade, as an operator does one: three peers of the previous release serve an
app; each is stopped (SIGTERM) and started again from this build, one at a time, while a
client keeps calling. Inference keeps being served, the replicas never disagree, and once
the last peer runs this build the leader raises the cluster's command format to 2."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from redge.agent.client import Client, ClientError
from redge.chaos.cluster import LocalCluster, wait_until
from redge.chaos.observe import replicas_loaded
from redge.consensus.commands import FORMAT_VERSION
from redge.runtime.testing import IN_FEATURES, write_family

pytestmark = pytest.mark.cluster

DET = {"name": "det", "variants": ["mlp-small"], "priority": "critical", "slo_ms": 1000, "backup": "warm"}
X = {"input": np.linspace(-1, 1, 2 * IN_FEATURES, dtype=np.float32).reshape(2, IN_FEATURES)}
# What every replica must agree on once it has applied the same log.
REPLICATED = ("epoch", "apps", "plan", "rejected_count", "event_seq")


def replicated_views(cluster: LocalCluster) -> list[tuple] | None:
    views = []
    for peer in cluster.peers.values():
        snapshot = peer.snapshot(timeout_s=2.0)
        if snapshot is None:
            return None
        members = sorted((m["node_id"], m["status"], m["incarnation"]) for m in snapshot["members"])
        views.append((members, *(repr(snapshot[key]) for key in REPLICATED), snapshot.get("format_version", 1)))
    return views


def agreed(cluster: LocalCluster) -> tuple | None:
    """The one view every peer holds, once they all hold the same one (None before)."""
    views = replicated_views(cluster)
    return views[0] if views and all(view == views[0] for view in views) else None


def test_a_rolling_upgrade_from_the_previous_release_keeps_serving(tmp_path: Path, previous_release: Path):
    source = tmp_path / "source"
    write_family(source, formats=("onnx",), sizes={"mlp-small": (32, 1)})
    cluster = LocalCluster(size=3, extra_args=["--source", str(source)])
    for peer in cluster.peers.values():
        peer.env["PYTHONPATH"] = str(previous_release)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()
    with cluster:
        leader = cluster.wait_leader()
        assert cluster.register_app(leader, DET)[0] == 200
        wait_until(lambda: replicas_loaded(cluster, leader, ["det"], backups_min=1), 120, interval_s=0.1,
                   what="det served by the previous release")
        assert cluster.peers[leader].get("/v2")[1].get("command_format") is None  # the previous release

        def call() -> None:
            with Client([p.url for p in cluster.peers.values()]) as client:
                while not stop.is_set():
                    try:
                        client.infer("det", X, deadline_s=10.0)
                        answered[0] += 1
                    except ClientError as error:
                        failures.append(repr(error))

        caller = threading.Thread(target=call, name="caller")
        caller.start()
        try:
            # Followers first, the leader last, as the operations guide says.
            order = [n for n in cluster.peers if n != leader] + [leader]
            for node_id in order:
                peer = cluster.peers[node_id]
                assert peer.terminate() == 0, peer.log_tail(40)
                peer.log_file.close()
                peer.env.pop("PYTHONPATH")  # this build
                peer.start()
                cluster.wait_ready([node_id], timeout_s=60)
                assert peer.get("/v2")[1]["command_format"] == FORMAT_VERSION
                view = wait_until(lambda: agreed(cluster), 30, interval_s=0.1,
                                  what=f"every replica on one state after {node_id} upgraded")
                if node_id != order[-1]:
                    assert view[-1] == 1, "the format was raised while a peer of the previous release was a member"
                wait_until(lambda: replicas_loaded(cluster, cluster.wait_leader(), ["det"], members_alive=True),
                           120, interval_s=0.1, what=f"det served after {node_id} upgraded")
            view = wait_until(lambda: (v := agreed(cluster)) and v[-1] == FORMAT_VERSION and v, 30,
                              interval_s=0.1, what="the format raised once every peer runs this build")
        finally:
            stop.set()
            caller.join(timeout=30)
        assert failures == [], failures[:5]
        assert answered[0] > 0
        # Format 2 commands now apply everywhere: an app registered now says whose clock its time is.
        leader = cluster.wait_leader()
        assert cluster.register_app(leader, {**DET, "name": "after"})[0] == 200
        wait_until(lambda: agreed(cluster) and "after" in agreed(cluster)[1 + REPLICATED.index("apps")], 30,
                   interval_s=0.1, what="the app registered on every replica")
        events = cluster.peers[leader].get("/cluster/events?limit=2000")[1]["events"]
        registered = [e for e in events if e["kind"] == "app_registered" and e["app"] == "after"]
        assert registered and registered[0]["clock"] == leader
        assert [e["version"] for e in events if e["kind"] == "format_raised"] == [FORMAT_VERSION]
