"""Slow is a failure too: a peer whose own latencies stay above an app's SLO reports itself
degraded through Raft, while its heartbeats keep it alive."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from redge.agent import oip
from redge.agent.dataplane import parse_server_timing
from redge.chaos.cluster import LocalCluster, http_json, wait_until
from redge.chaos.observe import primary_of, replicas_loaded
from redge.runtime.testing import SLOW_FROM, write_family

pytestmark = pytest.mark.cluster

SLOW_APP = {"name": "slow", "variants": ["trip"], "priority": "standard", "slo_ms": 20, "backup": "none"}


def test_a_node_over_its_apps_slo_reports_itself_degraded_and_stays_alive(tmp_path):
    write_family(tmp_path / "source", formats=("safetensors",), sizes={"trip": (16, 1)}, tripwire=True)
    with LocalCluster(size=3, extra_args=["--source", str(tmp_path / "source")]) as cluster:
        leader = cluster.wait_leader()
        status, body = cluster.register_app(leader, SLOW_APP)
        assert status == 200, body
        wait_until(lambda: replicas_loaded(cluster, leader, ["slow"]), 120, interval_s=0.1, what="slow app serving")
        primary = primary_of(cluster, leader, "slow")
        # Each request sleeps 60 ms in the model: three times the 20 ms SLO, past the 1.5 factor.
        body, headers = oip.encode_infer_request({"input": np.full((1, 16), SLOW_FROM + 60, np.float32)})
        for _ in range(12):
            request = urllib.request.Request(
                f"{cluster.peers[primary].url}/v2/models/slow/infer", data=body, headers=headers, method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                assert parse_server_timing(response.headers["Server-Timing"])["model"] >= 60

        def degraded_event() -> dict | None:
            _, log = http_json("GET", cluster.peers[leader].url + "/cluster/events?limit=2000", timeout_s=5)
            return next((e for e in log["events"] if e["kind"] == "degraded" and e["node"] == primary), None)

        event = wait_until(degraded_event, 15, interval_s=0.1, what=f"{primary} reported degraded")
        assert "x SLO" in event["detail"], event
        members = {m["node_id"]: m for m in cluster.peers[leader].snapshot()["members"]}
        assert members[primary]["slow"] is True and members[primary]["status"] == "alive"
        assert [n for n, m in members.items() if m["slow"] or m["degraded"]] == [primary]
