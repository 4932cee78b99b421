"""Questions about a running cluster, asked through a peer's public API (`GET /cluster`).

Benchmarks, the demo and tests all need to know who serves an app and whether every
replica is loaded; they ask here, the way an operator's script would.
"""

from __future__ import annotations

from collections.abc import Iterable

from redge.chaos.cluster import LocalCluster

LOADED = ("serving", "load_done")


def primary_of(cluster: LocalCluster, via: str, app: str) -> str | None:
    """The node holding `app`'s primary in the plan that peer `via` has committed."""
    snapshot = cluster.peers[via].snapshot() or {}
    return next((r["node_id"] for r in snapshot.get("plan", {}).get(app, []) if r["role"] == "primary"), None)


def replicas_loaded(cluster: LocalCluster, via: str, apps: Iterable[str], backups_min: int = 0,
                    members_alive: bool = False) -> bool:
    """Every app has a primary and at least `backups_min` backups, and each primary and warm
    backup reports itself loaded; with `members_alive`, every member is alive too."""
    snapshot = cluster.peers[via].snapshot()
    if snapshot is None:
        return False
    if members_alive and any(m["status"] != "alive" for m in snapshot["members"]):
        return False
    reports = {(r["app"], r["node_id"]): r["state"] for r in snapshot["replica_reports"]}
    for app in apps:
        replicas = snapshot["plan"].get(app, [])
        if not any(r["role"] == "primary" for r in replicas) or len(replicas) < 1 + backups_min:
            return False
        for replica in replicas:
            if replica["role"] in ("primary", "warm") and reports.get((app, replica["node_id"])) not in LOADED:
                return False
    return True
