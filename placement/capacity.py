"""The compute and capacity model that every placement is judged by.

A loaded model holds its memory whether it serves or idles; what it computes
depends on its role. The paper measured co-located models slowing each other
by 2-17 %, mostly through the accelerator, so a primary's latency is its
isolated latency times (1 + inflation_per_primary x other primaries on the
node + inflation_per_warm x warm backups there). A warm backup must still
meet its app's SLO the moment it is promoted, so it is judged as if it were
a primary already. A cold backup holds only disk, but must be able to serve
within the SLO once loaded.

`violations` is the one checker that the planner's tests, the exact solver's
tests and the benchmark use, so that "feasible" means one thing everywhere.
"""

from __future__ import annotations

import dataclasses

from redge.placement.problem import (
    HEALTH_KEEPS_REPLICAS,
    App,
    Plan,
    Problem,
    Role,
    Settings,
    Variant,
)

TOLERANCE = 1e-9
"""Slack for float comparisons: sums of latencies and fractions."""


def predicted_latency_ms(
    settings: Settings, variant: Variant, device_kind: str, primaries_other: int, warm_other: int
) -> float | None:
    """Latency of `variant` serving on a node with the given co-located
    loaded replicas; None when the device kind cannot run it."""
    base_ms = variant.latency_ms(device_kind)
    if base_ms is None:
        return None
    inflation = (
        settings.inflation_per_primary * primaries_other + settings.inflation_per_warm * warm_other
    )
    return base_ms * (1.0 + inflation)


def utilisation(app: App, variant: Variant, device_kind: str) -> float:
    """Busy fraction of the node's device that serving `app` would take."""
    base_ms = variant.latency_ms(device_kind)
    assert base_ms is not None
    return app.request_rate_per_s * base_ms / 1000.0


@dataclasses.dataclass(frozen=True)
class Usage:
    memory_bytes: int
    storage_bytes: int
    utilisation: float
    primaries: int
    warm: int


def usage(problem: Problem, plan: Plan) -> dict[str, Usage]:
    """What `plan` takes on each node. Artifacts shared by several replicas
    on a node count once; unknown apps or variants are skipped (the checker
    reports them)."""
    memory: dict[str, int] = {}
    artifact_sizes: dict[str, dict[str, int]] = {}
    busy: dict[str, float] = {}
    primaries: dict[str, int] = {}
    warm: dict[str, int] = {}
    apps = {a.name: a for a in problem.apps}
    nodes = {n.node_id: n for n in problem.nodes}
    for replica in plan.replicas:
        app = apps.get(replica.app)
        node = nodes.get(replica.node_id)
        if app is None or node is None:
            continue
        index = app.variant_index(replica.variant)
        if index is None:
            continue
        variant = app.variants[index]
        node_id = replica.node_id
        sizes = artifact_sizes.setdefault(node_id, {})
        sizes[variant.name] = max(sizes.get(variant.name, 0), variant.size_bytes)
        if replica.role is Role.COLD:
            continue
        memory[node_id] = memory.get(node_id, 0) + variant.memory_bytes
        if replica.role is Role.PRIMARY:
            primaries[node_id] = primaries.get(node_id, 0) + 1
            if variant.latency_ms(node.device_kind) is not None:
                busy[node_id] = busy.get(node_id, 0.0) + utilisation(app, variant, node.device_kind)
        else:
            warm[node_id] = warm.get(node_id, 0) + 1
    return {
        n.node_id: Usage(
            memory_bytes=memory.get(n.node_id, 0),
            storage_bytes=sum(artifact_sizes.get(n.node_id, {}).values()),
            utilisation=busy.get(n.node_id, 0.0),
            primaries=primaries.get(n.node_id, 0),
            warm=warm.get(n.node_id, 0),
        )
        for n in problem.nodes
    }


def violations(problem: Problem, plan: Plan) -> list[str]:
    """Every way `plan` breaks a hard rule; empty when it is feasible.

    Hard rules: known apps, variants and nodes; replicas only on nodes that
    keep replicas; at most one primary and one backup per app (a backup may
    wait for its app's primary, e.g. behind the load bound), in a role the
    app's backup policy allows; replicas of one app on distinct nodes; no
    node over its memory, storage or compute; every primary within its SLO
    with co-location, every warm backup within it once promoted, every cold
    backup within it in isolation.
    """
    found: list[str] = []
    apps = {a.name: a for a in problem.apps}
    nodes = {n.node_id: n for n in problem.nodes}
    seen_nodes: dict[str, set[str]] = {}
    roles: dict[str, list[Role]] = {}
    for replica in plan.replicas:
        app = apps.get(replica.app)
        node = nodes.get(replica.node_id)
        if app is None or node is None:
            found.append(f"{replica}: unknown app or node")
            continue
        if app.variant_index(replica.variant) is None:
            found.append(f"{replica}: unknown variant")
            continue
        if node.health not in HEALTH_KEEPS_REPLICAS:
            found.append(f"{replica}: node is {node.health.value}")
        if replica.node_id in seen_nodes.setdefault(replica.app, set()):
            found.append(f"{replica.app}: two replicas on {replica.node_id}")
        seen_nodes[replica.app].add(replica.node_id)
        roles.setdefault(replica.app, []).append(replica.role)
    for name, app_roles in sorted(roles.items()):
        if app_roles.count(Role.PRIMARY) > 1:
            found.append(f"{name}: {app_roles.count(Role.PRIMARY)} primaries")
        backups = [r for r in app_roles if r is not Role.PRIMARY]
        if len(backups) > 1:
            found.append(f"{name}: {len(backups)} backups")
        wanted = apps[name].backup_role()
        allowed = {None: set(), Role.COLD: {Role.COLD}, Role.WARM: {Role.WARM, Role.COLD}}[wanted]
        if any(r not in allowed for r in backups):
            found.append(f"{name}: backup role not allowed by policy {apps[name].backup.value}")
    loads = usage(problem, plan)
    for node in problem.nodes:
        load = loads[node.node_id]
        if load.memory_bytes > node.model_memory_bytes:
            found.append(f"{node.node_id}: memory {load.memory_bytes} > {node.model_memory_bytes}")
        if load.storage_bytes > node.storage_bytes:
            found.append(f"{node.node_id}: storage {load.storage_bytes} > {node.storage_bytes}")
        if load.utilisation > 1.0 + TOLERANCE:
            found.append(f"{node.node_id}: utilisation {load.utilisation:.3f} > 1")
    for replica in plan.replicas:
        app = apps.get(replica.app)
        node = nodes.get(replica.node_id)
        if app is None or node is None or app.variant_index(replica.variant) is None:
            continue
        variant = app.variants[app.variant_index(replica.variant)]
        load = loads[node.node_id]
        if replica.role is Role.PRIMARY:
            latency = predicted_latency_ms(
                problem.settings, variant, node.device_kind, load.primaries - 1, load.warm
            )
        elif replica.role is Role.WARM:
            latency = predicted_latency_ms(
                problem.settings, variant, node.device_kind, load.primaries, load.warm - 1
            )
        else:
            latency = variant.latency_ms(node.device_kind)
        if latency is None:
            found.append(f"{replica}: {node.device_kind} cannot run {variant.name}")
        elif latency > app.slo_ms * (1.0 + TOLERANCE):
            found.append(f"{replica}: latency {latency:.2f} ms > slo {app.slo_ms} ms")
    return found
