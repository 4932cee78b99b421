"""A peer that requires a token for reads (--read-token-file or REDGE_READ_TOKEN): the
cluster's state, events, metrics and artifacts answer 401 without it; inference, routes and
health stay open; and peers still copy artifacts from each other, with the token."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from redge.agent.client import Client
from redge.chaos.cluster import ADMIN_TOKEN, LocalCluster, http_json, wait_until
from redge.chaos.observe import replicas_loaded
from redge.runtime.testing import IN_FEATURES, write_family

pytestmark = pytest.mark.cluster

READ_TOKEN = "read-token-for-this-test"
DET = {"name": "det", "variants": ["mlp-small"], "priority": "critical", "slo_ms": 1000, "backup": "warm"}
X = {"input": np.ones((1, IN_FEATURES), dtype=np.float32)}


def status_of(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_reads_need_the_token_and_serving_does_not(tmp_path):
    source = tmp_path / "source"
    write_family(source, formats=("onnx",), sizes={"mlp-small": (32, 1)})
    cluster = LocalCluster(size=3, read_token=READ_TOKEN)
    cluster.peers["n1"].args += ["--source", str(source)]  # the others can only copy from a peer
    with cluster:
        leader = cluster.wait_leader()
        assert cluster.register_app(leader, DET)[0] == 200
        wait_until(lambda: replicas_loaded(cluster, leader, ["det"], backups_min=1), 120, interval_s=0.1,
                   what="det served with a warm backup copied from a peer")
        snapshot = cluster.peers[leader].snapshot()
        copied = {r["node_id"] for r in snapshot["plan"]["det"]} - {"n1"}
        assert copied and all(snapshot["stores"][node] for node in copied)
        name, version = snapshot["stores"]["n1"][0]
        url = cluster.peers["n1"].url
        reads = ["/cluster", "/cluster/events", "/cluster/apps", "/metrics", f"/models/{name}/{version}/artifact"]
        for path in reads:
            for token in (None, "wrong", "caf", READ_TOKEN + "x"):
                assert status_of(url + path, token) == 401, (path, token)
            assert status_of(url + path, READ_TOKEN) == 200, path
            assert status_of(url + path, ADMIN_TOKEN) == 200, path
        for path in ("/v2", "/v2/health/ready", "/v2/health/live", "/cluster/routes", "/v2/models/det"):
            assert status_of(url + path) == 200, path
        for hidden in ("/v2/health/..%2F..%2Fcluster", "/v2/health/%2E%2E/cluster", "/cluster/../cluster"):
            assert status_of(url + hidden) in (401, 404), hidden  # never the state, unasked
        with Client([url]) as client:
            assert client.infer("det", X).outputs["output"].shape[0] == 1
        # The read token is not an admin token.
        status, _ = http_json("POST", url + "/cluster/apps", {**DET, "name": "other"}, token=READ_TOKEN)
        assert status == 401
        assert status_of(url + "/cluster", "\u00ff\u00fe") == 401
        assert cluster.peers["n1"].ready()
