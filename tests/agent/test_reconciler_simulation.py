"""The reconciler's duty in a deterministic simulation: the real Reconciler over the
in-memory cluster of test_leader_simulation.py, with a real store on disk and a replica
manager that records instead of loading (what it loads is the model host's business and is
tested there). Committed plans in, loads, role changes, unloads and reports out."""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib

import pytest

from redge.agent.reconciler import Reconciler
from redge.agent.replicas import LocalReplica
from redge.consensus import commands as c
from redge.runtime.errors import LoadFailed
from redge.runtime.loader import LoadReport
from redge.runtime.store import Store
from redge.runtime.testing import write_family

_spec = importlib.util.spec_from_file_location("leader_simulation", pathlib.Path(__file__).with_name(
    "test_leader_simulation.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
SimulatedCluster = _module.SimulatedCluster


class RecordingReplicas:
    """The ReplicaManager's interface, recording what the reconciler asks of it."""

    device_kind = "cpu"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.replicas: dict[str, LocalReplica] = {}
        self.calls: list[tuple[str, ...]] = []
        self.failing: set[str] = set()
        self.on_host_crash = None

    def warm_up(self, expected=None) -> None:
        pass

    def manifests_of(self, variant: str, purpose: str):
        return next((m for m in self.store.list() if m.name == variant), None)

    async def load(self, app: str, variant: str, role: str, timeout_s=None, epoch: int = 0, **_):
        if variant in self.failing:
            raise LoadFailed(variant, "1-safetensors", "safetensors", "deserialize", "simulated bad bytes")
        manifest = self.manifests_of(variant, "serving")
        report = LoadReport(variant, manifest.version, manifest.format, "cpu", 1, 0.1, 0.2, 0.3, 0.0, 0.4, 1.0)
        self.replicas[app] = LocalReplica(app, variant, manifest, role, f"{app}@{variant}", 0.0, report, epoch)
        self.calls.append(("load", app, variant, role))
        return self.replicas[app]

    async def prepare(self, variant: str) -> bool:
        return True

    async def set_role(self, app: str, role: str, epoch: int | None = None) -> None:
        self.replicas[app].role = role
        self.calls.append(("role", app, role))

    async def unload(self, app: str) -> bool:
        self.calls.append(("unload", app))
        return self.replicas.pop(app, None) is not None

    def serving(self, app: str) -> LocalReplica | None:
        return self.replicas.get(app)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> pathlib.Path:
    source = tmp_path_factory.mktemp("source")
    write_family(source, sizes={"mlp-small": (16, 1)})
    return source


@pytest.fixture
def node(tmp_path, artifacts):
    cluster = SimulatedCluster(node_id="n1")
    store = Store(tmp_path / "store", budget_bytes=1 << 30)
    replicas = RecordingReplicas(store)

    async def registered() -> None:
        return None

    reconciler = Reconciler(cluster, replicas, store, str(artifacts), registered=registered,
                            cold_serving_format=False)
    for index in (1, 2):
        cluster.commit(c.Join(f"n{index}", f"h:{index}", f"r:{index}", f"b:{index}", 1, 0))
    cluster.commit(c.RegisterApp("det", ("mlp-small",), "critical", 500.0, "warm", 0))
    asyncio.run(reconciler.report_store())  # as the duty does first: what its source offers
    assert ("mlp-small", "1-safetensors") in cluster.state.sources["n1"]
    return cluster, replicas, reconciler


def plan(cluster: SimulatedCluster, *replicas: c.Replica, app: str = "det") -> None:
    outcome = cluster.commit(c.CommitPlan(cluster.state.epoch + 1, (c.AppPlacement(app, replicas),), "n2", "test", 1))
    assert outcome.accepted, outcome.reason


def reports(cluster: SimulatedCluster, node: str = "n1") -> list[tuple[str, str]]:
    return [(e.kind, e.fields.get("app", "")) for e in cluster.state.events
            if e.fields.get("node") == node and e.kind in c.REPORT_KINDS]


def test_a_plan_is_carried_out_and_reported(node):
    cluster, replicas, reconciler = node
    plan(cluster, c.Replica("n1", "mlp-small", "warm"), c.Replica("n2", "mlp-small", "primary"))
    asyncio.run(reconciler.reconcile())
    assert replicas.calls == [("load", "det", "mlp-small", "warm")]
    assert reports(cluster)[-2:] == [("load_started", "det"), ("load_done", "det")]
    assert cluster.state.replica_reports[("det", "n1")] == "load_done"
    # The fetched artifact is reported as held here.
    assert ("mlp-small", "1-safetensors") in cluster.state.stores["n1"]
    # Promoted: a role change and `serving`, no second load.
    plan(cluster, c.Replica("n1", "mlp-small", "primary"))
    asyncio.run(reconciler.reconcile())
    assert replicas.calls[1:] == [("role", "det", "primary")]
    assert reports(cluster)[-1] == ("serving", "det")


def test_a_replica_no_longer_planned_here_is_unloaded_once_its_successor_serves(node):
    cluster, replicas, reconciler = node
    plan(cluster, c.Replica("n1", "mlp-small", "primary"))
    asyncio.run(reconciler.reconcile())
    plan(cluster, c.Replica("n2", "mlp-small", "primary"))
    asyncio.run(reconciler.reconcile())
    assert ("unload", "det") not in replicas.calls  # n2 does not serve it yet: the copy bridges
    assert replicas.calls[-1] == ("role", "det", "warm")  # but it stops acting as the primary
    cluster.commit(c.Report("n2", "serving", 5, app="det", variant="mlp-small", epoch=cluster.state.epoch))
    asyncio.run(reconciler.reconcile())
    assert replicas.calls[-1] == ("unload", "det") and reports(cluster)[-1] == ("unloaded", "det")


def test_a_load_that_fails_is_reported_with_its_variant_and_the_bad_copy_quarantined(node):
    cluster, replicas, reconciler = node
    replicas.failing.add("mlp-small")
    plan(cluster, c.Replica("n1", "mlp-small", "primary"))
    asyncio.run(reconciler.reconcile())
    failed = [e for e in cluster.state.events if e.kind == "load_failed" and e.fields.get("node") == "n1"]
    assert failed and failed[-1].fields["variant"] == "mlp-small"
    assert replicas.replicas == {}
    assert reconciler.store.quarantined()  # a copy its backend could not load is moved out
