"""The checker: which promises a run broke, as a pure function over what the run recorded.

Like a Jepsen checker it reads the history, the injected faults, the cluster's event log and
the plans observed during the run, and returns violations as values; it starts nothing and
reads no clock. Invariants always checked:

- `two_primaries`: a plan seen with two primaries for one app, two peers reporting different
  primaries for one epoch, two `plan_committed` events with the same epoch, or an answer
  served in an epoch by a node that epoch's plan gives no serving role.
- `false_confirmation`: a `failure_confirmed` of a node that no crash, hang or partition
  touched at that time (a slowed, delayed or lossy node is alive and reachable: confirming
  it is a false positive too, unless `degraded_confirmation_ok`). A node that came back
  after the heal (`member_recovered`, a new incarnation) and is then confirmed again was
  alive: that confirmation is false too.
- `lost_request`: operations with an unknown outcome, beyond `lost_requests_max` (writes
  aside: an unknown write is Raft's nature under a leader change, not a loss).
- `lost_write`: a register whose committed value at the end is below its last acknowledged
  write, or is a value no write that may have landed (acknowledged or unknown) wrote.
- `unanswered_request`: a request that a hostile fault sent (chaos/hostile.py) got no answer
  at all from a running peer: no status, only a reset or a timeout.
- `late_answer`: a call that ended more than `late_answer_grace_s` past its own deadline.
- `unrecovered`: an app with no ok answer in the last `final_window_s` of the load, when
  `recovered` is expected (a scenario that kills a majority says `recovered = false`).

Checked when a scenario asks for it: `undetected` (a crash, hang or partition whose target
was never confirmed failed), `slow_detection`, `slow_recovery`, `failed_requests`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redge.chaos.faults import FaultRecord
from redge.chaos.history import FAIL, INFO, OK, Operation

FAILING_KINDS = ("crash", "kill-leader", "hang", "partition", "cascade")
# A peer stopped on purpose is not running either: confirming it while it is down is no false
# positive (it leaves first, so usually nothing is confirmed at all).
DOWN_KINDS = (*FAILING_KINDS, "restart")
EXAMPLES_MAX = 5
SERVING_ROLES = ("primary", "warm")
REJOIN_KINDS = ("member_recovered", "member_rejoined", "member_cleared")


@dataclass(frozen=True)
class Expectations:
    lost_requests_max: int = 0
    failed_requests_max: int | None = None
    recovered: bool = True
    final_window_s: float = 2.0
    confirmed: bool = False  # every crash/hang/partition target must be confirmed failed
    detection_ms_max: float | None = None
    confirmation_ms_max: float | None = None
    mttr_ms_max: float | None = None
    degraded_confirmation_ok: bool = False
    confirmation_grace_s: float = 15.0  # a confirmation this long after the heal still counts
    # A call may end this much after its deadline (scheduling, the last attempt's answer).
    late_answer_grace_s: float = 1.0

    def __post_init__(self) -> None:
        if self.lost_requests_max < 0 or (self.failed_requests_max is not None and self.failed_requests_max < 0):
            raise ValueError("request bounds must be >= 0")
        if self.final_window_s <= 0 or self.confirmation_grace_s < 0:
            raise ValueError("final_window_s must be > 0 and confirmation_grace_s >= 0")


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    at_ms: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    valid: bool
    violations: tuple[Violation, ...]
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "violations": [asdict(v) for v in self.violations], "counts": self.counts}


def check(
    operations: Sequence[Operation],
    faults: Sequence[FaultRecord],
    events: Sequence[dict[str, Any]],
    plans: Sequence[dict[str, Any]] = (),
    expect: Expectations = Expectations(),
    measurements: Sequence[Any] = (),
    final_registers: dict[str, float] | None = None,
    timeout_s: float | None = None,
) -> CheckResult:
    """`plans` are observations {observed_at_ms, via, epoch, plan: {app: [replica...]}};
    `final_registers` the committed value of each write register at the end (write load);
    `timeout_s` each call's deadline."""
    violations: list[Violation] = []
    violations += two_primaries(operations, events, plans)
    violations += false_confirmations(faults, events, expect)
    violations += lost_requests(operations, expect)
    violations += lost_writes(operations, final_registers)
    violations += unanswered_requests(faults)
    violations += late_answers(operations, timeout_s, expect)
    violations += unrecovered_apps(operations, expect)
    violations += expectation_bounds(operations, faults, events, measurements, expect)
    counts = {outcome: sum(1 for o in operations if o.outcome == outcome) for outcome in (OK, FAIL, INFO)}
    return CheckResult(not violations, tuple(violations), counts)


def primaries_of(plan: dict[str, Any]) -> dict[str, list[str]]:
    return {app: sorted(r["node_id"] for r in replicas if r.get("role") == "primary") for app, replicas in plan.items()}


def two_primaries(operations: Sequence[Operation], events: Sequence[dict[str, Any]],
                  plans: Sequence[dict[str, Any]]) -> list[Violation]:
    violations = []
    by_epoch: dict[tuple[str, int], str] = {}
    for observation in plans:
        for app, primaries in primaries_of(observation.get("plan") or {}).items():
            if len(primaries) > 1:
                violations.append(Violation("two_primaries", f"{app} has primaries {primaries} in epoch "
                                            f"{observation.get('epoch')} as {observation.get('via')} saw it",
                                            observation.get("observed_at_ms")))
            if primaries:
                key = (app, observation.get("epoch"))
                seen = by_epoch.setdefault(key, primaries[0])
                if seen != primaries[0]:
                    violations.append(Violation("two_primaries", f"{app} epoch {key[1]}: peers disagree on the "
                                                f"primary ({seen} and {primaries[0]})", observation.get("observed_at_ms")))
    # A warm backup may answer in the primary's epoch (clients fail over before the cluster
    # confirms the failure), so an answer breaks the rule only when it comes from a node the
    # epoch's plan gives no serving role; epochs never observed are not judged.
    allowed: dict[tuple[str, int], set[str]] = {}
    for observation in plans:
        for app, replicas in (observation.get("plan") or {}).items():
            allowed.setdefault((app, observation.get("epoch")), set()).update(
                r["node_id"] for r in replicas if r.get("role") in SERVING_ROLES
            )
    for operation in operations:
        if operation.outcome != OK or operation.epoch is None or not operation.node:
            continue
        nodes = allowed.get((operation.app, operation.epoch))
        if nodes is not None and operation.node not in nodes:
            violations.append(Violation(
                "two_primaries", f"{operation.app} was served by {operation.node} in epoch {operation.epoch}, "
                f"whose plan gives it no serving role (serving: {sorted(nodes)})", operation.end_ms,
            ))
            if len(violations) > EXAMPLES_MAX * 4:
                break
    epochs: dict[int, float] = {}
    for event in events:
        if event["kind"] == "plan_committed":
            epoch = event.get("epoch")
            if epoch in epochs:
                violations.append(Violation("two_primaries", f"two plans committed with epoch {epoch}", event["at_ms"]))
            epochs[epoch] = event["at_ms"]
    return violations


def false_confirmations(faults: Sequence[FaultRecord], events: Sequence[dict[str, Any]],
                        expect: Expectations) -> list[Violation]:
    justifying = DOWN_KINDS if not expect.degraded_confirmation_ok else None
    violations = []
    for event in events:
        if event["kind"] != "failure_confirmed":
            continue
        node, at_ms = event.get("node"), event["at_ms"]
        explained = any(
            node in fault.targets
            and (justifying is None or fault.kind in justifying)
            and fault.applied_at_ms <= at_ms
            and (fault.healed_at_ms is None or (
                at_ms <= fault.healed_at_ms + expect.confirmation_grace_s * 1000
                and not _came_back_before(events, node, fault.healed_at_ms, event)))
            for fault in faults
        )
        if not explained:
            # What the observers said, for whoever reads the report: why, and how long before.
            said = [{"observer": e.get("observer"), "reason": e.get("reason"), "before_ms": round(at_ms - e["at_ms"], 1)}
                    for e in events if e["kind"] == "suspicion" and e.get("node") == node
                    and 0 <= at_ms - e["at_ms"] <= 10_000]
            violations.append(Violation(
                "false_confirmation", f"{node} (incarnation {event.get('incarnation', '?')}) was confirmed failed "
                f"at {at_ms:.0f} but no crash, hang or partition had touched it then", at_ms,
                {"observers": event.get("observers", []), "suspicions": said[-4:]},
            ))
    return violations


def _came_back_before(events: Sequence[dict[str, Any]], node: str, healed_at_ms: float,
                      confirmation: dict[str, Any]) -> bool:
    """Whether `node` rejoined after the heal and the confirmation is of that new incarnation:
    then the healed fault cannot explain it (the restarted node was alive)."""
    incarnation = confirmation.get("incarnation")
    for event in events:
        if (event["kind"] in REJOIN_KINDS and event.get("node") == node
                and healed_at_ms <= event["at_ms"] <= confirmation["at_ms"]
                and event.get("seq", 0) < confirmation.get("seq", 2**62)
                and (incarnation is None or event.get("incarnation") is None or event["incarnation"] <= incarnation)):
            return True
    return False


def lost_requests(operations: Sequence[Operation], expect: Expectations) -> list[Violation]:
    lost = [o for o in operations if o.outcome == INFO and o.kind != "write"]
    if len(lost) <= expect.lost_requests_max:
        return []
    examples = [f"#{o.index} client {o.client} to {o.target}: {o.error}" for o in lost[:EXAMPLES_MAX]]
    return [Violation("lost_request", f"{len(lost)} requests with unknown outcome (at most "
                      f"{expect.lost_requests_max} allowed)", lost[0].end_ms, {"examples": examples})]


def lost_writes(operations: Sequence[Operation], final_registers: dict[str, float] | None) -> list[Violation]:
    """Each client's writes go to its own register, one at a time, with growing values: the
    committed value must be at least the last acknowledged one, and one that an acknowledged
    or unknown write wrote (a failed write must not have landed)."""
    if final_registers is None:
        return []
    from redge.chaos.load import write_register

    violations = []
    writes = [o for o in operations if o.kind == "write" and o.value is not None]
    for client in sorted({o.client for o in writes}):
        mine = [o for o in writes if o.client == client]
        register = write_register(client)
        acknowledged = [o.value for o in mine if o.outcome == OK]
        possible = {o.value for o in mine if o.outcome in (OK, INFO)}
        final = final_registers.get(register)
        if not acknowledged and final is None:
            continue
        if final is None or (acknowledged and final < max(acknowledged)):
            violations.append(Violation("lost_write", f"{register} holds {final} at the end, but "
                                        f"{max(acknowledged)} was acknowledged", details={"client": client}))
        elif int(final) not in possible:
            violations.append(Violation("lost_write", f"{register} holds {final}, which no write that may have "
                                        "landed wrote (a failed write was applied)", details={"client": client}))
    return violations


def unanswered_requests(faults: Sequence[FaultRecord]) -> list[Violation]:
    violations = []
    for fault in faults:
        unanswered = fault.notes.get("unanswered", 0) if fault.notes else 0
        if unanswered:
            violations.append(Violation(
                "unanswered_request", f"{unanswered} requests of fault {fault.fault_id} ({fault.kind}) to running "
                "peers got no answer at all", fault.applied_at_ms, {"examples": fault.notes.get("examples", [])},
            ))
    return violations


def late_answers(operations: Sequence[Operation], timeout_s: float | None, expect: Expectations) -> list[Violation]:
    if timeout_s is None:
        return []
    bound_ms = (timeout_s + expect.late_answer_grace_s) * 1000
    late = [o for o in operations if o.latency_ms > bound_ms]
    if not late:
        return []
    examples = [f"#{o.index} {o.kind} to {o.target}: {o.latency_ms:.0f} ms ({o.outcome})" for o in late[:EXAMPLES_MAX]]
    return [Violation("late_answer", f"{len(late)} calls ended more than {expect.late_answer_grace_s:g} s past their "
                      f"{timeout_s:g} s deadline", late[0].end_ms, {"examples": examples})]


def unrecovered_apps(operations: Sequence[Operation], expect: Expectations) -> list[Violation]:
    if not expect.recovered or not operations:
        return []
    end_ms = max(o.end_ms for o in operations)
    violations = []
    for app in sorted({o.app for o in operations}):
        final = [o for o in operations if o.app == app and o.end_ms >= end_ms - expect.final_window_s * 1000]
        if not any(o.outcome == OK for o in final):
            violations.append(Violation("unrecovered", f"{app} had no successful answer in the last "
                                        f"{expect.final_window_s:g}s of the run", end_ms))
    return violations


def expectation_bounds(operations: Sequence[Operation], faults: Sequence[FaultRecord],
                       events: Sequence[dict[str, Any]], measurements: Sequence[Any],
                       expect: Expectations) -> list[Violation]:
    violations = []
    failed = sum(1 for o in operations if o.outcome == FAIL)
    if expect.failed_requests_max is not None and failed > expect.failed_requests_max:
        violations.append(Violation("failed_requests", f"{failed} failed requests (at most "
                                    f"{expect.failed_requests_max} allowed)"))
    for m in measurements:
        if expect.confirmed and m.kind in FAILING_KINDS and m.kind != "cascade" and m.confirmation_ms is None:
            violations.append(Violation("undetected", f"fault {m.fault_id} ({m.description}) on {list(m.targets)} "
                                        "was never confirmed", m.applied_at_ms))
        for name, bound in (("detection_ms", expect.detection_ms_max), ("confirmation_ms", expect.confirmation_ms_max)):
            value = getattr(m, name)
            if bound is not None and value is not None and value > bound:
                violations.append(Violation("slow_detection", f"fault {m.fault_id}: {name} {value:.0f} > {bound:g}",
                                            m.applied_at_ms))
        for app in m.apps:
            if expect.mttr_ms_max is None:
                continue
            if app.disrupted_clients and (app.mttr_ms is None or app.mttr_ms > expect.mttr_ms_max):
                shown = "never" if app.mttr_ms is None else f"{app.mttr_ms:.0f}"
                violations.append(Violation("slow_recovery", f"fault {m.fault_id}: {app.app} MTTR {shown} ms > "
                                            f"{expect.mttr_ms_max:g}", m.applied_at_ms))
    return violations
