"""The heuristic planner: which variant of each app runs where, and in which role.

The Raft leader runs `plan_for` on committed state and commits the result
with the next epoch. The planner is a pure function of its `Problem`, so a
new leader that replans reaches the same target and finishes the old
leader's work; and it is a fixed point of its own output (planning again on
`problem.advanced(result.plan)` changes nothing), so a cluster at rest is
not reshuffled.

It works incrementally from the current plan, in this order:

1. keep every current replica that is still valid, trimming any node that
   is now over its capacity or SLO (backups go before primaries, low
   priority before high);
2. for each priority class, critical first, fail over and cover: promote a
   lost primary's warm backup (no load), else load its cold backup's
   variant where the artifact is, else place the app at its smallest
   variant that meets the SLO (serving one more app is worth more than a
   larger variant of another), else evict lower-priority replicas from one
   node, else shed it. Rounds repeat while evictions free room;
3. for each class, grow primaries in place to the largest variant that fits
   (running ones only when the restore hold-down allows it, never on a
   suspected or held-down node);
4. warm backups for apps whose policy asks for them, largest variant that
   fits on another node (heterogeneous replication), else a cold one;
5. cold backups, preferring nodes that already hold the artifact, within
   the storage budget.

Because the classes go in order, a higher priority app is never shed to
make room for a lower one (it may run a smaller variant so that a lower one
runs at all). New load only goes to nodes that are alive (primaries also
not in hold-down) and stays under the headroom; the number of loads and
prefetches per plan is bounded, and work past the bound waits for the next
plan (`complete` is False). Growth never moves a replica and storage is
claimed per replica, so that what was refused once stays refused: that is
what makes the plan a fixed point of itself.

Node arrays are numpy vectors so that choosing a node for an app is a few
vector operations: 500 apps on 100 nodes plan in tens of milliseconds.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from redge.placement.capacity import TOLERANCE
from redge.placement.objective import objective
from redge.placement.problem import (
    HEALTH_KEEPS_REPLICAS,
    App,
    Health,
    Plan,
    Priority,
    Problem,
    Replica,
    Role,
)
from redge.placement.transition import Action, actions_between


class ReasonKind(enum.Enum):
    SHED = "shed"  # no primary: no node could take even the smallest variant
    SHRUNK = "shrunk"  # the primary is not the family's largest variant
    EVICTED = "evicted"  # a replica made room for a higher priority app's primary
    DEFERRED = "deferred"  # a per-plan bound postponed this to a later plan
    NO_BACKUP = "no_backup"  # the policy asks for a backup and none fits
    BACKUP_COLD = "backup_cold"  # warm backup wanted, memory short: cold one instead
    DROPPED = "dropped"  # a current replica is no longer valid (node gone, policy)


@dataclasses.dataclass(frozen=True)
class Reason:
    app: str
    kind: ReasonKind
    detail: str


@dataclasses.dataclass(frozen=True)
class PlanResult:
    plan: Plan
    actions: tuple[Action, ...]
    reasons: tuple[Reason, ...]
    complete: bool  # False when a per-plan bound left work for the next plan
    changed: bool  # the assignment differs from the current plan's: commit it


_ROLE_RANK = {Role.COLD: 0, Role.WARM: 1, Role.PRIMARY: 2}
_ROLE_INDEX = {Role.PRIMARY: 0, Role.WARM: 1, Role.COLD: 2}


class _State:
    """The target plan under construction, with per-node totals as vectors."""

    def __init__(self, problem: Problem, packing: bool) -> None:
        settings = problem.settings
        self.packing = packing
        self.problem = problem
        self.settings = settings
        self.nodes = problem.nodes
        self.apps = {a.name: a for a in problem.apps}
        self.index = {n.node_id: i for i, n in enumerate(self.nodes)}
        count = len(self.nodes)
        self.kinds = sorted({n.device_kind for n in self.nodes})
        kind_of = {k: j for j, k in enumerate(self.kinds)}
        self.kind_index = np.array([kind_of[n.device_kind] for n in self.nodes], dtype=np.intp)
        keep = 1.0 - settings.headroom_fraction
        self.memory_capacity = np.array([n.model_memory_bytes for n in self.nodes], dtype=float)
        self.storage_capacity = np.array([n.storage_bytes for n in self.nodes], dtype=float)
        self.memory_limit = self.memory_capacity * keep
        self.storage_limit = self.storage_capacity * keep
        self.utilisation_limit = keep
        self.memory_used = np.zeros(count)
        self.storage_used = np.zeros(count)
        # New load is judged against the storage *claimed*, every replica's
        # artifact counted even when replicas share it: with sharing, a later
        # replica could make an earlier refused one fit, and planning again
        # would then change the plan.
        self.storage_claimed = np.zeros(count)
        # what each node holds per [priority][role][memory, claimed storage,
        # utilisation, replicas], so that eviction can rule out most nodes
        # with a few vector bounds
        self.tally = np.zeros((len(Priority), len(Role), 4, count))
        self.utilisation_used = np.zeros(count)
        self.primaries = np.zeros(count)
        self.warm = np.zeros(count)
        self.threshold = np.full(count, np.inf)
        alive = np.array([n.health is Health.ALIVE for n in self.nodes], dtype=bool)
        hold_down = np.array([n.hold_down for n in self.nodes], dtype=bool)
        self.backup_allowed = alive
        self.primary_allowed = alive & ~hold_down
        self.hosted: list[dict[str, tuple[Role, int]]] = [{} for _ in self.nodes]
        self.primary: dict[str, tuple[int, int]] = {}
        self.backup: dict[str, tuple[int, int, Role]] = {}
        self.artifact_size: dict[str, int] = {}
        for app in problem.apps:
            for variant in app.variants:
                self.artifact_size[variant.name] = max(
                    self.artifact_size.get(variant.name, 0), variant.size_bytes
                )
        self.references: dict[str, np.ndarray] = {}
        # nodes that have an artifact on disk now: loading there needs no
        # transfer. (Not those this plan merely refers to: preferring them
        # would pile every app of a family onto the first node that got one.)
        self.holders: dict[str, set[int]] = {}
        for node_id, names in problem.artifacts.items():
            i = self.index.get(node_id)
            if i is not None:
                for name in names:
                    self.holders.setdefault(name, set()).add(i)
        # Every (app, variant) is one row of three matrices over the nodes:
        # isolated latency, SLO budget (the inflation it tolerates), utilisation.
        self.first_row: dict[str, int] = {}
        latency_rows = []
        slo_rows = []
        rate_rows = []
        for app in problem.apps:
            self.first_row[app.name] = len(latency_rows)
            for variant in app.variants:
                by_device = dict(variant.latency_ms_by_device)
                latency_rows.append([by_device.get(k, np.nan) for k in self.kinds])
                slo_rows.append(app.slo_ms)
                rate_rows.append(app.request_rate_per_s)
        by_kind = np.array(latency_rows, dtype=float).reshape(len(latency_rows), len(self.kinds))
        self.base_ms = by_kind[:, self.kind_index]
        slo = np.array(slo_rows, dtype=float)[:, None]
        rate = np.array(rate_rows, dtype=float)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.budget = np.where(np.isnan(self.base_ms), -np.inf, slo / self.base_ms - 1.0)
            self.busy = np.where(np.isnan(self.base_ms), 0.0, rate * self.base_ms / 1000.0)
        # A variant that just failed to load on a node has no budget there: every step
        # (placing, growing, keeping) then looks elsewhere.
        for node_id, variant_name in problem.unloadable:
            i = self.index.get(node_id)
            for app in problem.apps:
                index = app.variant_index(variant_name)
                if i is not None and index is not None:
                    self.budget[self.first_row[app.name] + index, i] = -np.inf
        runnable = self.budget >= -TOLERANCE
        self.primary_rows = runnable & self.primary_allowed[None, :]
        self.backup_rows = runnable & self.backup_allowed[None, :]
        self.primary_slack = self.budget + settings.inflation_per_primary
        self.warm_slack = self.budget + settings.inflation_per_warm
        self.memory_room = self.memory_limit + TOLERANCE
        self.storage_room = self.storage_limit + TOLERANCE
        self.utilisation_room = np.full(count, self.utilisation_limit + TOLERANCE)
        self.inflation = np.full(count, -TOLERANCE)

    # -- per app and variant, per node: isolated latency, SLO budget, utilisation

    def profile(self, app: App, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = self.first_row[app.name] + index
        return self.base_ms[row], self.budget[row], self.busy[row]

    def _inflation_threshold(self, app: App, index: int, role: Role, i: int) -> float:
        """How much co-location inflation this replica tolerates on node i,
        expressed against the node's (primaries, warm) totals."""
        if role is Role.COLD:
            return np.inf
        budget = float(self.budget[self.first_row[app.name] + index, i])
        bonus = (
            self.settings.inflation_per_primary
            if role is Role.PRIMARY
            else self.settings.inflation_per_warm
        )
        return budget + bonus

    # -- changes

    def add(self, name: str, i: int, index: int, role: Role) -> None:
        app = self.apps[name]
        variant = app.variants[index]
        assert name not in self.hosted[i], (name, i)
        self.hosted[i][name] = (role, index)
        self._count(app, index, role, i, 1.0)
        references = self.references.get(variant.name)
        if references is None:
            references = self.references[variant.name] = np.zeros(len(self.nodes), dtype=np.int64)
        if references[i] == 0:
            self.storage_used[i] += self.artifact_size[variant.name]
        references[i] += 1
        self.storage_claimed[i] += self.artifact_size[variant.name]
        if role is Role.COLD:
            self.backup[name] = (i, index, role)
            self._refresh(i)
            return
        self.memory_used[i] += variant.memory_bytes
        self.threshold[i] = min(self.threshold[i], self._inflation_threshold(app, index, role, i))
        if role is Role.PRIMARY:
            self.primaries[i] += 1
            self.utilisation_used[i] += self.busy[self.first_row[name] + index, i]
            self.primary[name] = (i, index)
        else:
            self.warm[i] += 1
            self.backup[name] = (i, index, role)
        self._refresh(i)

    def _count(self, app: App, index: int, role: Role, i: int, sign: float) -> None:
        variant = app.variants[index]
        tally = self.tally
        priority = int(app.priority)
        slot = _ROLE_INDEX[role]
        tally[priority, slot, 1, i] += sign * self.artifact_size[variant.name]
        tally[priority, slot, 3, i] += sign
        if role is not Role.COLD:
            tally[priority, slot, 0, i] += sign * variant.memory_bytes
        if role is Role.PRIMARY:
            tally[priority, slot, 2, i] += sign * self.busy[self.first_row[app.name] + index, i]

    def remove(self, name: str, i: int) -> tuple[Role, int]:
        app = self.apps[name]
        role, index = self.hosted[i].pop(name)
        self._count(app, index, role, i, -1.0)
        variant = app.variants[index]
        references = self.references[variant.name]
        references[i] -= 1
        if references[i] == 0:
            self.storage_used[i] -= self.artifact_size[variant.name]
        self.storage_claimed[i] -= self.artifact_size[variant.name]
        if role is Role.PRIMARY:
            del self.primary[name]
        else:
            del self.backup[name]
        if role is Role.COLD:
            self._refresh(i)
            return role, index
        self.memory_used[i] -= variant.memory_bytes
        if role is Role.PRIMARY:
            self.primaries[i] -= 1
            self.utilisation_used[i] -= self.busy[self.first_row[name] + index, i]
        else:
            self.warm[i] -= 1
        self.threshold[i] = min(
            (
                self._inflation_threshold(self.apps[n], x, r, i)
                for n, (r, x) in self.hosted[i].items()
            ),
            default=np.inf,
        )
        self._refresh(i)
        return role, index

    # -- checks

    def fits_at(
        self,
        name: str,
        index: int,
        role: Role,
        i: int,
        removing: tuple[str, ...] = (),
    ) -> bool:
        """Whether node i can take this replica once `removing` (apps hosted
        on i) are gone. New load must stay under the headroom."""
        app = self.apps[name]
        row = self.first_row[name] + index
        budget = self.budget[row, i]
        if budget < -TOLERANCE:
            return False
        variant = app.variants[index]
        memory = self.memory_used[i]
        utilisation = self.utilisation_used[i]
        primaries = self.primaries[i]
        warm = self.warm[i]
        dropped: dict[str, int] = {}
        for other in removing:
            other_role, other_index = self.hosted[i][other]
            other_app = self.apps[other]
            other_variant = other_app.variants[other_index]
            dropped[other_variant.name] = dropped.get(other_variant.name, 0) + 1
            if other_role is Role.PRIMARY:
                memory -= other_variant.memory_bytes
                primaries -= 1
                utilisation -= self.busy[self.first_row[other] + other_index, i]
            elif other_role is Role.WARM:
                memory -= other_variant.memory_bytes
                warm -= 1
        # A limit binds only where this change grows a total: promoting a warm
        # backup or loading a cold one in place takes no new disk.
        storage = self.storage_claimed[i] + self.artifact_size[variant.name]
        for dropped_name, count in dropped.items():
            storage -= count * self.artifact_size[dropped_name]
        if (
            storage > self.storage_claimed[i] + TOLERANCE
            and storage > self.storage_limit[i] + TOLERANCE
        ):
            return False
        if role is Role.COLD:
            return True
        memory += variant.memory_bytes
        if memory > self.memory_used[i] + TOLERANCE and memory > self.memory_limit[i] + TOLERANCE:
            return False
        alpha = self.settings.inflation_per_primary
        beta = self.settings.inflation_per_warm
        if role is Role.PRIMARY:
            utilisation += self.busy[row, i]
            if (
                utilisation > self.utilisation_used[i] + TOLERANCE
                and utilisation > self.utilisation_limit + TOLERANCE
            ):
                return False
            primaries += 1
            own = budget + alpha
        else:
            warm += 1
            own = budget + beta
        if removing and any(
            self._inflation_threshold(self.apps[n], self.hosted[i][n][1], self.hosted[i][n][0], i)
            <= self.threshold[i] + TOLERANCE
            for n in removing
        ):
            threshold = min(
                (
                    self._inflation_threshold(self.apps[n], x, r, i)
                    for n, (r, x) in self.hosted[i].items()
                    if n not in removing
                ),
                default=np.inf,
            )
        else:
            threshold = self.threshold[i]
        return alpha * primaries + beta * warm <= min(threshold, own) + TOLERANCE

    def candidates(self, name: str, index: int, role: Role, exclude: tuple[int, ...]) -> np.ndarray:
        """Mask of nodes that could take this replica as new load."""
        variant = self.apps[name].variants[index]
        row = self.first_row[name] + index
        if role is Role.PRIMARY:
            mask = self.primary_rows[row] & (self.memory_room >= variant.memory_bytes)
            mask &= self.utilisation_room >= self.busy[row]
            mask &= self.inflation + self.settings.inflation_per_primary <= np.minimum(
                self.threshold, self.primary_slack[row]
            )
        elif role is Role.WARM:
            mask = self.backup_rows[row] & (self.memory_room >= variant.memory_bytes)
            mask &= self.inflation + self.settings.inflation_per_warm <= np.minimum(
                self.threshold, self.warm_slack[row]
            )
        else:
            mask = self.backup_rows[row].copy()
        mask &= self.storage_room >= self.artifact_size[variant.name]
        for i in exclude:
            mask[i] = False
        return mask

    def _refresh(self, i: int) -> None:
        """Recompute node i's room vectors after a change (TOLERANCE folded in)."""
        self.memory_room[i] = self.memory_limit[i] - self.memory_used[i] + TOLERANCE
        self.storage_room[i] = self.storage_limit[i] - self.storage_claimed[i] + TOLERANCE
        self.utilisation_room[i] = self.utilisation_limit - self.utilisation_used[i] + TOLERANCE
        self.inflation[i] = (
            self.settings.inflation_per_primary * self.primaries[i]
            + self.settings.inflation_per_warm * self.warm[i]
            - TOLERANCE
        )

    def choose(self, name: str, index: int, role: Role, mask: np.ndarray) -> int:
        """Among feasible nodes, one that already has the artifact on disk,
        then the one with most room left (spreading keeps co-location low),
        or with least room when packing."""
        if role is Role.COLD:
            room = self.storage_room
        else:
            room = self.memory_room
        holders = self.holders.get(self.apps[name].variants[index].name)
        local = [i for i in holders if mask[i]] if holders else None
        if local:
            if self.packing:
                return min(local, key=lambda i: (room[i], i))
            return max(local, key=lambda i: (room[i], -i))
        if self.packing:
            return int(np.argmin(np.where(mask, room, np.inf)))
        return int(np.argmax(np.where(mask, room, -np.inf)))

    def nodes_of(self, name: str) -> tuple[int, ...]:
        found = []
        if name in self.primary:
            found.append(self.primary[name][0])
        if name in self.backup:
            found.append(self.backup[name][0])
        return tuple(found)

    def plan(self, epoch: int) -> Plan:
        replicas = []
        for i, hosted in enumerate(self.hosted):
            node_id = self.nodes[i].node_id
            for name, (role, index) in hosted.items():
                replicas.append(Replica(name, node_id, self.apps[name].variants[index].name, role))
        return Plan(epoch=epoch, replicas=tuple(replicas))


class _Planner:
    def __init__(self, problem: Problem, packing: bool) -> None:
        self.problem = problem
        self.settings = problem.settings
        self.state = _State(problem, packing)
        self.reasons: list[Reason] = []
        self.complete = True
        maximum = self.settings.loads_per_plan_max
        self.loads_left = float("inf") if maximum is None else maximum
        maximum = self.settings.prefetches_per_plan_max
        self.prefetches_left = float("inf") if maximum is None else maximum
        self.placed_new: set[str] = set()
        self.evictions = 0
        self.primaries_deferred = False

    def reason(self, app: str, kind: ReasonKind, detail: str) -> None:
        self.reasons.append(Reason(app, kind, detail))

    def defer(self, app: str, detail: str) -> None:
        self.complete = False
        self.reason(app, ReasonKind.DEFERRED, detail)

    def run(self) -> PlanResult:
        self.keep()
        classes = [
            (priority, [a for a in self.problem.apps if a.priority is priority])
            for priority in sorted(Priority, reverse=True)
        ]
        # An eviction for a lower class can free room that a higher class's
        # app was refused earlier; so repeat until a round evicts nothing.
        # Each eviction serves one more app at the expense of lower classes
        # only, so the rounds end (bounded besides by the number of apps).
        # A primary that moves to grow frees room too: cover and grow again
        # until nothing moves. Each move raises a variant, so this ends.
        for _ in range(sum(len(a.variants) for a in self.problem.apps) + 1):
            for _ in range(len(self.problem.apps) + 1):
                evictions = self.evictions
                for _, apps in classes:
                    self.cover(apps)
                if self.evictions == evictions:
                    break
            moved = False
            for priority, apps in classes:
                moved = self.grow(apps, priority) or moved
            if not moved:
                break
        deferred = {r.app for r in self.reasons if r.kind is ReasonKind.DEFERRED}
        for app in self.problem.apps:
            if app.name not in self.state.primary and app.name not in deferred:
                self.reason(app.name, ReasonKind.SHED, "no node can take even its smallest variant")
        ordered = sorted(self.problem.apps, key=lambda a: (-int(a.priority), a.name))
        self.add_warm_backups(ordered)
        self.add_cold_backups(ordered)
        for app in ordered:
            if app.name in self.state.primary:
                index = self.state.primary[app.name][1]
                if index > 0:
                    self.reason(app.name, ReasonKind.SHRUNK, f"serves {app.variants[index].name}")
        current = self.problem.current
        draft = self.state.plan(current.epoch)
        changed = draft.assignment() != current.assignment()
        target = dataclasses.replace(draft, epoch=current.epoch + 1) if changed else draft
        actions = actions_between(self.problem, current, target)
        reasons = tuple(dict.fromkeys(self.reasons))  # repeated passes repeat reasons
        return PlanResult(target, actions, reasons, self.complete, changed)

    # -- 1. keep what is still valid

    def keep(self) -> None:
        state = self.state
        problem = self.problem
        current = sorted(
            problem.current.replicas,
            key=lambda r: (_ROLE_RANK[r.role] != 2, r.app, r.node_id),
        )
        for replica in current:
            app = state.apps.get(replica.app)
            i = state.index.get(replica.node_id)
            if app is None:
                continue  # the app was removed: its replicas simply go
            if i is None or self.problem.nodes[i].health not in HEALTH_KEEPS_REPLICAS:
                self.reason(
                    app.name,
                    ReasonKind.DROPPED,
                    f"{replica.role.value} lost with {replica.node_id}",
                )
                continue
            index = app.variant_index(replica.variant)
            if (replica.node_id, replica.variant) in problem.unloadable:
                self.reason(
                    app.name,
                    ReasonKind.DROPPED,
                    f"{replica.variant} failed to load on {replica.node_id}",
                )
                continue
            if index is None or state.profile(app, index)[1][i] < -TOLERANCE:
                self.reason(
                    app.name,
                    ReasonKind.DROPPED,
                    f"{replica.variant} cannot meet the SLO on {replica.node_id}",
                )
                continue
            if app.name in state.hosted[i]:
                continue
            role = replica.role
            if role is Role.PRIMARY and app.name in state.primary:
                continue
            if role is not Role.PRIMARY:
                wanted = app.backup_role()
                if app.name in state.backup or wanted is None:
                    continue
                if role is Role.WARM and wanted is Role.COLD:
                    role = Role.COLD
            state.add(app.name, i, index, role)
        for i in range(len(problem.nodes)):
            self.trim(i)

    def trim(self, i: int) -> None:
        """Drop replicas from node i until it is within its capacity and every
        replica there within its SLO: backups first, low priority first."""
        state = self.state
        alpha = self.settings.inflation_per_primary
        beta = self.settings.inflation_per_warm
        for _ in range(len(state.hosted[i]) + 1):
            loaded_over = (
                state.memory_used[i] > state.memory_capacity[i] + TOLERANCE
                or state.utilisation_used[i] > 1.0 + TOLERANCE
                or alpha * state.primaries[i] + beta * state.warm[i]
                > state.threshold[i] + TOLERANCE
            )
            storage_over = state.storage_used[i] > state.storage_capacity[i] + TOLERANCE
            if not loaded_over and not storage_over:
                return
            victims = sorted(
                (_ROLE_RANK[role], int(state.apps[name].priority), name)
                for name, (role, _) in state.hosted[i].items()
                if storage_over or role is not Role.COLD
            )
            name = victims[0][2]
            role, _ = state.remove(name, i)
            self.reason(
                name,
                ReasonKind.DROPPED,
                f"{role.value} no longer fits on {self.problem.nodes[i].node_id}",
            )

    # -- 2a. fail over

    def fail_over(self, apps: list[App]) -> None:
        state = self.state
        for app in apps:
            backup = state.backup.get(app.name)
            if app.name in state.primary or backup is None or backup[2] is not Role.WARM:
                continue
            i, index, _ = backup
            if state.primary_allowed[i] and state.fits_at(
                app.name, index, Role.PRIMARY, i, removing=(app.name,)
            ):
                state.remove(app.name, i)
                state.add(app.name, i, index, Role.PRIMARY)
        for app in apps:
            backup = state.backup.get(app.name)
            if app.name in state.primary or backup is None or backup[2] is not Role.COLD:
                continue
            i, index, _ = backup
            if not state.primary_allowed[i]:
                continue
            if not state.fits_at(app.name, index, Role.PRIMARY, i, removing=(app.name,)):
                continue
            if self.loads_left <= 0:
                self.defer(app.name, "load bound reached before loading the cold backup")
                self.primaries_deferred = True
                continue
            self.loads_left -= 1
            state.remove(app.name, i)
            state.add(app.name, i, index, Role.PRIMARY)

    # -- 2b. cover

    def cover(self, apps: list[App]) -> None:
        """Fail over and place this class's apps. An eviction frees room that
        an app tried earlier in the pass may now use, so passes repeat until
        one evicts nothing (at most one more pass than there are apps)."""
        state = self.state
        for _ in range(len(apps) + 1):
            self.fail_over(apps)
            evictions = self.evictions
            unplaced = [a for a in apps if a.name not in state.primary]
            unplaced.sort(key=lambda a: (min(v.memory_bytes for v in a.variants), a.name))
            for app in unplaced:
                if self.loads_left <= 0:
                    self.defer(app.name, "load bound reached before placing a primary")
                    self.primaries_deferred = True
                    continue
                if self.place_primary(app) or self.evict_for(app):
                    self.loads_left -= 1
                    self.placed_new.add(app.name)
            if self.evictions == evictions:
                break

    def place_primary(self, app: App) -> bool:
        state = self.state
        exclude = state.nodes_of(app.name)
        for index in reversed(range(len(app.variants))):
            mask = state.candidates(app.name, index, Role.PRIMARY, exclude)
            if not mask.any():
                continue
            # Prefer a node where a larger variant would fit too, so that
            # growing in place later has room (growth never moves a replica:
            # moving would free room that an app shed earlier could have used,
            # and planning again would then change the plan).
            # (When spreading without a node that holds the artifact, the node
            # with most room is chosen anyway, and it is roomy if any is.)
            holders = state.holders.get(app.variants[index].name)
            for larger in range(index if holders and not state.packing else 0):
                roomy = mask & (state.memory_room >= app.variants[larger].memory_bytes)
                if roomy.any():
                    mask = roomy
                    break
            state.add(
                app.name, state.choose(app.name, index, Role.PRIMARY, mask), index, Role.PRIMARY
            )
            return True
        return False

    def evict_for(self, app: App) -> bool:
        """Make room for `app`'s primary by evicting what is worth less:
        cold, then warm backups of its priority or lower, then primaries of
        lower priority. Nodes are tried in order of what evicting enough
        memory would cost, and the first where the app then fits wins."""
        state = self.state
        weight = self.settings.weight
        exclude = set(state.nodes_of(app.name))
        priority = int(app.priority)
        tally = state.tally
        # what evicting everything evictable would free, per node
        freed = (
            tally[:priority, _ROLE_INDEX[Role.PRIMARY]].sum(axis=0)
            + tally[: priority + 1, _ROLE_INDEX[Role.WARM]].sum(axis=0)
            + tally[: priority + 1, _ROLE_INDEX[Role.COLD]].sum(axis=0)
        )
        primaries_left = state.primaries - tally[:priority, _ROLE_INDEX[Role.PRIMARY], 3].sum(
            axis=0
        )
        warm_left = state.warm - tally[: priority + 1, _ROLE_INDEX[Role.WARM], 3].sum(axis=0)
        inflation_left = (
            self.settings.inflation_per_primary * primaries_left
            + self.settings.inflation_per_warm * warm_left
        )
        for index in reversed(range(len(app.variants))):
            variant = app.variants[index]
            memory = variant.memory_bytes
            row = state.first_row[app.name] + index
            possible = state.primary_rows[row] & (
                state.memory_used - freed[0] + memory <= state.memory_limit + TOLERANCE
            )
            possible &= (
                state.storage_claimed - freed[1] + state.artifact_size[variant.name]
                <= state.storage_limit + TOLERANCE
            )
            possible &= (
                state.utilisation_used - freed[2] + state.busy[row]
                <= state.utilisation_limit + TOLERANCE
            )
            possible &= inflation_left <= state.budget[row] + TOLERANCE
            options = []
            for i in np.flatnonzero(possible).tolist():
                if i in exclude:
                    continue
                evictable = sorted(
                    (
                        _ROLE_RANK[role],
                        int(state.apps[name].priority),
                        -state.apps[name].variants[x].memory_bytes,
                        name,
                    )
                    for name, (role, x) in state.hosted[i].items()
                    if (role is Role.PRIMARY and state.apps[name].priority < app.priority)
                    or (role is not Role.PRIMARY and state.apps[name].priority <= app.priority)
                )
                if not evictable:
                    continue
                need = state.memory_used[i] + memory - state.memory_limit[i]
                prefix = []
                cost = 0.0
                for rank, _, negative_memory, name in evictable:
                    if need <= TOLERANCE:
                        break
                    prefix.append(name)
                    other = state.apps[name]
                    if rank == _ROLE_RANK[Role.PRIMARY]:
                        cost += (
                            1000.0
                            * weight(other.priority)
                            * other.variants[state.hosted[i][name][1]].accuracy
                        )
                    else:
                        cost += weight(other.priority) * (
                            1.0 if rank == _ROLE_RANK[Role.WARM] else 0.1
                        )
                    if rank != _ROLE_RANK[Role.COLD]:
                        need += negative_memory
                if need > TOLERANCE:
                    continue  # even evicting all would not make room
                options.append((cost, i, prefix, [e[3] for e in evictable]))
            options.sort(key=lambda option: (option[0], option[1]))
            for _, i, _, names in options:
                chosen = list(names)
                if state.fits_at(app.name, index, Role.PRIMARY, i, removing=tuple(chosen)):
                    for name in reversed(list(chosen)):  # keep whatever need not go
                        trial = tuple(n for n in chosen if n != name)
                        if state.fits_at(app.name, index, Role.PRIMARY, i, removing=trial):
                            chosen = list(trial)
                    for name in chosen:
                        role, _ = state.remove(name, i)
                        node_id = self.problem.nodes[i].node_id
                        self.reason(
                            name,
                            ReasonKind.EVICTED,
                            f"{role.value} on {node_id} made room for {app.name}",
                        )
                    state.add(app.name, i, index, Role.PRIMARY)
                    self.evictions += 1
                    return True
        return False

    # -- 2c. grow

    def grow(self, apps: list[App], priority: Priority) -> bool:
        """Give this class's primaries the largest variant that fits: in
        place if possible, else on another node. Returns whether a primary
        moved, which frees room that others were refused."""
        state = self.state
        moved = False
        if self.primaries_deferred:
            return False  # smaller variants first: nothing grows while apps wait to be served
        waiting = sum(
            1 for a in self.problem.apps if a.priority <= priority and a.name not in state.primary
        )
        for app in apps:
            if app.name not in state.primary:
                continue
            i, index = state.primary[app.name]
            if index == 0 or not state.primary_allowed[i]:
                continue  # a larger variant is new load: not on a sick or held-down node
            new = app.name in self.placed_new
            if not new and not self.problem.restore_allowed:
                continue
            # The largest variant that fits anywhere, in place when that is
            # as good: what a later plan would find, so it changes nothing.
            here = self.larger_in_place(app, i, index)
            found = self.larger_elsewhere(app, index if here is None else here)
            if found is not None:
                where, larger = found
            elif here is not None:
                where, larger = i, here
            else:
                continue
            if not new:
                if self.loads_left <= waiting:
                    self.defer(app.name, "load bound reached before restoring a larger variant")
                    continue
                self.loads_left -= 1
            state.remove(app.name, i)
            state.add(app.name, where, larger, Role.PRIMARY)
            moved = moved or where != i
        return moved

    def larger_in_place(self, app: App, i: int, index: int) -> int | None:
        state = self.state
        for larger in range(index):
            growth_bytes = app.variants[larger].memory_bytes - app.variants[index].memory_bytes
            if growth_bytes > 0 and state.memory_room[i] < growth_bytes:
                continue  # the common refusal, without the full check
            if state.fits_at(app.name, larger, Role.PRIMARY, i, removing=(app.name,)):
                return larger
        return None

    def larger_elsewhere(self, app: App, index: int) -> tuple[int, int] | None:
        state = self.state
        if index == 0:
            return None
        exclude = state.nodes_of(app.name)
        room_max = float(np.max(state.memory_room, where=state.primary_allowed, initial=-np.inf))
        for larger in range(index):
            if app.variants[larger].memory_bytes > room_max:
                continue  # no node has the memory: skip the full test
            mask = state.candidates(app.name, larger, Role.PRIMARY, exclude)
            if mask.any():
                return state.choose(app.name, larger, Role.PRIMARY, mask), larger
        return None

    # -- 3. warm backups, 4. cold backups

    def add_warm_backups(self, apps: list[App]) -> None:
        state = self.state
        for app in apps:
            if app.backup_role() is not Role.WARM or app.name not in state.primary:
                continue
            existing = state.backup.get(app.name)
            if existing is not None and existing[2] is Role.WARM:
                continue
            if self.loads_left <= 0:
                self.defer(app.name, "load bound reached before loading a warm backup")
                continue
            if existing is not None:
                # A cold backup may turn warm where it is, as the same variant;
                # moving or shrinking it would free storage that an app was
                # refused earlier, and planning again would change the plan.
                node, index, _ = existing
                if state.backup_allowed[node] and state.fits_at(
                    app.name, index, Role.WARM, node, removing=(app.name,)
                ):
                    state.remove(app.name, node)
                    state.add(app.name, node, index, Role.WARM)
                    self.loads_left -= 1
                else:
                    self.reason(
                        app.name, ReasonKind.BACKUP_COLD, "no memory to load the cold backup warm"
                    )
                continue
            primary_node, primary_index = state.primary[app.name]
            placed = False
            for index in range(primary_index, len(app.variants)):
                mask = state.candidates(app.name, index, Role.WARM, (primary_node,))
                if mask.any():
                    state.add(
                        app.name, state.choose(app.name, index, Role.WARM, mask), index, Role.WARM
                    )
                    self.loads_left -= 1
                    placed = True
                    break
            if not placed:
                self.reason(
                    app.name, ReasonKind.BACKUP_COLD, "no node has memory for a warm backup"
                )

    def add_cold_backups(self, apps: list[App]) -> None:
        state = self.state
        for app in apps:
            if (
                app.backup_role() is None
                or app.name not in state.primary
                or app.name in state.backup
            ):
                continue
            primary_node, primary_index = state.primary[app.name]
            placed = False
            for index in range(primary_index, len(app.variants)):
                mask = state.candidates(app.name, index, Role.COLD, (primary_node,))
                if not mask.any():
                    continue
                i = state.choose(app.name, index, Role.COLD, mask)
                name = app.variants[index].name
                if name not in self.problem.artifacts_on(self.problem.nodes[i].node_id):
                    if self.prefetches_left <= 0:
                        self.defer(app.name, "prefetch bound reached before a cold backup")
                        placed = True
                        break
                    self.prefetches_left -= 1
                state.add(app.name, i, index, Role.COLD)
                placed = True
                break
            if not placed:
                self.reason(app.name, ReasonKind.NO_BACKUP, "no node has storage for a cold backup")


def plan_for(problem: Problem) -> PlanResult:
    """The target plan for `problem`, the ordered actions from its current
    plan, and the reasons for whatever it could not give. Deterministic; the
    epoch is raised only when the assignment changes."""
    spread = _Planner(problem, packing=False).run()
    if len(problem.apps) * len(problem.nodes) > PORTFOLIO_SIZE_MAX:
        return spread
    if not any(r.kind in _SHORTAGE for r in spread.reasons):
        return spread
    packed = _Planner(problem, packing=True).run()
    if objective(problem, packed.plan) > objective(problem, spread.plan) + TOLERANCE:
        return packed
    return spread


PORTFOLIO_SIZE_MAX = 10_000
"""Up to this many (app, node) pairs a shortage is planned twice, spreading
and packing, and the better plan by `objective` wins: packing serves more
apps when memory is fragmented, spreading keeps co-location low."""

_SHORTAGE = frozenset({ReasonKind.SHED, ReasonKind.NO_BACKUP, ReasonKind.BACKUP_COLD})
