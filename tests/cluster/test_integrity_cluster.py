"""A bad copy on a real peer: the same size, other bytes. When the peer next loads it, it
refuses it, quarantines it and fetches a good copy; the leader places the backup on another
node at once, and the app keeps serving the right answers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import orjson
import pytest

from redge.agent.client import Client
from redge.chaos.cluster import LocalCluster, wait_until
from redge.chaos.faults import process_tree
from redge.chaos.observe import replicas_loaded
from redge.runtime.errors import RuntimeFailure
from redge.runtime.manifest import Manifest, sha256_file
from redge.runtime.testing import IN_FEATURES, write_family

pytestmark = pytest.mark.cluster

DET = {"name": "det", "variants": ["mlp-medium"], "priority": "critical", "slo_ms": 1000, "backup": "warm"}
X = {"input": np.linspace(-1, 1, 3 * IN_FEATURES, dtype=np.float32).reshape(3, IN_FEATURES)}


def test_a_copy_overwritten_with_other_bytes_of_its_size_is_quarantined_and_fetched_again(tmp_path):
    source = tmp_path / "source"
    write_family(source, formats=("onnx",), sizes={"mlp-medium": (64, 2)})
    with LocalCluster(size=3, extra_args=["--source", str(source)]) as cluster:
        leader = cluster.wait_leader()
        assert cluster.register_app(leader, DET)[0] == 200
        wait_until(lambda: replicas_loaded(cluster, leader, ["det"], backups_min=1), 120, interval_s=0.1,
                   what="det served with its warm backup")
        snapshot = cluster.peers[leader].snapshot()
        roles = {r["role"]: r["node_id"] for r in snapshot["plan"]["det"]}
        warm = cluster.peers[roles["warm"]]
        with Client([cluster.peers[roles["primary"]].url]) as client:
            expected = client.infer("det", X).outputs["output"]
        model_file = next((warm.data_dir / "store" / "mlp-medium").glob("*/model.onnx"))
        size = model_file.stat().st_size
        model_file.write_bytes(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())
        assert model_file.stat().st_size == size
        # Its model host dies: the peer starts another and loads its warm copy again, from disk.
        host = next(pid for pid in process_tree(warm.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(host, signal.SIGKILL)
        failures_file = warm.data_dir / "store" / ".quarantine" / "failures.json"
        wait_until(lambda: failures_file.exists() or None, 60, what="the bad copy quarantined")
        # The failed load is reported and the leader plans around it: the warm backup moves.
        def backup_elsewhere() -> bool:
            plan = cluster.peers[leader].snapshot()["plan"]["det"]
            return any(r["role"] == "warm" and r["node_id"] not in (warm.node_id, roles["primary"]) for r in plan)

        wait_until(backup_elsewhere, 20, interval_s=0.05, what="the warm backup placed on another node")
        events = cluster.peers[leader].get("/cluster/events?limit=2000")[1]["events"]
        assert any(e["kind"] == "load_failed" and e["node"] == warm.node_id for e in events)
        wait_until(lambda: replicas_loaded(cluster, leader, ["det"], backups_min=1, members_alive=True), 60,
                   interval_s=0.1, what="the warm backup loaded on its new node")
        # The node with the bad copy fetched a good one anyway, for when it is chosen again.
        def good_copy() -> Path | None:
            found = next((warm.data_dir / "store" / "mlp-medium").glob("*/model.onnx"), None)
            try:
                return found if found and sha256_file(found) == Manifest.read(found.parent).files[0].sha256 else None
            except (OSError, RuntimeFailure):
                return None  # still arriving

        wait_until(good_copy, 30, interval_s=0.1, what="a good copy fetched again")
        failures = orjson.loads(failures_file.read_bytes())
        assert list(failures.values())[0]["count"] == 1 and "sha256" in list(failures.values())[0]["reason"]
        # The node answers (it forwards to a replica), and what it answers is right.
        with Client([warm.url]) as client:
            result = client.infer("det", X)
        np.testing.assert_allclose(result.outputs["output"], expected, rtol=1e-5, atol=1e-6)
