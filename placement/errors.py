"""Expected operational errors of placement, one place for all of them.

A planner never raises for a cluster that is merely short of capacity: that
is an answer (apps shed, reasons given), not an error. These are for input
that cannot be planned at all and for the exact solver's limits.
"""


class PlacementError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidProblem(PlacementError):
    """The problem's values contradict themselves (duplicate ids, negative sizes)."""


class ProblemTooLarge(PlacementError):
    """The exact solver was asked for more variables than it is bounded to."""


class SolverFailed(PlacementError):
    """The MILP solver ended without a usable solution (time limit, numerics)."""
