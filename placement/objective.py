"""One yardstick for every plan: priority-weighted accuracy served, minus
priority-weighted expected recovery time.

The heuristic planner and the exact solver are both scored with `objective`,
so the optimality gap the benchmark reports compares like with like.

Expected recovery time of an app, should its primary's node fail now:
warm backup 0 (promotion only), cold backup the backup's loading time, no
backup the transfer and loading time of the family's smallest variant from
another peer (remote), and an unserved app `unserved_recovery_ms`. The
weights make one unit of a higher priority's accuracy worth more than any
lower priority's; the recovery weight is small, so serving an app always
beats protecting another one a little better.
"""

from __future__ import annotations

from collections.abc import Sequence

from redge.placement.problem import App, Plan, Problem, Replica, Role


def recovery_ms(problem: Problem, plan: Plan, app: App) -> float:
    return _recovery_ms(problem, app, plan.replicas_of(app.name))


def _recovery_ms(problem: Problem, app: App, replicas: Sequence[Replica]) -> float:
    settings = problem.settings
    if not any(r.role is Role.PRIMARY for r in replicas):
        return settings.unserved_recovery_ms
    best_ms = remote_recovery_ms(problem, app)
    for replica in replicas:
        if replica.role is Role.WARM:
            best_ms = 0.0
        elif replica.role is Role.COLD:
            index = app.variant_index(replica.variant)
            if index is not None:
                best_ms = min(best_ms, settings.load_ms(app.variants[index]))
    return best_ms


def remote_recovery_ms(problem: Problem, app: App) -> float:
    smallest = app.variants[-1]
    return problem.settings.transfer_ms(smallest) + problem.settings.load_ms(smallest)


def _by_app(plan: Plan) -> dict[str, list[Replica]]:
    grouped: dict[str, list[Replica]] = {}
    for replica in plan.replicas:
        grouped.setdefault(replica.app, []).append(replica)
    return grouped


def served_accuracy(problem: Problem, plan: Plan) -> float:
    """Priority-weighted accuracy of the primaries: what clients get now."""
    grouped = _by_app(plan)
    total = 0.0
    for app in problem.apps:
        for replica in grouped.get(app.name, ()):
            if replica.role is Role.PRIMARY:
                index = app.variant_index(replica.variant)
                if index is not None:
                    total += problem.settings.weight(app.priority) * app.variants[index].accuracy
    return total


def objective(problem: Problem, plan: Plan) -> float:
    """Higher is better. Assumes `plan` is feasible (see capacity.violations)."""
    settings = problem.settings
    grouped = _by_app(plan)
    penalty = 0.0
    for app in problem.apps:
        recovery = _recovery_ms(problem, app, grouped.get(app.name, ()))
        penalty += settings.weight(app.priority) * recovery / 1000.0
    return served_accuracy(problem, plan) - settings.recovery_weight_per_s * penalty
