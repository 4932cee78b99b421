"""Routing, as data: what the data-plane workers need to know to serve and forward requests.

The control process holds the committed cluster state; its workers (agent/dataplane.py)
hold only this table, built here from that state and the peer's own replicas and pushed to
them whenever it changes. It says, per app: whether this peer is the app's primary, which
peers to forward to (primary first, then warm backups), whether anyone can serve it, and,
for the replicas loaded here, which model-host key serves them and the tensors the model
declares (so a worker can refuse a request that cannot fit before reading it). Pure
functions of their arguments: the table is a plain dict, the message itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redge.consensus.state import ALIVE, SUSPECTED, ClusterState

SERVING_REPORTS = ("serving", "load_done")


@dataclass(frozen=True)
class LocalModel:
    """One replica loaded on this peer, as a worker needs it."""

    app: str
    key: str  # the model host's key
    variant: str
    version: str
    format: str
    role: str  # primary | warm
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    epoch: int = 0  # the last plan that gave it its role

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "variant": self.variant, "version": self.version, "format": self.format,
            "role": self.role, "epoch": self.epoch, "inputs": list(self.inputs), "outputs": list(self.outputs),
        }


def route_targets(state: ClusterState, app: str, self_id: str) -> list[tuple[str, str, str, str]]:
    """(node_id, http_address, role, variant) to try for `app`: primary, then warm backups."""
    order = {"primary": 0, "warm": 1}
    targets = []
    for replica in state.plan.get(app, ()):
        member = state.members.get(replica.node_id)
        if replica.role not in order or member is None or member.status not in (ALIVE, SUSPECTED):
            continue
        if replica.node_id == self_id:
            continue
        targets.append((order[replica.role], member.status != ALIVE, replica.node_id, member.http_address, replica.role, replica.variant))
    targets.sort()
    return [t[2:] for t in targets]


def client_routes(state: ClusterState) -> dict[str, Any]:
    """The routing table that clients keep: per app, its replicas in the order to try."""
    apps: dict[str, Any] = {}
    for app in sorted(state.apps):
        replicas = []
        for replica in state.plan.get(app, ()):
            member = state.members.get(replica.node_id)
            if member is None:
                continue
            replicas.append(
                {
                    "node_id": replica.node_id,
                    "url": f"http://{member.http_address}",
                    "role": replica.role,
                    "variant": replica.variant,
                    "status": member.status,
                    "report": state.replica_reports.get((app, replica.node_id)),
                }
            )
        order = {"primary": 0, "warm": 1, "cold": 2}
        replicas.sort(key=lambda r: (order.get(r["role"], 9), r["status"] != ALIVE, r["node_id"]))
        apps[app] = {"replicas": replicas}
    return {"epoch": state.epoch, "apps": apps}


def _live_serving_roles(state: ClusterState, app: str) -> list[tuple[str, str | None]]:
    """(node_id, its last report for `app`) of each primary or warm replica on a live node."""
    found = []
    for replica in state.plan.get(app, ()):
        member = state.members.get(replica.node_id)
        if replica.role in ("primary", "warm") and member is not None and member.status in (ALIVE, SUSPECTED):
            found.append((replica.node_id, state.replica_reports.get((app, replica.node_id))))
    return found


def servable(state: ClusterState, app: str) -> bool:
    """Whether some live primary or warm replica of `app` reports itself loaded."""
    return any(report in SERVING_REPORTS for _, report in _live_serving_roles(state, app))


def loading_on(state: ClusterState, app: str) -> list[str]:
    """Live nodes the plan gives a serving role for `app` that have not reported it loaded
    (nor failed to load it): where it is being loaded, or is about to be. While `app` is not
    servable and this is not empty, the app is recovering: a request for it is held, not
    failed (agent/dataplane.py)."""
    return sorted(node for node, report in _live_serving_roles(state, app)
                  if report not in (*SERVING_REPORTS, "load_failed"))


def interim_targets(state: ClusterState, app: str) -> list[list[str]]:
    """Where `app` can be answered while it is recovering (progressive failover): copies of
    its planned variant or of a smaller one (later in its list) that other apps have loaded
    on live nodes, best first: [node_id, http_address, the app that holds the copy, variant].

    Empty while the app is servable, or when nothing of its family is loaded anywhere. It is
    a function of the committed state, so every peer picks the same copies; once the app's
    own replica reports loaded it is servable again and these are no longer used.
    """
    registered = state.apps.get(app)
    if registered is None or servable(state, app):
        return []
    variants = list(registered.variants)
    planned = next((r.variant for r in state.plan.get(app, ()) if r.role == "primary"), None)
    floor = variants.index(planned) if planned in variants else 0
    found = []
    for other, replicas in state.plan.items():
        if other == app:
            continue
        for replica in replicas:
            member = state.members.get(replica.node_id)
            if (
                replica.role in ("primary", "warm")
                and replica.variant in variants
                and variants.index(replica.variant) >= floor
                and member is not None
                and member.status == ALIVE
                and state.replica_reports.get((other, replica.node_id)) in SERVING_REPORTS
            ):
                found.append((variants.index(replica.variant), replica.role != "warm", replica.node_id,
                              member.http_address, other, replica.variant))
    # Largest variant first; among equals a warm copy (idle) before another app's primary.
    found.sort()
    return [[node_id, address, holder, variant] for _, _, node_id, address, holder, variant in found]


def cluster_view(state: ClusterState, self_id: str) -> dict[str, Any]:
    """The part of the worker's table read from the committed state (under its lock)."""
    apps = {}
    for name, app in state.apps.items():
        primary = state.primary_of(name)
        apps[name] = {
            "slo_ms": app.slo_ms,
            "variants": list(app.variants),
            "primary_here": primary is not None and primary.node_id == self_id,
            # The committed plan gives this node a serving role (primary or warm) for it.
            "planned_here": any(r.node_id == self_id and r.role in ("primary", "warm") for r in state.plan.get(name, ())),
            "targets": [list(target) for target in route_targets(state, name, self_id)],
            "servable": servable(state, name),
            "loading_on": loading_on(state, name),
            "interim": interim_targets(state, name),
            # The plan's primary is on a node confirmed failed: a new plan is on its way.
            "failing_over": primary is not None and (
                state.members.get(primary.node_id) is None
                or state.members[primary.node_id].status not in (ALIVE, SUSPECTED)
            ),
        }
    return {"epoch": state.epoch, "apps": apps, "client_routes": client_routes(state)}


def route_table(
    view: dict[str, Any],
    local: Iterable[LocalModel],
    *,
    ready: tuple[bool, str],
    host: tuple[str, bytes] | None,
) -> dict[str, Any]:
    """The whole `routes` message: the committed view, this peer's replicas, its readiness
    and where its model host takes data-plane connections."""
    return {
        "type": "routes",
        **view,
        "local": {model.app: model.to_json() for model in local},
        "ready": list(ready),
        "host": {"address": host[0], "token": host[1].hex()} if host is not None else None,
    }
