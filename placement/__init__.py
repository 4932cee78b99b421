"""Placement: which variant of each app runs where, in which role.

Pure decision code. The leader converts committed cluster state into a
`Problem`, calls `plan_for`, and commits the returned plan with the next
epoch; reconcilers carry out the ordered actions. The exact MILP solver,
`redge.placement.solver.solve`, is not imported here: it needs scipy, a
development dependency, and only measures the heuristic. `objective` is the
one yardstick both are scored by. See docs/placement.md.
"""

from redge.placement.capacity import predicted_latency_ms, usage, violations
from redge.placement.errors import InvalidProblem, PlacementError, ProblemTooLarge, SolverFailed
from redge.placement.objective import objective, recovery_ms, served_accuracy
from redge.placement.planner import PlanResult, Reason, ReasonKind, plan_for
from redge.placement.problem import (
    App,
    BackupPolicy,
    Health,
    Node,
    Plan,
    Priority,
    Problem,
    Replica,
    Role,
    Settings,
    Variant,
)
from redge.placement.transition import Action, ActionKind, actions_between

__all__ = [
    "Action",
    "ActionKind",
    "App",
    "BackupPolicy",
    "Health",
    "InvalidProblem",
    "Node",
    "PlacementError",
    "Plan",
    "PlanResult",
    "Priority",
    "Problem",
    "ProblemTooLarge",
    "Reason",
    "ReasonKind",
    "Replica",
    "Role",
    "Settings",
    "SolverFailed",
    "Variant",
    "actions_between",
    "objective",
    "plan_for",
    "predicted_latency_ms",
    "recovery_ms",
    "served_accuracy",
    "usage",
    "violations",
]
