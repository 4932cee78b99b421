"""Cold recovery on real peers: while an app has no ready replica but one is loading, its
requests are held and answered, not failed; only a request whose deadline passes fails, and
it says the app is recovering."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest

from redge.agent import oip
from redge.agent.client import AppRecovering, Client, ClientError
from redge.chaos.cluster import LocalCluster, http_json, wait_until
from redge.chaos.observe import primary_of, replicas_loaded
from redge.runtime.manifest import Architecture
from redge.runtime.testing import IN_FEATURES, OUT_FEATURES, mlp, write_artifact, write_family

pytestmark = pytest.mark.cluster

# The cold backup's load lasts this long (its architecture builds slowly): the window in
# which requests must be held.
BUILD_MS = 2500
SLOW = {"name": "slow", "variants": ["slow-mlp"], "priority": "standard", "slo_ms": 1000, "backup": "cold"}
X = {"input": np.ones((1, IN_FEATURES), np.float32)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("source")
    kwargs = {"in_features": IN_FEATURES, "hidden": 16, "depth": 1, "out_features": OUT_FEATURES, "build_ms": BUILD_MS}
    module = mlp(**{k: v for k, v in kwargs.items() if k != "build_ms"})
    # Only safetensors: the cold backup has nothing faster to load.
    write_artifact(module, directory, name="slow-mlp", version="1-safetensors",
                   architecture=Architecture("redge.runtime.testing:slow_building_mlp", kwargs))
    return directory


def plan_of(cluster: LocalCluster, via: str) -> dict[str, str]:
    snapshot = cluster.peers[via].snapshot() or {}
    return {r["role"]: r["node_id"] for r in snapshot.get("plan", {}).get("slow", [])}


def loading_now(cluster: LocalCluster, via: str, victim: str) -> str | None:
    """The new primary, once the plan after the victim's failure is committed and its copy
    is not loaded yet."""
    snapshot = cluster.peers[via].snapshot() or {}
    primary = next((r["node_id"] for r in snapshot.get("plan", {}).get("slow", []) if r["role"] == "primary"), None)
    reports = {(r["app"], r["node_id"]): r["state"] for r in snapshot.get("replica_reports", [])}
    if primary in (None, victim) or reports.get(("slow", primary)) in ("serving", "load_done"):
        return None
    return primary


def recovered(cluster: LocalCluster, via: str, app: str, victim: str) -> bool:
    """The plan has moved `app`'s primary off `victim`, and it reports itself loaded."""
    primary = primary_of(cluster, via, app)
    return primary is not None and primary != victim and replicas_loaded(cluster, via, [app])


def held_total(cluster: LocalCluster) -> float:
    total = 0.0
    for peer in cluster.running_peers():
        with urllib.request.urlopen(peer.url + "/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("redge_requests_held_total") and 'outcome="answered"' in line:
                    total += float(line.rsplit(" ", 1)[1])
    return total


def test_requests_are_held_while_the_cold_backup_loads_and_only_a_passed_deadline_fails(source):
    with LocalCluster(size=3, extra_args=["--source", str(source)]) as cluster:
        leader = cluster.wait_leader()
        status, body = cluster.register_app(leader, SLOW)
        assert status == 200, body
        wait_until(lambda: replicas_loaded(cluster, leader, ["slow"], backups_min=1), 120, interval_s=0.1,
                   what="the app served, with its cold backup planned")
        roles = plan_of(cluster, leader)
        victim, backup = roles["primary"], roles["cold"]
        survivor = next(n for n in cluster.peers if n not in (victim, backup))
        urls = [cluster.peers[n].url for n in (survivor, backup)]  # the client is never told the victim's URL
        outcomes: list[tuple[str, float, str]] = []
        stop = threading.Event()

        def call() -> None:
            with Client(urls, deadline_s=20.0) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        result = client.infer("slow", X)
                        outcomes.append(("ok", time.monotonic() - started, result.node_id or ""))
                    except ClientError as error:
                        outcomes.append(("fail", time.monotonic() - started, str(error)))

        callers = [threading.Thread(target=call, daemon=True) for _ in range(2)]
        for caller in callers:
            caller.start()
        wait_until(lambda: len(outcomes) >= 4 or None, 30, what="the clients served before the fault")
        cluster.peers[victim].kill()
        new_primary = wait_until(lambda: loading_now(cluster, survivor, victim), 10, interval_s=0.005,
                                 what="the new plan committed while its primary loads")
        assert new_primary == backup

        # A request whose deadline passes during the load fails, and says why.
        body, headers = oip.encode_infer_request(X)
        request = urllib.request.Request(
            f"{cluster.peers[survivor].url}/v2/models/slow/infer", data=body, method="POST",
            headers={**headers, "X-Redge-Deadline-Ms": "300"},
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 503
        assert raised.value.headers["X-Redge-Recovering"] == backup
        assert "recovering" in orjson.loads(raised.value.read())["error"]
        with Client(urls, deadline_s=0.3) as impatient, pytest.raises(AppRecovering) as recovering:
            impatient.infer("slow", X)
        assert recovering.value.loading_on == backup and "recovering" in str(recovering.value)

        # Everyone else waits within a deadline longer than the recovery, and is answered.
        wait_until(lambda: recovered(cluster, survivor, "slow", victim), 60, interval_s=0.05, what="the cold backup serving")
        count = len(outcomes)
        wait_until(lambda: len(outcomes) >= count + 4 or None, 30, what="answers after the recovery")
        stop.set()
        for caller in callers:
            caller.join(timeout=30)
        failures = [o for o in outcomes if o[0] == "fail"]
        assert failures == []
        assert max(seconds for _, seconds, _ in outcomes) >= BUILD_MS / 1000 / 2  # delayed, not failed
        assert outcomes[-1][2] == backup
        assert held_total(cluster) >= 1


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    directory = tmp_path_factory.mktemp("family")
    write_family(directory, formats=("onnx", "safetensors"))
    return directory


TAG = {"name": "tag", "variants": ["mlp-medium"], "priority": "standard", "slo_ms": 1000, "backup": "cold"}


@dataclass
class Recovery:
    fault_ms: float
    outcomes: list[tuple[str, str]]
    stop: threading.Event
    caller: threading.Thread
    survivor: str
    backup: str

    def finish(self) -> None:
        self.stop.set()
        self.caller.join(timeout=30)


def recover(cluster: LocalCluster, prepared: Callable[[Path], bool]) -> Recovery:
    """Kill the tag app's primary while a client calls it, once `prepared(data dir of the
    cold backup)`, and wait until the cold backup serves; the client calls until `finish`."""
    leader = cluster.wait_leader()
    status, body = cluster.register_app(leader, TAG)
    assert status == 200, body
    wait_until(lambda: replicas_loaded(cluster, leader, ["tag"], backups_min=1), 120, interval_s=0.1, what="tag served")
    roles = wait_until(lambda: (lambda found: found if "cold" in found else None)(dict(_roles(cluster, leader))), 30,
                       what="a cold backup planned")
    victim, backup = roles["primary"], roles["cold"]
    survivor = next(n for n in cluster.peers if n not in (victim, backup))
    wait_until(lambda: prepared(cluster.peers[backup].data_dir) or None, 60, what="the cold backup prepared")
    outcomes: list[tuple[str, str]] = []
    stop = threading.Event()

    def call() -> None:
        with Client([cluster.peers[survivor].url, cluster.peers[backup].url], deadline_s=20.0) as client:
            while not stop.is_set():
                try:
                    outcomes.append(("ok", client.infer("tag", X).node_id or ""))
                except ClientError as error:
                    outcomes.append(("fail", str(error)))

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_until(lambda: len(outcomes) >= 3 or None, 30, what="answers before the fault")
    fault_ms = time.time() * 1000
    cluster.peers[victim].kill()
    wait_until(lambda: recovered(cluster, survivor, "tag", victim), 60, interval_s=0.05, what="the cold backup serving")
    return Recovery(fault_ms, outcomes, stop, caller, survivor, backup)


def _roles(cluster: LocalCluster, via: str) -> list[tuple[str, str]]:
    """(role, node) of the tag app's replicas in the plan."""
    snapshot = cluster.peers[via].snapshot() or {}
    return [(r["role"], r["node_id"]) for r in snapshot.get("plan", {}).get("tag", [])]


def stored_formats(data_dir: Path) -> set[str]:
    return {p.parent.name.split("-", 1)[1] for p in data_dir.rglob("mlp-medium/*/manifest.json")}


def derived(data_dir: Path) -> bool:
    """The serving format stored and its optimised graph derived."""
    return "onnx" in stored_formats(data_dir) and any(data_dir.rglob(".derived/*/model.onnx"))


def _tag_loads(cluster: LocalCluster, via: str, node: str, since_ms: float) -> list[str]:
    status, body = http_json("GET", cluster.peers[via].url + "/cluster/events?limit=2000", timeout_s=5)
    assert status == 200
    return [e.get("detail", "") for e in body["events"]
            if e["kind"] == "load_done" and e.get("app") == "tag" and e.get("node") == node and e["at_ms"] >= since_ms]


def test_a_cold_backup_prepared_in_the_serving_format_recovers_from_its_derived_graph(family):
    with LocalCluster(size=3, extra_args=["--source", str(family)]) as cluster:
        run = recover(cluster, derived)
        loads = wait_until(lambda: _tag_loads(cluster, run.survivor, run.backup, run.fault_ms) or None, 30,
                           what="the recovery's load")
        run.finish()
    assert loads[0].startswith("onnx:") and loads[0].endswith("(derived graph)"), loads
    assert [o for o in run.outcomes if o[0] == "fail"] == []
    assert run.outcomes[-1] == ("ok", run.backup)


def test_without_the_serving_format_a_recovery_serves_the_cold_format_then_switches(family):
    with LocalCluster(size=3, extra_args=["--source", str(family), "--no-cold-serving-format"]) as cluster:
        run = recover(cluster, lambda data_dir: "safetensors" in stored_formats(data_dir))
        loads = wait_until(lambda: (lambda found: found if len(found) >= 2 else None)(
            _tag_loads(cluster, run.survivor, run.backup, run.fault_ms)), 60, what="the load and the switch")
        count = len(run.outcomes)
        wait_until(lambda: len(run.outcomes) >= count + 3 or None, 30, what="answers after the switch")
        run.finish()
    assert loads[0].startswith("safetensors:"), loads
    assert loads[1].startswith("switched from safetensors; onnx:"), loads
    assert [o for o in run.outcomes if o[0] == "fail"] == []  # not one request dropped by the switch
    assert run.outcomes[-1] == ("ok", run.backup)


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory):
    """slow-mlp (a slow load, safetensors only) and the MLP family, inputs alike."""
    directory = tmp_path_factory.mktemp("slow-family")
    write_family(directory, formats=("onnx",), sizes={"mlp-small": (32, 2)})
    kwargs = {"in_features": IN_FEATURES, "hidden": 16, "depth": 1, "out_features": OUT_FEATURES, "build_ms": BUILD_MS}
    write_artifact(mlp(**{k: v for k, v in kwargs.items() if k != "build_ms"}), directory, name="slow-mlp",
                   version="1-safetensors", architecture=Architecture("redge.runtime.testing:slow_building_mlp", kwargs))
    return directory


def test_while_its_cold_backup_loads_an_app_is_answered_from_a_smaller_variant_another_app_runs(slow_family):
    app = {"name": "cam", "variants": ["slow-mlp", "mlp-small"], "priority": "standard", "slo_ms": 1000, "backup": "cold"}
    lite = {"name": "lite", "variants": ["mlp-small"], "priority": "critical", "slo_ms": 1000, "backup": "warm"}
    with LocalCluster(size=3, extra_args=["--source", str(slow_family)]) as cluster:
        leader = cluster.wait_leader()
        for registered in (lite, app):
            status, body = cluster.register_app(leader, registered)
            assert status == 200, body
        wait_until(lambda: replicas_loaded(cluster, leader, ["cam", "lite"], backups_min=1), 120, interval_s=0.1,
                   what="both apps served with their backups")
        snapshot = cluster.peers[leader].snapshot()
        cam = {r["role"]: r["node_id"] for r in snapshot["plan"]["cam"]}
        victim, backup = cam["primary"], cam["cold"]
        survivor = next(n for n in cluster.peers if n not in (victim, backup))
        outcomes: list[tuple[str, str | None, str | None]] = []
        stop = threading.Event()

        def call() -> None:
            with Client([cluster.peers[survivor].url, cluster.peers[backup].url], deadline_s=20.0) as client:
                while not stop.is_set():
                    try:
                        result = client.infer("cam", X)
                        outcomes.append(("ok", result.variant, result.role))
                    except ClientError as error:
                        outcomes.append(("fail", str(error), None))

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        wait_until(lambda: len(outcomes) >= 3 or None, 30, what="answers before the fault")
        cluster.peers[victim].kill()
        wait_until(lambda: recovered(cluster, survivor, "cam", victim), 60, interval_s=0.05, what="the cold backup serving")
        count = len(outcomes)
        wait_until(lambda: len(outcomes) >= count + 3 or None, 30, what="answers after the recovery")
        stop.set()
        caller.join(timeout=30)
    assert [o for o in outcomes if o[0] == "fail"] == []
    interim = [o for o in outcomes if o[2] == "interim"]
    assert interim and all(o[1] == "mlp-small" for o in interim)  # the recovery's seconds, at the smaller variant
    assert outcomes[-1] == ("ok", "slow-mlp", "primary")  # and back once the app's own replica serves
