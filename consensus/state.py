"""The cluster state: a pure, deterministic state machine over the committed commands.

Every peer applies the same commands in the same order and so holds the same state. `apply`
never raises, never reads a clock or a random source, and returns an `Outcome` saying
whether the command was accepted and why not. That makes the state replayable from the Raft
journal and testable without a network. Hard invariants live here (one primary per app per
plan, epochs only go forward, no replica on a failed or departed node, failures confirmed
only by enough distinct live observers); policy (which variant where) lives in placement/.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from redge.consensus import commands as c
from redge.consensus.errors import MalformedCommand
from redge.consensus.watch import ALL_MEMBERS_MAX, FANOUT, watchers_per_node

ALIVE = "alive"
SUSPECTED = "suspected"
FAILED = "failed"
LEFT = "left"

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Settings:
    """Rules of the state machine that every peer must agree on."""

    events_max: int = 2000
    # Distinct live observers needed to confirm a failure: a majority of the other live
    # members, and at least this many where the cluster has them.
    confirm_observers_min: int = 2
    # A node that comes back after a confirmed failure takes no primaries for this long.
    hold_down_ms: int = 10_000
    # Up to this many members everyone watches everyone; above it each node has
    # `watchers_per_node` watchers (agent/detector.monitoring_targets), and a failure needs a
    # majority of those, since the other members never hear from the node at all.
    watch_all_members_max: int = ALL_MEMBERS_MAX
    watchers_per_node: int = FANOUT


@dataclass
class Member:
    node_id: str
    http_address: str
    raft_address: str
    heartbeat_address: str
    incarnation: int
    status: str
    joined_at_ms: int
    status_changed_at_ms: int
    memory_bytes: int = 0
    accelerator_memory_bytes: int = 0
    storage_bytes: int = 0
    device_kind: str = "cpu"
    degraded: bool = False  # observers judged it too slow (their Suspect with reason `degraded`)
    hold_down_until_ms: int = 0
    slow: bool = False  # it judged itself too slow for its apps' SLOs (its own Report)


@dataclass
class App:
    name: str
    variants: tuple[str, ...]
    priority: str
    slo_ms: float
    backup: str
    request_rate_per_s: float
    registered_at_ms: int


@dataclass(frozen=True)
class Event:
    seq: int
    at_ms: int
    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    reason: str = ""
    # True when the command changed nothing because it had already been applied.
    duplicate: bool = False


ACCEPTED = Outcome(True)


@dataclass
class ClusterState:
    settings: Settings = field(default_factory=Settings)
    members: dict[str, Member] = field(default_factory=dict)
    apps: dict[str, App] = field(default_factory=dict)
    plan: dict[str, tuple[c.Replica, ...]] = field(default_factory=dict)
    epoch: int = 0
    plan_committed_at_ms: int = 0
    # target -> observer -> (at_ms, reason)
    suspicions: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    # (app, node) -> last reported replica state (load_started, serving, ...)
    replica_reports: dict[tuple[str, str], str] = field(default_factory=dict)
    # (name, version) -> summary, as first reported; node -> what its store holds
    catalog: dict[tuple[str, str], c.ArtifactSummary] = field(default_factory=dict)
    stores: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    sources: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    store_used_bytes: dict[str, int] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=deque)
    event_seq: int = 0
    applied_count: int = 0
    rejected_count: int = 0
    # The newest command format every replica accepts (consensus/commands.py): raised only
    # by a committed RaiseFormat, so that it is the same on every replica whatever its build.
    format_version: int = 1
    # The watch round (agent/detector.py monitoring_targets) from format 2: committed, so
    # every peer turns at the same point of the log whatever its clock says.
    watch_round: int = 0
    # The node whose clock the command being applied was stamped with (not replicated).
    _clock: str = field(default="", repr=False, compare=False)

    # ------------------------------------------------------------------ applying

    def apply_encoded(self, data: bytes) -> Outcome:
        return self.apply_entry(data)[1]

    def apply_entry(self, data: bytes) -> tuple[c.Command | None, Outcome]:
        """Decode and apply one replicated entry; the command is None when it did not decode.

        Every way an entry is refused here is recorded as a malformed one is, whatever this
        build knows of it: one above the cluster's format (before its type is even looked
        up), and a RaiseFormat that does not hold, which is recorded exactly as a build that
        does not know RaiseFormat records it. So replicas of different builds agree."""
        self._clock = ""
        try:
            command, version = c.decode_versioned(data)
        except MalformedCommand as error:
            version = c.entry_format(data)  # (parsed again only for an entry that is refused)
            if version <= self.format_version:
                return None, self._reject("malformed", 0, str(error))
        if version > self.format_version:
            return None, self._reject("malformed", 0, f"format {version} is above the cluster's format {self.format_version}")
        if isinstance(command, c.RaiseFormat) and not self.raise_format_valid(command):
            return None, self._reject("malformed", 0, "unknown command type 'raise_format'")
        return command, self.apply(command)

    def raise_format_valid(self, command: c.RaiseFormat) -> bool:
        """A RaiseFormat counts only while the members it was checked against are exactly the
        members that have not left, each in the same incarnation: one that joined or came
        back in between was never asked whether it reads the new format."""
        return command.version <= self.format_version or tuple(command.members) == self.format_members()

    def format_members(self) -> tuple[str, ...]:
        """The members that have not left, as "node@incarnation", sorted."""
        return tuple(sorted(f"{m.node_id}@{m.incarnation}" for m in self.members.values() if m.status != LEFT))

    def apply(self, command: c.Command) -> Outcome:
        """Apply one command built in this process (or decoded by `apply_entry`)."""
        handler = _HANDLERS.get(type(command))
        self._clock = c.proposer_of(command)
        if handler is None:
            return self._reject(type(command).__name__, 0, "unknown command")
        try:
            outcome = handler(self, command)
        except Exception as error:  # a bug must not wedge the Raft log: record it and go on
            outcome = self._reject(type(command).__name__, getattr(command, "at_ms", 0), f"internal error: {error!r}")
        self.applied_count += 1
        return outcome

    def _reject(self, command_name: str, at_ms: int, reason: str) -> Outcome:
        self.rejected_count += 1
        self._record(at_ms, "command_rejected", command=command_name, reason=reason)
        return Outcome(False, reason)

    def _record(self, at_ms: int, kind: str, **fields: Any) -> None:
        if self.format_version >= 2 and self._clock:
            fields["clock"] = self._clock  # `at_ms` is this node's wall clock
        self.event_seq += 1
        self.events.append(Event(self.event_seq, at_ms, kind, fields))
        while len(self.events) > self.settings.events_max:
            self.events.popleft()

    # ------------------------------------------------------------------ members

    def _on_join(self, command: c.Join) -> Outcome:
        if not NAME_PATTERN.match(command.node_id):
            return self._reject("join", command.at_ms, f"invalid node id {command.node_id!r}")
        if command.incarnation < 0:
            return self._reject("join", command.at_ms, "incarnation must be >= 0")
        if self.format_version >= 2 and command.reads_format < self.format_version:
            return self._reject(
                "join", command.at_ms,
                f"{command.node_id} reads command formats up to {command.reads_format or 1} and the cluster's is "
                f"{self.format_version}: upgrade it",
            )
        for other in self.members.values():
            if other.node_id != command.node_id and other.status != LEFT and (
                other.raft_address == command.raft_address or other.http_address == command.http_address
            ):
                return self._reject(
                    "join", command.at_ms, f"address already used by member {other.node_id}"
                )
        member = self.members.get(command.node_id)
        if member is None:
            self.members[command.node_id] = Member(
                node_id=command.node_id,
                http_address=command.http_address,
                raft_address=command.raft_address,
                heartbeat_address=command.heartbeat_address,
                incarnation=command.incarnation,
                status=ALIVE,
                joined_at_ms=command.at_ms,
                status_changed_at_ms=command.at_ms,
                memory_bytes=command.memory_bytes,
                accelerator_memory_bytes=command.accelerator_memory_bytes,
                storage_bytes=command.storage_bytes,
                device_kind=command.device_kind,
            )
            self._record(command.at_ms, "member_joined", node=command.node_id, incarnation=command.incarnation)
            return ACCEPTED
        if command.incarnation < member.incarnation:
            return self._reject(
                "join",
                command.at_ms,
                f"stale incarnation {command.incarnation} < {member.incarnation} for {command.node_id}",
            )
        if command.incarnation == member.incarnation:
            if member.status in (FAILED, LEFT):
                return self._reject(
                    "join",
                    command.at_ms,
                    f"{command.node_id} is {member.status}: rejoin with a higher incarnation",
                )
            return Outcome(True, "already a member", duplicate=True)
        previous_status = member.status
        member.incarnation = command.incarnation
        member.http_address = command.http_address
        member.raft_address = command.raft_address
        member.heartbeat_address = command.heartbeat_address
        member.memory_bytes = command.memory_bytes
        member.accelerator_memory_bytes = command.accelerator_memory_bytes
        member.storage_bytes = command.storage_bytes
        member.device_kind = command.device_kind
        member.degraded = False
        member.slow = False
        member.status = ALIVE
        member.status_changed_at_ms = command.at_ms
        self.suspicions.pop(command.node_id, None)
        # A new incarnation has no opinion yet: what its previous life said no longer counts.
        self._drop_suspicions_by(command.node_id, command.at_ms)
        if previous_status == FAILED:
            member.hold_down_until_ms = command.at_ms + self.settings.hold_down_ms
            self._record(
                command.at_ms,
                "member_recovered",
                node=command.node_id,
                incarnation=command.incarnation,
                hold_down_until_ms=member.hold_down_until_ms,
            )
        else:
            self._record(command.at_ms, "member_rejoined", node=command.node_id, incarnation=command.incarnation)
        return ACCEPTED

    def _on_leave(self, command: c.Leave) -> Outcome:
        member = self.members.get(command.node_id)
        if member is None:
            return self._reject("leave", command.at_ms, f"unknown member {command.node_id}")
        if member.status == LEFT:
            return Outcome(True, "already left", duplicate=True)
        member.status = LEFT
        member.status_changed_at_ms = command.at_ms
        self.suspicions.pop(command.node_id, None)
        self._drop_suspicions_by(command.node_id, command.at_ms)
        self._record(command.at_ms, "member_left", node=command.node_id)
        self._reevaluate_suspicions(command.at_ms)
        return ACCEPTED

    # ------------------------------------------------------------------ suspicion

    def live_member_ids(self) -> list[str]:
        return sorted(m.node_id for m in self.members.values() if m.status in (ALIVE, SUSPECTED))

    def observers_needed(self, target_id: str) -> int:
        """Distinct live observers (other than the target) needed to confirm its failure."""
        others = [node for node in self.live_member_ids() if node != target_id]
        members = [m for m in self.members.values() if m.status != LEFT and m.node_id != target_id]
        if not members:
            return 1
        # The detector watches by the same rule (consensus/watch.py): these are the nodes
        # that hear from the target at all.
        watchers = min(len(others), watchers_per_node(
            len(members) + 1, self.settings.watch_all_members_max, self.settings.watchers_per_node))
        majority = watchers // 2 + 1
        # The floor counts every member, not only the live ones: once a three-node cluster
        # has lost one node, the two survivors must not be able to confirm each other's
        # failure on one word (a slow link or a busy CPU would then fail them both); and if
        # one of them really dies, the last one has no Raft quorum to act on it anyway.
        return max(majority, min(self.settings.confirm_observers_min, len(members)))

    def _on_suspect(self, command: c.Suspect) -> Outcome:
        target = self.members.get(command.target_id)
        observer = self.members.get(command.observer_id)
        if target is None:
            return self._reject("suspect", command.at_ms, f"unknown target {command.target_id}")
        if observer is None or observer.status not in (ALIVE, SUSPECTED):
            return self._reject("suspect", command.at_ms, f"observer {command.observer_id} is not a live member")
        if command.observer_id == command.target_id:
            return self._reject("suspect", command.at_ms, "a node cannot suspect itself")
        if command.target_incarnation < target.incarnation:
            return self._reject(
                "suspect",
                command.at_ms,
                f"stale suspicion of {command.target_id} incarnation {command.target_incarnation} < {target.incarnation}",
            )
        if command.reason == "degraded":
            if target.status in (FAILED, LEFT) or target.degraded:
                return Outcome(True, "no change", duplicate=True)
            target.degraded = True
            self._record(command.at_ms, "member_degraded", node=command.target_id, observer=command.observer_id)
            return ACCEPTED
        if target.status in (FAILED, LEFT):
            return Outcome(True, f"target already {target.status}", duplicate=True)
        by_observer = self.suspicions.setdefault(command.target_id, {})
        if command.observer_id in by_observer:
            return Outcome(True, "already suspected by this observer", duplicate=True)
        since_ms = command.since_ms if 0 < command.since_ms <= command.at_ms else command.at_ms
        by_observer[command.observer_id] = (since_ms, command.reason)
        self._record(
            command.at_ms,
            "suspicion",
            node=command.target_id,
            observer=command.observer_id,
            reason=command.reason,
            since_ms=since_ms,
            first=len(by_observer) == 1,
        )
        if target.status == ALIVE:
            target.status = SUSPECTED
            target.status_changed_at_ms = command.at_ms
        self._maybe_confirm(command.target_id, command.at_ms)
        return ACCEPTED

    def _on_unsuspect(self, command: c.Unsuspect) -> Outcome:
        target = self.members.get(command.target_id)
        if target is None:
            return self._reject("unsuspect", command.at_ms, f"unknown target {command.target_id}")
        by_observer = self.suspicions.get(command.target_id, {})
        if command.observer_id not in by_observer:
            if target.degraded and target.status in (ALIVE, SUSPECTED):
                # An observer that judged the node slow sees it well again.
                target.degraded = False
                self._record(command.at_ms, "member_restored", node=command.target_id, observer=command.observer_id)
                return ACCEPTED
            return Outcome(True, "no suspicion to withdraw", duplicate=True)
        del by_observer[command.observer_id]
        self._record(command.at_ms, "suspicion_withdrawn", node=command.target_id, observer=command.observer_id)
        if by_observer:
            return ACCEPTED
        self.suspicions.pop(command.target_id, None)
        if target.status == SUSPECTED:
            target.status = ALIVE
            target.status_changed_at_ms = command.at_ms
            self._record(command.at_ms, "member_cleared", node=command.target_id)
        return ACCEPTED

    def _drop_suspicions_by(self, observer_id: str, at_ms: int) -> None:
        """Forget every suspicion `observer_id` holds; a node nobody suspects any more is alive."""
        for target_id in sorted(self.suspicions):
            by_observer = self.suspicions[target_id]
            if by_observer.pop(observer_id, None) is None or by_observer:
                continue
            del self.suspicions[target_id]
            target = self.members.get(target_id)
            if target is not None and target.status == SUSPECTED:
                target.status = ALIVE
                target.status_changed_at_ms = at_ms
                self._record(at_ms, "member_cleared", node=target_id, reason=f"{observer_id} no longer suspects it")

    def _live_observers_of(self, target_id: str) -> list[str]:
        live = set(self.live_member_ids())
        return sorted(o for o in self.suspicions.get(target_id, {}) if o in live and o != target_id)

    def _maybe_confirm(self, target_id: str, at_ms: int) -> None:
        target = self.members[target_id]
        if target.status not in (ALIVE, SUSPECTED):
            return
        observers = self._live_observers_of(target_id)
        if len(observers) < self.observers_needed(target_id):
            return
        first_at_ms = min(self.suspicions[target_id][o][0] for o in observers)
        target.status = FAILED
        target.status_changed_at_ms = at_ms
        self.suspicions.pop(target_id, None)
        self._drop_suspicions_by(target_id, at_ms)
        self._record(
            at_ms,
            "failure_confirmed",
            node=target_id,
            incarnation=target.incarnation,
            observers=observers,
            first_suspicion_at_ms=first_at_ms,
        )

    def _reevaluate_suspicions(self, at_ms: int) -> None:
        # When the live set shrinks, fewer observers may be needed for a pending suspicion.
        for target_id in sorted(self.suspicions):
            if target_id in self.members:
                self._maybe_confirm(target_id, at_ms)

    # ------------------------------------------------------------------ apps and plans

    def _on_register_app(self, command: c.RegisterApp) -> Outcome:
        problems = []
        if not NAME_PATTERN.match(command.name):
            problems.append(f"invalid app name {command.name!r}")
        if not command.variants or len(set(command.variants)) != len(command.variants):
            problems.append("variants must be a non-empty list of distinct names")
        problems += [f"invalid variant name {v!r}" for v in command.variants if not NAME_PATTERN.match(v)]
        if command.priority not in c.PRIORITIES:
            problems.append(f"priority must be one of {', '.join(c.PRIORITIES)}")
        if command.backup not in c.BACKUP_POLICIES:
            problems.append(f"backup must be one of {', '.join(c.BACKUP_POLICIES)}")
        if not command.slo_ms > 0:
            problems.append("slo_ms must be > 0")
        if command.request_rate_per_s < 0:
            problems.append("request_rate_per_s must be >= 0")
        if problems:
            return self._reject("register_app", command.at_ms, "; ".join(problems))
        app = App(
            name=command.name,
            variants=tuple(command.variants),
            priority=command.priority,
            slo_ms=command.slo_ms,
            backup=command.backup,
            request_rate_per_s=command.request_rate_per_s,
            registered_at_ms=command.at_ms,
        )
        existing = self.apps.get(command.name)
        if existing is not None:
            if dataclasses.replace(existing, registered_at_ms=command.at_ms) == app:
                return Outcome(True, "already registered", duplicate=True)
            app.registered_at_ms = existing.registered_at_ms
            self.apps[command.name] = app
            self._record(command.at_ms, "app_updated", app=command.name)
            return ACCEPTED
        self.apps[command.name] = app
        self._record(command.at_ms, "app_registered", app=command.name, priority=command.priority)
        return ACCEPTED

    def _on_remove_app(self, command: c.RemoveApp) -> Outcome:
        if command.name not in self.apps:
            return Outcome(True, "no such app", duplicate=True)
        del self.apps[command.name]
        if command.name in self.plan:
            # Dropping a placement is a plan change: raise the epoch so routers notice.
            del self.plan[command.name]
            self.epoch += 1
            self.plan_committed_at_ms = command.at_ms
        for key in [key for key in self.replica_reports if key[0] == command.name]:
            del self.replica_reports[key]
        self._record(command.at_ms, "app_removed", app=command.name, epoch=self.epoch)
        return ACCEPTED

    def validate_plan(self, placements: tuple[c.AppPlacement, ...]) -> list[str]:
        """The hard rules of a plan, as a list of problems (empty when it is valid)."""
        problems = []
        seen_apps = set()
        for placement in placements:
            app = self.apps.get(placement.app)
            if app is None:
                problems.append(f"unknown app {placement.app}")
                continue
            if placement.app in seen_apps:
                problems.append(f"app {placement.app} placed twice")
            seen_apps.add(placement.app)
            primaries = [r for r in placement.replicas if r.role == "primary"]
            if len(primaries) > 1:
                problems.append(f"app {placement.app} has {len(primaries)} primaries")
            nodes = [r.node_id for r in placement.replicas]
            if len(set(nodes)) != len(nodes):
                problems.append(f"app {placement.app} has two replicas on one node")
            for replica in placement.replicas:
                if replica.role not in c.ROLES:
                    problems.append(f"app {placement.app}: unknown role {replica.role!r}")
                if replica.variant not in app.variants:
                    problems.append(f"app {placement.app}: {replica.variant} is not one of its variants")
                member = self.members.get(replica.node_id)
                if member is None:
                    problems.append(f"app {placement.app}: unknown node {replica.node_id}")
                elif member.status in (FAILED, LEFT):
                    problems.append(f"app {placement.app}: node {replica.node_id} is {member.status}")
        return problems

    def _on_commit_plan(self, command: c.CommitPlan) -> Outcome:
        if command.epoch != self.epoch + 1:
            return self._reject(
                "commit_plan", command.at_ms, f"stale plan: epoch {command.epoch}, expected {self.epoch + 1}"
            )
        problems = self.validate_plan(command.placements)
        if problems:
            return self._reject("commit_plan", command.at_ms, "; ".join(problems))
        previous = self.plan
        self.plan = {p.app: tuple(p.replicas) for p in command.placements if p.replicas}
        self.epoch = command.epoch
        self.plan_committed_at_ms = command.at_ms
        changed = sorted(app for app in set(previous) | set(self.plan) if previous.get(app) != self.plan.get(app))
        self._record(
            command.at_ms,
            "plan_committed",
            epoch=command.epoch,
            proposer=command.proposer_id,
            reason=command.reason,
            changed_apps=changed,
        )
        return ACCEPTED

    def _on_report(self, command: c.Report) -> Outcome:
        if command.node_id not in self.members:
            return self._reject("report", command.at_ms, f"unknown member {command.node_id}")
        if command.kind not in c.REPORT_KINDS:
            return self._reject("report", command.at_ms, f"unknown report kind {command.kind!r}")
        if command.kind in ("degraded", "recovered"):
            # The node's verdict about itself, kept apart from its observers' `degraded`:
            # neither may clear what the other said.
            self.members[command.node_id].slow = command.kind == "degraded"
        elif command.app:
            self.replica_reports[(command.app, command.node_id)] = command.kind
        fields = {"node": command.node_id}
        for name in ("app", "variant", "epoch", "detail", "duration_ms"):
            value = getattr(command, name)
            if value:
                fields[name] = value
        self._record(command.at_ms, command.kind, **fields)
        return ACCEPTED

    def _on_store_report(self, command: c.StoreReport) -> Outcome:
        if command.node_id not in self.members:
            return self._reject("store_report", command.at_ms, f"unknown member {command.node_id}")
        held = tuple(sorted((a.name, a.version) for a in command.artifacts))
        if len(set(held)) != len(held):
            return self._reject("store_report", command.at_ms, "an artifact is listed twice")
        for artifact in command.artifacts:
            if not NAME_PATTERN.match(artifact.name) or not NAME_PATTERN.match(artifact.version):
                return self._reject("store_report", command.at_ms, f"invalid artifact name {artifact.name!r}")
        from_source = tuple(sorted((a.name, a.version) for a in command.source_artifacts))
        unchanged = self.stores.get(command.node_id) == held and self.sources.get(command.node_id, ()) == from_source
        for artifact in command.artifacts + command.source_artifacts:
            self.catalog.setdefault((artifact.name, artifact.version), artifact)
        self.stores[command.node_id] = held
        if from_source:
            self.sources[command.node_id] = from_source
        self.store_used_bytes[command.node_id] = command.used_bytes
        if unchanged:
            return Outcome(True, "store unchanged", duplicate=True)
        self._record(command.at_ms, "store_changed", node=command.node_id, artifacts=len(held), used_bytes=command.used_bytes)
        return ACCEPTED

    def nodes_holding(self, name: str) -> list[str]:
        """Live members whose store holds any version of artifact `name`."""
        live = set(self.live_member_ids())
        return sorted(node for node, held in self.stores.items() if node in live and any(n == name for n, _ in held))

    def _on_probe(self, command: c.Probe) -> Outcome:
        return ACCEPTED

    def _on_rotate_watch(self, command: c.RotateWatch) -> Outcome:
        if command.round != self.watch_round + 1:
            return Outcome(True, f"watch round is {self.watch_round}", duplicate=True)
        self.watch_round = command.round
        return ACCEPTED  # not an event: one a minute would push real ones out of the window

    def _on_raise_format(self, command: c.RaiseFormat) -> Outcome:
        if command.version <= self.format_version:
            return Outcome(True, f"format already {self.format_version}", duplicate=True)
        previous, self.format_version = self.format_version, command.version
        self._record(command.at_ms, "format_raised", version=command.version, previous=previous,
                     proposer=command.proposer_id)
        return ACCEPTED

    # ------------------------------------------------------------------ views

    def primary_of(self, app: str) -> c.Replica | None:
        for replica in self.plan.get(app, ()):
            if replica.role == "primary":
                return replica
        return None

    def to_dict(self, events_max: int | None = None) -> dict[str, Any]:
        events = list(self.events)
        if events_max is not None:
            events = events[-events_max:] if events_max > 0 else []
        return {
            "settings": dataclasses.asdict(self.settings),
            "epoch": self.epoch,
            "plan_committed_at_ms": self.plan_committed_at_ms,
            "members": [dataclasses.asdict(m) for _, m in sorted(self.members.items())],
            "apps": [
                {**dataclasses.asdict(a), "variants": list(a.variants)} for _, a in sorted(self.apps.items())
            ],
            "plan": {
                app: [dataclasses.asdict(r) for r in replicas] for app, replicas in sorted(self.plan.items())
            },
            "suspicions": {
                target: {observer: {"at_ms": at_ms, "reason": reason} for observer, (at_ms, reason) in sorted(by.items())}
                for target, by in sorted(self.suspicions.items())
            },
            "replica_reports": [
                {"app": app, "node_id": node, "state": state}
                for (app, node), state in sorted(self.replica_reports.items())
            ],
            "catalog": [dataclasses.asdict(a) for _, a in sorted(self.catalog.items())],
            "stores": {node: [list(key) for key in held] for node, held in sorted(self.stores.items())},
            "sources": {node: [list(key) for key in held] for node, held in sorted(self.sources.items())},
            "store_used_bytes": dict(sorted(self.store_used_bytes.items())),
            "events": [dataclasses.asdict(e) for e in events],
            "event_seq": self.event_seq,
            "applied_count": self.applied_count,
            "rejected_count": self.rejected_count,
        } | ({"format_version": self.format_version, "watch_round": self.watch_round} if self.format_version > 1 else {})

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterState:
        settings = Settings(**_known(Settings, data["settings"]))
        state = cls(settings=settings)
        state.format_version = data.get("format_version", 1)
        state.watch_round = data.get("watch_round", 0)
        state.epoch = data["epoch"]
        state.plan_committed_at_ms = data["plan_committed_at_ms"]
        state.members = {m["node_id"]: Member(**_known(Member, m)) for m in data["members"]}
        state.apps = {a["name"]: App(**_known(App, {**a, "variants": tuple(a["variants"])})) for a in data["apps"]}
        state.plan = {
            app: tuple(c.Replica(**_known(c.Replica, r)) for r in replicas) for app, replicas in data["plan"].items()
        }
        state.suspicions = {
            target: {observer: (v["at_ms"], v["reason"]) for observer, v in by.items()}
            for target, by in data["suspicions"].items()
        }
        state.replica_reports = {(r["app"], r["node_id"]): r["state"] for r in data["replica_reports"]}
        state.catalog = {}
        for raw in data["catalog"]:
            summary = c.ArtifactSummary(**_known(c.ArtifactSummary, {
                **raw, "profiles": tuple(c.ArtifactProfile(**_known(c.ArtifactProfile, p)) for p in raw["profiles"])
            }))
            state.catalog[(summary.name, summary.version)] = summary
        state.stores = {node: tuple(tuple(key) for key in held) for node, held in data["stores"].items()}
        state.sources = {node: tuple(tuple(key) for key in held) for node, held in data["sources"].items()}
        state.store_used_bytes = dict(data["store_used_bytes"])
        state.events = deque(Event(**_known(Event, e)) for e in data["events"])
        state.event_seq = data["event_seq"]
        state.applied_count = data["applied_count"]
        state.rejected_count = data["rejected_count"]
        return state

    @classmethod
    def from_bytes(cls, data: bytes) -> ClusterState:
        return cls.from_dict(orjson.loads(data))


_HANDLERS = {
    c.Join: ClusterState._on_join,
    c.Leave: ClusterState._on_leave,
    c.Suspect: ClusterState._on_suspect,
    c.Unsuspect: ClusterState._on_unsuspect,
    c.RegisterApp: ClusterState._on_register_app,
    c.RemoveApp: ClusterState._on_remove_app,
    c.CommitPlan: ClusterState._on_commit_plan,
    c.Report: ClusterState._on_report,
    c.StoreReport: ClusterState._on_store_report,
    c.Probe: ClusterState._on_probe,
    c.RaiseFormat: ClusterState._on_raise_format,
    c.RotateWatch: ClusterState._on_rotate_watch,
}


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of a snapshot record that this build's `cls` has: a newer build's extra
    fields are left out (they default to "as before"), the same on every replica."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}
