"""The leader's duty: plan from committed state and commit the plan with the next epoch.

Every peer runs this, and it acts only while its peer is the Raft leader. It wakes on the
committed changes that can change the right placement (a failure confirmed, a node joined,
recovered, left or became degraded, an app registered or removed, a load that failed, a
store that changed) and on winning an election, so a new leader finishes whatever an old
one left half done. Planning is the pure `placement.plan_for` on a `Problem` built from the
committed state; the plan is proposed with `epoch = current + 1`, which the state machine
refuses if anything else committed a plan first, and then the leader simply plans again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from functools import partial
from typing import TYPE_CHECKING

import structlog

from redge.agent import upgrade
from redge.agent.clock import Clock, MonotonicClock, wall_ms
from redge.agent.duty import Duty
from redge.agent.sightings import Sightings
from redge.consensus import commands as c
from redge.consensus.errors import ConsensusError
from redge.consensus.state import ALIVE, FAILED, LEFT, SUSPECTED, ClusterState
from redge.placement.planner import PlanResult, ReasonKind, plan_for
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
    Variant,
)
from redge.runtime.manifest import FORMAT_PREFERENCE

if TYPE_CHECKING:
    from redge.agent.ports import ClusterPort

log = structlog.get_logger("redge.leader")

# Commands after which the right placement may differ.
TRIGGERS = (c.Join, c.Leave, c.Suspect, c.Unsuspect, c.RegisterApp, c.RemoveApp, c.StoreReport, c.Report)
PLAN_ATTEMPTS_MAX = 5
REPLAN_S = 5.0
DEPARTED_VOTER_GRACE_MS = 30_000
# While members may read a newer command format than the cluster's, ask them this often.
FORMAT_CHECK_S = 2.0
# After a confirmed failure, keep running primaries at their variants this long instead of
# growing them back: a cluster that was just hurt is not reshuffled.
RESTORE_HOLD_DOWN_MS = 10_000
# After a load of a variant fails on a node, place it elsewhere for this long; then that
# node may be tried again (its own store fetched a good copy meanwhile, or excludes it).
LOAD_FAILURE_AVOID_MS = 60_000
# Up to this many (app, node) pairs the planner runs on the event loop; larger problems go
# to a thread so that heartbeats keep their rhythm.
INLINE_PLANNING_SIZE_MAX = 200
# Rough CPU latency when no profile was measured: 1 ms per million parameters.
ESTIMATED_MS_PER_MILLION_PARAMETERS = 1.0


def build_problem(state: ClusterState, sightings: Sightings) -> Problem:
    """The placement problem that the committed state poses, with the hold-downs and the
    restore pause timed by this peer's `sightings` (agent/sightings.py). Reads no clock of
    its own."""
    nodes = []
    for member in state.members.values():
        if member.status == LEFT:
            continue
        if member.status == FAILED:
            health = Health.FAILED
        elif member.degraded or member.slow:
            health = Health.DEGRADED
        elif member.status == SUSPECTED:
            health = Health.SUSPECTED
        else:
            health = Health.ALIVE
        nodes.append(
            Node(
                node_id=member.node_id,
                device_kind=member.device_kind,
                memory_bytes=member.memory_bytes,
                accelerator_memory_bytes=member.accelerator_memory_bytes,
                storage_bytes=member.storage_bytes,
                health=health,
                hold_down=sightings.hold_down_left_ms(state, member) > 0,
            )
        )
    device_kinds_present = sorted({n.device_kind for n in nodes}) or ["cpu"]
    apps = []
    for app in state.apps.values():
        variants = tuple(
            v for v in (variant_of(state, name, device_kinds_present) for name in app.variants) if v is not None
        )
        if not variants:
            continue  # nothing known about its artifacts yet: it cannot be placed
        apps.append(
            App(
                name=app.name,
                priority=Priority.parse(app.priority),
                slo_ms=app.slo_ms,
                variants=variants,
                request_rate_per_s=app.request_rate_per_s,
                backup=BackupPolicy(app.backup),
            )
        )
    known_apps = {a.name: a for a in apps}
    replicas = []
    for app_name, placed in state.plan.items():
        app = known_apps.get(app_name)
        if app is None:
            continue
        for replica in placed:
            if app.variant_index(replica.variant) is None:
                continue
            replicas.append(Replica(app_name, replica.node_id, replica.variant, Role(replica.role)))
    artifacts: dict[str, frozenset[str]] = {}
    live = {n.node_id for n in nodes}
    for node_id, held in state.stores.items():
        if node_id in live:
            artifacts[node_id] = frozenset(name for name, _ in held)
    since_failure_ms = sightings.since_last_failure_ms(state)
    return Problem(
        nodes=tuple(nodes),
        apps=tuple(apps),
        current=Plan(epoch=state.epoch, replicas=tuple(replicas)),
        artifacts=artifacts,
        restore_allowed=since_failure_ms is None or since_failure_ms > RESTORE_HOLD_DOWN_MS,
        unloadable=frozenset(sightings.unloadable(LOAD_FAILURE_AVOID_MS)),
    )


def variant_of(state: ClusterState, name: str, device_kinds: list[str]) -> Variant | None:
    """A placement Variant from the catalog's artifacts of `name` (None if none is known)."""
    summaries = [s for (artifact, _), s in state.catalog.items() if artifact == name]
    if not summaries:
        return None
    latency_by_device: dict[str, float] = {}
    memory_bytes = 0
    load_ms = None
    for device_kind in device_kinds:
        order = FORMAT_PREFERENCE.get((device_kind, "serving")) or FORMAT_PREFERENCE[("cpu", "serving")]
        usable = sorted((s for s in summaries if s.format in order), key=lambda s: order.index(s.format))
        if not usable:
            continue
        best = usable[0]
        profile = next((p for p in best.profiles if p.device_kind == device_kind), None)
        if profile is not None:
            latency_by_device[device_kind] = profile.latency_ms
            memory_bytes = max(memory_bytes, profile.memory_bytes)
            load_ms = profile.load_ms if load_ms is None else max(load_ms, profile.load_ms)
        elif device_kind == "cpu":
            latency_by_device[device_kind] = max(
                0.1, best.parameter_count / 1e6 * ESTIMATED_MS_PER_MILLION_PARAMETERS
            )
    if not latency_by_device:
        return None
    largest = max(summaries, key=lambda s: s.size_bytes)
    accuracy = next((s.accuracy for s in summaries if s.accuracy is not None), None)
    return Variant(
        name=name,
        memory_bytes=memory_bytes or int(largest.size_bytes * 1.5),
        latency_ms_by_device=tuple(sorted(latency_by_device.items())),
        accuracy=(accuracy or 0.0) / (100.0 if accuracy and accuracy > 1.0 else 1.0),
        size_bytes=largest.size_bytes,
        load_ms=load_ms,
    )


def shed_apps(result: PlanResult) -> set[str]:
    return {r.app for r in result.reasons if r.kind is ReasonKind.SHED}


def plan_with_fallback(problem: Problem) -> PlanResult:
    """Plan; if that sheds an app while nodes sit idle only because they are held down after
    a recovery, judged slow or just failed a load, plan again without those, and keep
    whichever sheds less. They steer load away from a node; they must not leave an app
    unserved that such a node could serve (a failed load is retried there, bounded by the
    node's own retry limit). Pure and deterministic."""
    result = plan_for(problem)
    shed = shed_apps(result)
    if not shed or not (problem.unloadable or any(n.hold_down or n.health is Health.DEGRADED for n in problem.nodes)):
        return result
    relaxed = dataclasses.replace(
        problem,
        unloadable=frozenset(),
        nodes=tuple(
            dataclasses.replace(n, hold_down=False, health=Health.ALIVE if n.health is Health.DEGRADED else n.health)
            for n in problem.nodes
        ),
    )
    alternative = plan_for(relaxed)
    return alternative if len(shed_apps(alternative)) < len(shed) else result


def placements_of(result: PlanResult) -> tuple[c.AppPlacement, ...]:
    by_app: dict[str, list[c.Replica]] = {}
    for replica in result.plan.replicas:
        by_app.setdefault(replica.app, []).append(c.Replica(replica.node_id, replica.variant, replica.role.value))
    return tuple(c.AppPlacement(app, tuple(replicas)) for app, replicas in sorted(by_app.items()))


def describe(result: PlanResult) -> str:
    kinds: dict[str, int] = {}
    for action in result.actions:
        kinds[action.kind.value] = kinds.get(action.kind.value, 0) + 1
    actions = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "no actions"
    reasons = "; ".join(f"{r.app} {r.kind.value}: {r.detail}" for r in result.reasons[:5])
    return actions + (f" ({reasons})" if reasons else "") + ("" if result.complete else " [more to follow]")


def _problem_and_epoch(state: ClusterState, sightings: Sightings) -> tuple[Problem, int]:
    sightings.observe(state)
    return build_problem(state, sightings), state.epoch


class LeaderDuty(Duty):
    def __init__(self, cluster: ClusterPort, *, clock: Clock | None = None, watch_rotation_s: float = 0.0) -> None:
        super().__init__("leader_duty")
        # The ports it works through (agent/ports.py): the committed state, proposals,
        # whether this peer leads, the Raft voters. Nothing else of the peer.
        self.cluster = cluster
        self.watch_rotation_s = watch_rotation_s
        self.plans_committed = 0
        # Every peer keeps these, leader or not, so that a new leader times hold-downs from
        # when it saw the change, not from when it was elected.
        self.sightings = Sightings(clock or MonotonicClock())
        self._format_checked_ms = -FORMAT_CHECK_S * 1000
        self._format_task: asyncio.Task[None] | None = None
        # (watch round, when this peer first saw it on its monotonic clock)
        self._round_seen: tuple[int, float] = (0, self.sightings.clock.now_ms())
        # The commit that woke this duty: (wall ms when applied here, its at_ms if this peer
        # proposed it, its kind), so that the plan's log line says where a decision's time went.
        self._trigger: tuple[float, float | None, str] | None = None

    def on_commit(self, command: c.Command | None, outcome) -> None:
        if isinstance(command, (type(None), c.Join, c.Leave, c.Suspect, c.Unsuspect)):
            self.cluster.read(self.sightings.observe)
        if outcome.accepted:
            self._note_loads(command)
        if command is None and outcome.accepted:  # a snapshot replaced the state
            self._wake.set()
        elif outcome.accepted and not outcome.duplicate and isinstance(command, TRIGGERS):
            if isinstance(command, c.Report) and command.kind not in ("load_failed", "degraded", "recovered"):
                return
            if self._trigger is None:
                # The proposer's at_ms is on this peer's clock only when this peer proposed it.
                own = c.proposer_of(command) == self.cluster.node_id
                self._trigger = (wall_ms(), getattr(command, "at_ms", None) if own else None, type(command).__name__)
            self._wake.set()

    def _note_loads(self, command: c.Command | None) -> None:
        if isinstance(command, c.Join):
            self.sightings.load_succeeded(command.node_id)
        elif isinstance(command, c.Report) and command.variant:
            if command.kind == "load_failed":
                self.sightings.load_failed(command.node_id, command.variant)
            elif command.kind in ("load_done", "serving"):
                self.sightings.load_succeeded(command.node_id, command.variant)

    def on_leader_change(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff_s = 0.05
        while not self._stopped:
            # Besides commits, time changes the answer: hold-downs end, the restore pause
            # after a failure ends. Wake for those, and at least every REPLAN_S.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_deadline_s()):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            if not self.cluster.leading():
                continue
            try:
                result = await self.plan_and_commit()
                await self.remove_departed_voters()
                await self.raise_format()
                await self.rotate_watch()
                backoff_s = 0.05
                if result is None:  # refused every time: someone else keeps committing; try again
                    self._wake.set()
            except ConsensusError as error:
                log.info("plan_not_committed", error=str(error) or type(error).__name__)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
                self._wake.set()
            except Exception:
                log.exception("planning_failed")
                await asyncio.sleep(1.0)
                self._wake.set()

    def _next_deadline_s(self) -> float:
        sightings = self.sightings

        def deadlines(state: ClusterState) -> list[float]:
            sightings.observe(state)
            ends = [sightings.hold_down_left_ms(state, m) for m in state.members.values()]
            ends += sightings.unloadable(LOAD_FAILURE_AVOID_MS).values()
            since_failure_ms = sightings.since_last_failure_ms(state)
            if since_failure_ms is not None:
                ends.append(RESTORE_HOLD_DOWN_MS - since_failure_ms)
            rotation_ms = self._rotation_left_ms(state)
            if rotation_ms is not None:
                ends.append(max(rotation_ms, 1.0))
            return [end for end in ends if end > 0]

        soonest_ms = min(self.cluster.read(deadlines), default=None)
        if soonest_ms is None:
            return REPLAN_S
        return min(REPLAN_S, max(0.01, soonest_ms / 1000 + 0.01))

    async def raise_format(self) -> None:
        """Start raising the cluster's command format when every member may read a newer one
        (agent/upgrade.py): at most one ask at a time, at most every FORMAT_CHECK_S, and only
        while every member that has not left is alive (one that is not would hold it anyway).
        The ask runs beside planning, never in its way."""
        now_ms = self.sightings.clock.now_ms()
        if (self._format_task is not None and not self._format_task.done()) \
                or now_ms - self._format_checked_ms < FORMAT_CHECK_S * 1000:
            return
        me = self.cluster.node_id

        def ask(state: ClusterState) -> tuple[int, tuple[str, ...], dict[str, str]] | None:
            members = [m for m in state.members.values() if m.status != LEFT]
            if state.format_version >= c.FORMAT_VERSION or any(m.status != ALIVE for m in members):
                return None
            return state.format_version, state.format_members(), {
                m.node_id: m.http_address for m in members if m.node_id != me
            }

        asked = self.cluster.read(ask)
        if asked is None:
            return
        self._format_checked_ms = now_ms
        self._format_task = asyncio.get_running_loop().create_task(self._raise_format(*asked), name="raise-format")

    async def _raise_format(self, current: int, members: tuple[str, ...], addresses: dict[str, str]) -> None:
        try:
            answers = await upgrade.ask_formats(addresses)  # GET /v2 needs no token
            target = upgrade.format_to_raise(current, answers, c.FORMAT_VERSION)
            if target is None:
                log.debug("format_held", current=current, answers=answers)
                return
            # Refused on every replica alike if the members changed since they were asked.
            outcome = await self.cluster.propose(c.RaiseFormat(target, self.cluster.node_id, wall_ms(), members=members))
            log.info("format_raised", version=target, previous=current, accepted=outcome.accepted,
                     reason=outcome.reason)
        except ConsensusError as error:
            log.info("format_not_raised", error=str(error) or type(error).__name__)

    async def stop(self) -> None:
        if self._format_task is not None:
            self._format_task.cancel()
        await super().stop()

    def _rotation_left_ms(self, state: ClusterState) -> float | None:
        """How long until the next watch round is due (None: no rotation in this cluster)."""
        rotation_s = self.watch_rotation_s
        live = sum(1 for m in state.members.values() if m.status in (ALIVE, SUSPECTED))
        if state.format_version < 2 or rotation_s <= 0 or live <= state.settings.watch_all_members_max:
            return None
        now_ms = self.sightings.clock.now_ms()
        if self._round_seen[0] != state.watch_round:
            self._round_seen = (state.watch_round, now_ms)
        return rotation_s * 1000 - (now_ms - self._round_seen[1])

    async def rotate_watch(self) -> None:
        """Commit the next watch round once `watch_rotation_s` passed on this peer's clock
        since it saw the current one: every peer turns as it applies it (agent/detection.py)."""
        left_ms, current = self.cluster.read(lambda s: (self._rotation_left_ms(s), s.watch_round))
        if left_ms is None or left_ms > 0:
            return
        outcome = await self.cluster.propose(c.RotateWatch(current + 1, self.cluster.node_id, wall_ms()))
        log.info("watch_rotated", round=current + 1, accepted=outcome.accepted and not outcome.duplicate)

    async def remove_departed_voters(self) -> None:
        """Members that left stay Raft voters if their own removal did not finish: remove them
        here (idempotent), or the group keeps counting a dead voter against its quorum."""
        partners = self.cluster.partners()
        # A leaving peer removes itself right after its Leave commits; only one that did not
        # finish within the grace (since this peer saw it leave) is removed from here.
        sightings = self.sightings
        departed = self.cluster.read(
            lambda s: sorted(
                m.raft_address for m in s.members.values()
                if m.status == LEFT and m.raft_address in partners and sightings.left_for_ms(m) > DEPARTED_VOTER_GRACE_MS
            )
        )
        for address in departed[:1]:  # Raft changes membership one at a time
            log.info("removing_departed_voter", raft_address=address)
            await self.cluster.remove_voter(address)

    async def plan_and_commit(self) -> PlanResult | None:
        """Plan from the committed state and commit the result if it changes anything."""
        trigger, self._trigger = self._trigger, None
        for _ in range(PLAN_ATTEMPTS_MAX):
            problem, epoch = self.cluster.read(partial(_problem_and_epoch, sightings=self.sightings))
            started = time.perf_counter()
            if len(problem.apps) * len(problem.nodes) <= INLINE_PLANNING_SIZE_MAX:
                result = plan_with_fallback(problem)  # well under a millisecond: a thread hop costs more
            else:
                result = await asyncio.get_running_loop().run_in_executor(None, plan_with_fallback, problem)
            planning_ms = (time.perf_counter() - started) * 1000
            if not result.changed:
                return result
            command = c.CommitPlan(
                epoch=epoch + 1,
                placements=placements_of(result),
                proposer_id=self.cluster.node_id,
                reason=describe(result),
                at_ms=wall_ms(),
            )
            proposed_ms = wall_ms()
            outcome = await self.cluster.propose(command)
            if outcome.accepted:
                self.plans_committed += 1
                timings = {"planning_ms": round(planning_ms, 2), "commit_ms": round(wall_ms() - proposed_ms, 2)}
                if trigger is not None:
                    applied_ms, trigger_at_ms, kind = trigger
                    timings.update(trigger=kind, since_trigger_ms=round(proposed_ms - applied_ms, 2))
                    if trigger_at_ms is not None:
                        timings["trigger_commit_ms"] = round(applied_ms - trigger_at_ms, 2)
                log.info("plan_committed", epoch=epoch + 1, reason=command.reason, **timings)
                if not result.complete:
                    self._wake.set()
                return result
            log.info("plan_refused", epoch=epoch + 1, reason=outcome.reason)
        return None
