"""The exact solver: the same placement problem as a mixed-integer program.

It exists to measure the heuristic, not to run in the leader: HiGHS (through
scipy.optimize.milp) solves a few nodes and apps in well under a second but
grows exponentially, so `solve` refuses problems past a variable bound.

It plans from scratch: it ignores the current plan, the load bounds and the
restore hold-down, which all only restrict the heuristic. Its objective is
`objective.objective` written linearly (see docs/placement.md), and its
constraints are those `capacity.violations` checks, with the headroom that
the heuristic keeps for new load. So for a problem with an empty current
plan, every plan the heuristic can return is feasible here, and the
solver's optimum bounds the heuristic's objective from above.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from redge.placement.errors import ProblemTooLarge, SolverFailed
from redge.placement.objective import objective, remote_recovery_ms
from redge.placement.problem import Health, Plan, Problem, Replica, Role

VARIABLES_MAX = 20_000
MIP_RELATIVE_GAP = 1e-7
"""HiGHS stops by default within 1e-4 of its bound, relative to the whole
minimised cost, constant included: enough to miss a warm backup (0.001) and
make the heuristic look better than "optimal"."""


@dataclasses.dataclass(frozen=True)
class SolverResult:
    plan: Plan
    objective: float  # objective.objective(problem, plan), the shared yardstick
    optimal: bool  # False when the time limit stopped HiGHS at a feasible plan


def solve(
    problem: Problem, time_limit_s: float = 10.0, variables_max: int = VARIABLES_MAX
) -> SolverResult:
    """The plan that maximises the shared objective, from scratch."""
    settings = problem.settings
    alpha = settings.inflation_per_primary
    beta = settings.inflation_per_warm
    keep = 1.0 - settings.headroom_fraction
    nodes = problem.nodes
    apps = problem.apps
    app_count = len(apps)
    # replica variables: (app index, variant index, node index, role)
    replicas: list[tuple[int, int, int, Role]] = []
    budgets: list[float] = []
    for a, app in enumerate(apps):
        backup_role = app.backup_role()
        for v, variant in enumerate(app.variants):
            for n, node in enumerate(nodes):
                base_ms = variant.latency_ms(node.device_kind)
                if node.health is not Health.ALIVE or base_ms is None or base_ms > app.slo_ms:
                    continue
                budget = app.slo_ms / base_ms - 1.0
                roles = []
                if not node.hold_down:
                    roles.append(Role.PRIMARY)
                if backup_role is Role.WARM:
                    roles.append(Role.WARM)
                if backup_role in (Role.WARM, Role.COLD):
                    roles.append(Role.COLD)
                for role in roles:
                    replicas.append((a, v, n, role))
                    budgets.append(budget)
    names = sorted({variant.name for app in apps for variant in app.variants})
    name_index = {name: k for k, name in enumerate(names)}
    size_of = {}
    for app in apps:
        for variant in app.variants:
            size_of[variant.name] = max(size_of.get(variant.name, 0), variant.size_bytes)
    # artifact variables s[name, node], then served y[app], then backed-up b[app]
    replica_count = len(replicas)
    artifact_base = replica_count
    served_base = artifact_base + len(names) * len(nodes)
    backup_base = served_base + app_count
    variable_count = backup_base + app_count
    if variable_count > variables_max:
        raise ProblemTooLarge(f"{variable_count} variables > {variables_max}")

    cost = np.zeros(variable_count)  # milp minimises: negate the objective
    recovery_weight = settings.recovery_weight_per_s
    for k, (a, v, _n, role) in enumerate(replicas):
        app = apps[a]
        weight = settings.weight(app.priority)
        if role is Role.PRIMARY:
            cost[k] -= weight * app.variants[v].accuracy
        elif role is Role.COLD:
            cost[k] += weight * recovery_weight * settings.load_ms(app.variants[v]) / 1000.0
    constant = 0.0
    for a, app in enumerate(apps):
        weight = settings.weight(app.priority)
        unserved_s = settings.unserved_recovery_ms / 1000.0
        remote_s = remote_recovery_ms(problem, app) / 1000.0
        constant -= weight * recovery_weight * unserved_s
        cost[served_base + a] -= weight * recovery_weight * (unserved_s - remote_s)
        cost[backup_base + a] -= weight * recovery_weight * remote_s

    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def constraint(terms: list[tuple[int, float]], low: float, high: float) -> None:
        row = len(lower)
        for col, value in terms:
            rows.append(row)
            cols.append(col)
            values.append(value)
        lower.append(low)
        upper.append(high)

    by_app_role: dict[tuple[int, bool], list[int]] = {}
    by_app_node: dict[tuple[int, int], list[int]] = {}
    by_node: dict[int, list[int]] = {}
    for k, (a, _v, n, role) in enumerate(replicas):
        by_app_role.setdefault((a, role is Role.PRIMARY), []).append(k)
        by_app_node.setdefault((a, n), []).append(k)
        by_node.setdefault(n, []).append(k)
    for a in range(app_count):
        # one primary exactly when served; one backup at most, only when served
        constraint(
            [(k, 1.0) for k in by_app_role.get((a, True), [])] + [(served_base + a, -1.0)], 0, 0
        )
        constraint(
            [(k, 1.0) for k in by_app_role.get((a, False), [])] + [(backup_base + a, -1.0)], 0, 0
        )
        constraint([(backup_base + a, 1.0), (served_base + a, -1.0)], -np.inf, 0)
    for ks in by_app_node.values():
        if len(ks) > 1:
            constraint([(k, 1.0) for k in ks], -np.inf, 1)  # replicas on distinct nodes
    big = (alpha + beta) * (app_count + 1) + 1.0
    for n, node in enumerate(nodes):
        ks = by_node.get(n, [])
        loaded = [k for k in ks if replicas[k][3] is not Role.COLD]
        constraint(
            [
                (k, float(apps[replicas[k][0]].variants[replicas[k][1]].memory_bytes))
                for k in loaded
            ],
            -np.inf,
            keep * node.model_memory_bytes,
        )
        busy = []
        for k in ks:
            a, v, _, role = replicas[k]
            if role is Role.PRIMARY:
                base_ms = apps[a].variants[v].latency_ms(node.device_kind)
                busy.append((k, apps[a].request_rate_per_s * base_ms / 1000.0))
        constraint(busy, -np.inf, keep)
        constraint(
            [
                (artifact_base + name_index[name] * len(nodes) + n, float(size_of[name]))
                for name in names
            ],
            -np.inf,
            keep * node.storage_bytes,
        )
        for k in ks:
            a, v, _, role = replicas[k]
            name = apps[a].variants[v].name
            constraint(
                [(artifact_base + name_index[name] * len(nodes) + n, 1.0), (k, -1.0)], 0, np.inf
            )
        # co-location: every loaded replica within its SLO (a warm one as if promoted)
        inflation = [(k, alpha if replicas[k][3] is Role.PRIMARY else beta) for k in loaded]
        for k in loaded:
            own = alpha if replicas[k][3] is Role.PRIMARY else beta
            terms = [(j, c) for j, c in inflation if j != k] + [(k, own + big - own)]
            constraint(terms, -np.inf, budgets[k] + own + big - own)

    matrix = coo_matrix((values, (rows, cols)), shape=(len(lower), variable_count)).tocsr()
    result = milp(
        c=cost,
        constraints=[LinearConstraint(matrix, np.array(lower), np.array(upper))] if lower else [],
        integrality=np.ones(variable_count),
        bounds=Bounds(np.zeros(variable_count), np.ones(variable_count)),
        options={"time_limit": time_limit_s, "disp": False, "mip_rel_gap": MIP_RELATIVE_GAP},
    )
    if result.x is None:
        raise SolverFailed(f"milp status {result.status}: {result.message}")
    chosen = []
    for k, (a, v, n, role) in enumerate(replicas):
        if result.x[k] > 0.5:
            chosen.append(Replica(apps[a].name, nodes[n].node_id, apps[a].variants[v].name, role))
    plan = Plan(epoch=problem.current.epoch + 1, replicas=tuple(chosen))
    value = objective(problem, plan)
    assert abs(value - (constant - result.fun)) < 1e-4 * max(1.0, abs(value)), (
        value,
        constant - result.fun,
    )
    return SolverResult(plan=plan, objective=value, optimal=result.status == 0)
