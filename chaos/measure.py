"""The paper's failure metrics, computed from what a run recorded; pure functions only.

Inputs are three records of one run, all stamped with wall-clock milliseconds on one machine:
the client history (chaos/history.py), the injected faults with the nodes each touched
(chaos/faults.py `FaultRecord`), and the cluster's replicated event log
(`GET /cluster/events`: suspicion, failure_confirmed, plan_committed, load_started, ...).
Nothing here reads a clock or the network, so every number can be recomputed from a saved
report and tested on synthetic histories.

Per fault (DESIGN.md, "Metrics"):

| metric | from | to |
| --- | --- | --- |
| detection_ms | fault applied | first `suspicion` of a target |
| confirmation_ms | fault applied | `failure_confirmed` of a target, committed (`applied_ms`) |
| decision_ms | that confirmation, committed | the next `plan_committed`, committed |
| loading | `load_started` of an app on a node after that plan | its `load_done` / `serving` |
| reconfiguration_ms | the plan for the app, or the first client error, whichever is first | the first ok answer from a node the fault did not touch |
| mttr_ms | fault applied | the last disrupted client's first ok answer from an untouched node |
| outage_ms | fault applied | the longest stretch with no ok answer for the app |

A fault's window ends when the next fault touching one of its nodes is applied (or at the
end of the run), so a later fault's events are not charged to an earlier one; and while
faults overlap (a cascade), a request that failed at a node only another fault touched is
charged to that other fault. A metric that
did not happen is None, never zero: "not detected" and "detected at once" differ.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redge.chaos.faults import FaultRecord
from redge.chaos.history import OK, Operation
from redge.chaos.stats import summary

INFINITY_MS = float("inf")
LOAD_END_KINDS = ("load_done", "serving", "load_failed")


@dataclass(frozen=True)
class Loading:
    app: str
    node: str
    started_at_ms: float
    loading_ms: float | None  # None: never finished within the window
    ended_by: str  # load_done, serving, load_failed or "" when it did not end


@dataclass(frozen=True)
class AppRecovery:
    app: str
    operations: int
    failed: int
    unknown: int
    disrupted_clients: int
    reconfiguration_ms: float | None
    mttr_ms: float | None
    outage_ms: float | None
    recovered: bool  # every disrupted client got an ok answer again within the window


@dataclass(frozen=True)
class FaultMeasurement:
    fault_id: int
    kind: str
    description: str
    targets: tuple[str, ...]
    applied_at_ms: float
    healed_at_ms: float | None
    window_end_ms: float
    detection_ms: float | None
    confirmation_ms: float | None
    decision_ms: float | None
    plan_epoch: int | None
    loading: tuple[Loading, ...]
    apps: tuple[AppRecovery, ...]
    events: tuple[dict[str, Any], ...] = field(default=())  # the events charged to this fault

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_end_ms"] = None if self.window_end_ms == INFINITY_MS else self.window_end_ms
        return data


def ordered(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events by time, then sequence; ties broken by content so that input order never matters."""
    return sorted(events, key=lambda e: (e["at_ms"], e.get("seq", 0), json.dumps(e, sort_keys=True, default=str)))


def _event_node(event: dict[str, Any]) -> str | None:
    return event.get("node") or event.get("node_id")


def fault_windows(faults: Sequence[FaultRecord]) -> dict[int, float]:
    """fault_id -> when its window ends: the next fault touching one of its nodes, else never."""
    ordered = sorted(faults, key=lambda f: (f.applied_at_ms, f.fault_id))
    windows = {}
    for index, fault in enumerate(ordered):
        end = INFINITY_MS
        for later in ordered[index + 1 :]:
            if set(later.targets) & set(fault.targets):
                end = later.applied_at_ms
                break
        windows[fault.fault_id] = end
    return windows


def committed_ms(event: dict[str, Any]) -> float:
    """When an event's command was committed, as the peer that served the log saw it
    (`applied_ms`); the proposer's `at_ms` where the peer does not know (an older log, or
    one that came in a snapshot). DESIGN.md's confirmation and decision are commit times:
    between a proposal and its commit lies a Raft round, which on a busy cluster is most
    of a decision."""
    return float(event.get("applied_ms", event["at_ms"]))


def commit_interval_ms(first: dict[str, Any], then: dict[str, Any]) -> float:
    """From one event's commit to another's, on one clock: both `applied_ms` (one peer's
    apply times) where both have them, else both proposal times, never one of each."""
    if "applied_ms" in first and "applied_ms" in then:
        return float(then["applied_ms"]) - float(first["applied_ms"])
    return float(then["at_ms"]) - float(first["at_ms"])


def first_event(events: Iterable[dict[str, Any]], kind: str, after_ms: float, before_ms: float,
                nodes: Sequence[str] | None = None) -> dict[str, Any] | None:
    for event in ordered(events):
        if event["kind"] != kind or not after_ms <= event["at_ms"] < before_ms:
            continue
        if nodes is not None and _event_node(event) not in nodes:
            continue
        return event
    return None


def loadings(events: Sequence[dict[str, Any]], after_ms: float, before_ms: float) -> list[Loading]:
    """Each `load_started` in the window paired with the next end report for that (app, node)."""
    in_order = ordered(events)
    result = []
    for index, event in enumerate(in_order):
        if event["kind"] != "load_started" or not after_ms <= event["at_ms"] < before_ms:
            continue
        app, node = event.get("app", ""), _event_node(event) or ""
        end = next(
            (later for later in in_order[index + 1 :]
             if later["kind"] in LOAD_END_KINDS and later.get("app", "") == app and _event_node(later) == node
             and later["at_ms"] < before_ms),
            None,
        )
        if end is None:
            result.append(Loading(app, node, event["at_ms"], None, ""))
        else:
            result.append(Loading(app, node, event["at_ms"], end["at_ms"] - event["at_ms"], end["kind"]))
    return result


def served_by(operation: Operation) -> str:
    return operation.node or operation.target


def app_recovery(operations: Sequence[Operation], app: str, fault: FaultRecord, window_end_ms: float,
                 plan_at_ms: float | None, foreign: frozenset[str] = frozenset()) -> AppRecovery:
    """How the clients of `app` lived through `fault`, from their own records.

    `foreign` are nodes that other, overlapping faults touched (and this one did not): a
    request sent to one of them that failed is charged to that fault, not to this one.
    """
    applied = fault.applied_at_ms
    touched = set(fault.targets)
    window = sorted(
        (o for o in operations if o.app == app and o.end_ms >= applied and o.start_ms < window_end_ms),
        key=lambda o: (o.end_ms, o.index),
    )
    bad = [o for o in window if o.outcome != OK and o.target not in foreign]
    first_error_ms = bad[0].end_ms if bad else None
    starts = [t for t in (first_error_ms, plan_at_ms) if t is not None]
    reconfiguration_ms = None
    if starts:
        reconfiguration_from = min(starts)
        good = next((o for o in window if o.outcome == OK and o.end_ms >= reconfiguration_from
                     and served_by(o) not in touched), None)
        if good is not None:
            reconfiguration_ms = good.end_ms - reconfiguration_from
    recovered_at: list[float] = []
    disrupted = sorted({o.client for o in bad})
    recovered = True
    for client in disrupted:
        mine = [o for o in window if o.client == client]
        first_bad = next(o for o in mine if o.outcome != OK and o.target not in foreign)
        good = next((o for o in mine if o.outcome == OK and o.end_ms >= first_bad.end_ms
                     and served_by(o) not in touched), None)
        if good is None:
            recovered = False
        else:
            recovered_at.append(good.end_ms)
    mttr_ms = max(recovered_at) - applied if disrupted and recovered else None
    ok_ends = [o.end_ms for o in window if o.outcome == OK]
    outage_ms = None
    if window:
        last = min(window_end_ms, max(o.end_ms for o in window))
        marks = [applied, *ok_ends]
        if window[-1].outcome != OK:  # still failing when the window closed
            marks.append(last)
        outage_ms = max(b - a for a, b in itertools.pairwise(marks)) if len(marks) > 1 else 0.0
    return AppRecovery(
        app=app,
        operations=len(window),
        failed=sum(1 for o in bad if o.outcome == "fail"),
        unknown=sum(1 for o in bad if o.outcome == "info"),
        disrupted_clients=len(disrupted),
        reconfiguration_ms=reconfiguration_ms,
        mttr_ms=mttr_ms,
        outage_ms=outage_ms,
        recovered=recovered,
    )


def measure_fault(fault: FaultRecord, operations: Sequence[Operation], events: Sequence[dict[str, Any]],
                  window_end_ms: float = INFINITY_MS, foreign: frozenset[str] = frozenset()) -> FaultMeasurement:
    applied = fault.applied_at_ms
    targets = list(fault.targets)
    suspicion = first_event(events, "suspicion", applied, window_end_ms, targets)
    confirmation = first_event(events, "failure_confirmed", applied, window_end_ms, targets)
    plan = None
    if confirmation is not None:
        plan = first_event(events, "plan_committed", confirmation["at_ms"], window_end_ms)
    decision_ms = commit_interval_ms(confirmation, plan) if plan and confirmation else None
    loading = loadings(events, plan["at_ms"], window_end_ms) if plan else []
    apps = sorted({o.app for o in operations})
    recoveries = []
    for app in apps:
        app_plan = first_event(
            [e for e in events if e["kind"] == "plan_committed" and app in (e.get("changed_apps") or [app])],
            "plan_committed", applied, window_end_ms,
        )
        recoveries.append(app_recovery(operations, app, fault, window_end_ms,
                                       committed_ms(app_plan) if app_plan else None, foreign))
    charged = tuple(
        e for e in ordered(events)
        if applied <= e["at_ms"] < window_end_ms
        and e["kind"] in ("suspicion", "failure_confirmed", "plan_committed", "member_recovered", "member_rejoined",
                          "suspicion_withdrawn", "member_cleared", *LOAD_END_KINDS, "load_started")
    )
    return FaultMeasurement(
        fault_id=fault.fault_id, kind=fault.kind, description=fault.description, targets=fault.targets,
        applied_at_ms=applied, healed_at_ms=fault.healed_at_ms, window_end_ms=window_end_ms,
        detection_ms=suspicion["at_ms"] - applied if suspicion else None,
        confirmation_ms=committed_ms(confirmation) - applied if confirmation else None,
        decision_ms=decision_ms,
        plan_epoch=plan.get("epoch") if plan else None,
        loading=tuple(loading),
        apps=tuple(recoveries),
        events=charged,
    )


def measure(operations: Sequence[Operation], faults: Sequence[FaultRecord],
            events: Sequence[dict[str, Any]]) -> list[FaultMeasurement]:
    """One measurement per injected fault, in the order they were applied."""
    windows = fault_windows(faults)
    return [measure_fault(f, operations, events, windows[f.fault_id], overlapping_nodes(f, faults, windows[f.fault_id]))
            for f in sorted(faults, key=lambda f: (f.applied_at_ms, f.fault_id))]


def overlapping_nodes(fault: FaultRecord, faults: Sequence[FaultRecord], window_end_ms: float) -> frozenset[str]:
    """Nodes that other faults active during `fault`'s window touched, and `fault` did not."""
    nodes: set[str] = set()
    for other in faults:
        if other.fault_id == fault.fault_id:
            continue
        other_end = other.healed_at_ms if other.healed_at_ms is not None else INFINITY_MS
        if other.applied_at_ms < window_end_ms and other_end > fault.applied_at_ms:
            nodes.update(other.targets)
    return frozenset(nodes - set(fault.targets))


def response_times(operations: Sequence[Operation], start_ms: float) -> dict[str, list[tuple[float, float, str]]]:
    """app -> [(seconds since start, latency_ms, outcome)], the series behind the plot."""
    series: dict[str, list[tuple[float, float, str]]] = {}
    for operation in sorted(operations, key=lambda o: o.start_ms):
        series.setdefault(operation.app, []).append(
            ((operation.start_ms - start_ms) / 1000, operation.latency_ms, operation.outcome)
        )
    return series


def overhead(operations: Sequence[Operation], faults: Sequence[FaultRecord],
             settle_ms: float = 2000.0) -> dict[str, dict[str, Any]]:
    """Per app: ok latency before the first fault against after the last fault has settled."""
    if not faults:
        return {}
    first = min(f.applied_at_ms for f in faults)
    last = max((f.healed_at_ms or f.applied_at_ms) for f in faults) + settle_ms
    result = {}
    for app in sorted({o.app for o in operations}):
        before = [o.latency_ms for o in operations if o.app == app and o.outcome == OK and o.end_ms < first]
        after = [o.latency_ms for o in operations if o.app == app and o.outcome == OK and o.start_ms > last]
        entry: dict[str, Any] = {"before_ms": summary(before), "after_ms": summary(after)}
        if before and after:
            entry["p50_ratio"] = summary(after)["p50"] / summary(before)["p50"]
        result[app] = entry
    return result


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, dict) else getattr(record, name)


def distributions(measurements: Sequence[FaultMeasurement | dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """p50 / p99 / max of each metric over the faults of a run, or of many runs' saved reports
    (measurements as objects or as the dicts in report.json)."""
    values: dict[str, list[float]] = {"detection_ms": [], "confirmation_ms": [], "decision_ms": [],
                                      "loading_ms": [], "reconfiguration_ms": [], "mttr_ms": [], "outage_ms": []}
    for m in measurements:
        for name in ("detection_ms", "confirmation_ms", "decision_ms"):
            if _field(m, name) is not None:
                values[name].append(_field(m, name))
        values["loading_ms"] += [_field(load, "loading_ms") for load in _field(m, "loading")
                                 if _field(load, "loading_ms") is not None]
        for app in _field(m, "apps"):
            for name in ("reconfiguration_ms", "mttr_ms", "outage_ms"):
                if _field(app, name) is not None:
                    values[name].append(_field(app, name))
    return {name: summary(vals) for name, vals in values.items()}
