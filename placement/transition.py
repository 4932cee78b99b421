"""The ordered actions that take the cluster from the current plan to a target.

The plan is the committed truth; actions are what each peer's reconciler
does to reach it, in an order that keeps apps served: promotions first
(they need no load and end an outage at once), then demotions and unloads
that free memory, then loads of primaries in priority order (critical
first), then warm backups, then prefetches of cold backups' artifacts, and
last the unloads of variants that a larger one has just replaced on the
same node. Every action is idempotent on the peer side: doing it twice, or
after a leader change, leaves the same state.
"""

from __future__ import annotations

import dataclasses
import enum

from redge.placement.problem import HEALTH_KEEPS_REPLICAS, Plan, Problem, Role


class ActionKind(enum.Enum):
    PROMOTE = "promote"  # warm backup becomes primary, no load
    DEMOTE = "demote"  # primary -> warm, or loaded -> cold (unload, keep the artifact)
    UNLOAD = "unload"  # the replica leaves this node's memory
    LOAD = "load"  # load (fetching first if needed) as primary or warm backup
    PREFETCH = "prefetch"  # put the artifact on disk for a cold backup


@dataclasses.dataclass(frozen=True)
class Action:
    kind: ActionKind
    app: str
    node_id: str
    variant: str
    role: Role | None  # the role after the action; None for an unload


_ORDER = {
    "promote": 0,
    "demote": 1,
    "unload": 2,
    "load_primary": 3,
    "load_warm": 4,
    "prefetch": 5,
    "unload_replaced": 6,
}


def actions_between(problem: Problem, current: Plan, target: Plan) -> tuple[Action, ...]:
    """Diff two plans into ordered actions. Nodes that failed or left get no
    actions: there is nobody there to carry them out."""
    reachable = {n.node_id for n in problem.nodes if n.health in HEALTH_KEEPS_REPLICAS}
    priority = {a.name: int(a.priority) for a in problem.apps}
    before = {(r.app, r.node_id): r for r in current.replicas if r.node_id in reachable}
    after = {(r.app, r.node_id): r for r in target.replicas}
    steps: list[tuple[tuple, Action]] = []

    def add(stage: str, action: Action) -> None:
        key = (_ORDER[stage], -priority.get(action.app, 0), action.app, action.node_id)
        steps.append((key, action))

    # An app whose primary moves keeps serving from the old node until the
    # new one is loaded: that unload goes last.
    moving = {
        r.app
        for r in target.replicas
        if r.role is Role.PRIMARY
        and (
            before.get((r.app, r.node_id)) is None
            or before[(r.app, r.node_id)].role is not Role.WARM
        )
        and before.get((r.app, r.node_id)) != r
    }
    for key in sorted(set(before) | set(after)):
        app, node_id = key
        old = before.get(key)
        new = after.get(key)
        if new is None:
            assert old is not None
            if old.role is Role.PRIMARY and app in moving:
                add("unload_replaced", Action(ActionKind.UNLOAD, app, node_id, old.variant, None))
            elif old.role is not Role.COLD:
                add("unload", Action(ActionKind.UNLOAD, app, node_id, old.variant, None))
            continue
        on_disk = new.variant in problem.artifacts_on(node_id)
        if old is None or old.role is Role.COLD:
            if new.role is Role.COLD:
                if not on_disk and (old is None or old.variant != new.variant):
                    add(
                        "prefetch",
                        Action(ActionKind.PREFETCH, app, node_id, new.variant, Role.COLD),
                    )
            else:
                stage = "load_primary" if new.role is Role.PRIMARY else "load_warm"
                add(stage, Action(ActionKind.LOAD, app, node_id, new.variant, new.role))
            continue
        # old is loaded (primary or warm)
        if old.variant != new.variant:
            if new.role is Role.COLD:
                add("unload", Action(ActionKind.UNLOAD, app, node_id, old.variant, None))
                if not on_disk:
                    add(
                        "prefetch",
                        Action(ActionKind.PREFETCH, app, node_id, new.variant, Role.COLD),
                    )
                continue
            stage = "load_primary" if new.role is Role.PRIMARY else "load_warm"
            add(stage, Action(ActionKind.LOAD, app, node_id, new.variant, new.role))
            add("unload_replaced", Action(ActionKind.UNLOAD, app, node_id, old.variant, None))
            continue
        if old.role is new.role:
            continue
        if old.role is Role.WARM and new.role is Role.PRIMARY:
            add("promote", Action(ActionKind.PROMOTE, app, node_id, new.variant, Role.PRIMARY))
        else:
            add("demote", Action(ActionKind.DEMOTE, app, node_id, new.variant, new.role))
    steps.sort(key=lambda step: step[0])
    return tuple(action for _, action in steps)
