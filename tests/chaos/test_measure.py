"""Measurement over synthetic histories: the paper's metrics, table-driven and as properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.chaos.measure import (
    INFINITY_MS,
    app_recovery,
    distributions,
    fault_windows,
    loadings,
    measure,
    measure_fault,
    overhead,
)
from redge.chaos.testing import event, fault, op

# A crash of the primary n1 at t=1000; n2 is its warm backup.
CRASH = fault(1000, ("n1",))
EVENTS = [
    event(1030, "suspicion", node="n1", observer="n2"),
    event(1045, "suspicion", node="n1", observer="n3"),
    event(1045, "failure_confirmed", node="n1", observers=["n2", "n3"], first_suspicion_at_ms=1030),
    event(1060, "plan_committed", epoch=2, changed_apps=["det"]),
    event(1070, "load_started", node="n3", app="det"),
    event(1220, "load_done", node="n3", app="det"),
    event(1070, "load_started", node="n2", app="other"),
]


@pytest.mark.parametrize(
    "events, detection, confirmation, decision, epoch",
    [
        (EVENTS, 30, 45, 15, 2),
        ([], None, None, None, None),
        # suspicions of another node, or before the fault, are not this fault's
        ([event(900, "suspicion", node="n1"), event(1100, "suspicion", node="n2")], None, None, None, None),
        # confirmed but no plan yet: no decision time
        (EVENTS[:3], 30, 45, None, None),
        # a plan committed before the confirmation is not the decision
        ([event(1010, "plan_committed", epoch=2), *EVENTS[:3]], 30, 45, None, None),
    ],
)
def test_detection_confirmation_and_decision(events, detection, confirmation, decision, epoch):
    m = measure_fault(CRASH, [], events)
    assert (m.detection_ms, m.confirmation_ms, m.decision_ms, m.plan_epoch) == (detection, confirmation, decision, epoch)


def test_confirmation_and_decision_are_commit_times_where_the_log_has_them():
    """A confirmation proposed at 1045 but committed at 1052, and a plan proposed at 1060 and
    committed at 1064: detection to the committed confirmation is 52, the decision 12."""
    committed = [dict(e) for e in EVENTS]
    committed[2]["applied_ms"] = 1052.0
    committed[3]["applied_ms"] = 1064.0
    m = measure_fault(CRASH, [], committed)
    assert (m.detection_ms, m.confirmation_ms, m.decision_ms) == (30, 52, 12)
    without = [dict(e) for e in EVENTS]
    without[3]["applied_ms"] = 1064.0  # the confirmation's commit unknown: proposal times for both
    assert measure_fault(CRASH, [], without).decision_ms == 15


def test_loading_pairs_each_start_with_its_own_end():
    loads = {(x.app, x.node): x for x in loadings(EVENTS, 1060, INFINITY_MS)}
    assert loads[("det", "n3")].loading_ms == 150 and loads[("det", "n3")].ended_by == "load_done"
    assert loads[("other", "n2")].loading_ms is None  # never finished


@pytest.mark.parametrize(
    "operations, plan_at, reconfiguration, mttr, recovered, failed, unknown",
    [
        # client 0 on n1 fails at 1005 (refused), then n2 answers at 1040: 35 ms to reconfigure
        ([op(900, node="n1"), op(1000, "fail", latency_ms=5), op(1030, node="n2")], None, 35, 40, True, 1, 0),
        # the plan at 1020 comes after the first error: the error starts the clock
        ([op(1000, "fail", latency_ms=5), op(1030, node="n2")], 1020, 35, 40, True, 1, 0),
        # no client error: the plan starts the clock
        ([op(1000, node="n2"), op(1100, node="n2")], 1050, 60, None, True, 0, 0),
        # an ok answer from the crashed node itself does not count as recovered
        ([op(1000, "info", latency_ms=50), op(1060, node="n1"), op(1100, node="n2")], None, 60, 110, True, 0, 1),
        # never answered again: not recovered, no MTTR
        ([op(1000, "fail"), op(1100, "fail")], None, None, None, False, 2, 0),
    ],
)
def test_app_recovery(operations, plan_at, reconfiguration, mttr, recovered, failed, unknown):
    r = app_recovery(operations, "det", CRASH, INFINITY_MS, plan_at)
    assert (r.reconfiguration_ms, r.mttr_ms, r.recovered, r.failed, r.unknown) == (
        reconfiguration, mttr, recovered, failed, unknown)


def test_mttr_waits_for_the_last_disrupted_client():
    operations = [
        op(1000, "fail", client=0, latency_ms=5), op(1010, client=0, node="n2"),
        op(1000, "info", client=1, latency_ms=500), op(1500, client=1, node="n3"),
        op(1000, client=2, node="n3"),  # never disrupted
    ]
    r = app_recovery(operations, "det", CRASH, INFINITY_MS, None)
    assert r.disrupted_clients == 2
    assert r.mttr_ms == 510
    assert r.outage_ms == 490  # ok answers end at 1010, 1020 and 1510


def test_outage_runs_to_the_end_when_the_app_never_answers_again():
    operations = [op(990, node="n2"), op(1000, "fail", latency_ms=5), op(2000, "fail", latency_ms=5)]
    assert app_recovery(operations, "det", CRASH, INFINITY_MS, None).outage_ms == 1005


def test_a_fault_window_ends_at_the_next_fault_on_the_same_node():
    first, other, second = fault(1000, ("n1",), fault_id=1), fault(1500, ("n2",), fault_id=2), fault(3000, ("n1",), fault_id=3)
    assert fault_windows([first, other, second]) == {1: 3000, 2: INFINITY_MS, 3: INFINITY_MS}
    events = [event(3050, "suspicion", node="n1")]
    measured = measure([], [first, other, second], events)
    assert [m.detection_ms for m in measured] == [None, None, 50]


def test_overhead_compares_before_the_first_fault_with_after_the_last():
    operations = [op(t, latency_ms=10) for t in range(0, 1000, 100)] + [op(t, latency_ms=15) for t in range(5000, 6000, 100)]
    result = overhead(operations, [fault(1000, healed_at_ms=2000)], settle_ms=1000)
    assert result["det"]["before_ms"]["p50"] == 10 and result["det"]["after_ms"]["p50"] == 15
    assert result["det"]["p50_ratio"] == pytest.approx(1.5)


def test_distributions_skip_metrics_that_did_not_happen():
    measured = measure([], [fault(1000), fault(5000, ("n2",), fault_id=2)], EVENTS)
    summary = distributions(measured)
    assert summary["detection_ms"]["count"] == 1
    assert summary["mttr_ms"] == {"count": 0}


# ---------------------------------------------------------------------- properties

outcomes = st.sampled_from(["ok", "ok", "ok", "fail", "info"])
operation_lists = st.lists(
    st.tuples(st.integers(0, 5000), outcomes, st.integers(0, 3), st.sampled_from(["n1", "n2", "n3"]),
              st.integers(1, 500)),
    max_size=60,
).map(lambda rows: [op(t, o, client=c, node=n, latency_ms=lat) for t, o, c, n, lat in rows])


@settings(max_examples=200, deadline=None)
@given(operation_lists, st.integers(0, 5000))
def test_recovery_numbers_are_consistent(operations, applied_at):
    crash = fault(applied_at, ("n1",))
    r = app_recovery(operations, "det", crash, INFINITY_MS, None)
    window = [o for o in operations if o.end_ms >= applied_at]
    assert r.failed + r.unknown <= r.operations == len(window)
    assert (r.disrupted_clients == 0) == (r.failed + r.unknown == 0)
    if r.mttr_ms is not None:
        assert r.mttr_ms >= 0 and r.recovered and r.disrupted_clients > 0
        # MTTR ends on an ok answer from an untouched node that really is in the history
        assert any(o.outcome == "ok" and o.node != "n1" and math.isclose(o.end_ms, applied_at + r.mttr_ms)
                   for o in window)
    if r.reconfiguration_ms is not None:
        assert r.reconfiguration_ms >= 0
    if r.outage_ms is not None:
        assert r.outage_ms >= 0


@settings(max_examples=100, deadline=None)
@given(operation_lists, st.integers(0, 5000))
def test_measurement_does_not_depend_on_record_order(operations, applied_at):
    crash = fault(applied_at, ("n1",))
    forward = measure(operations, [crash], EVENTS)
    backward = measure(list(reversed(operations)), [crash], list(reversed(EVENTS)))
    assert forward == backward


def test_distributions_read_saved_reports_too():
    measured = measure([op(1000, "fail", latency_ms=5), op(1030, node="n2")], [fault(1000)], EVENTS)
    assert distributions([m.to_dict() for m in measured]) == distributions(measured)


def test_overlapping_faults_are_charged_for_their_own_nodes_only():
    crash_n1 = fault(1000, ("n1",), fault_id=1, healed_at_ms=5000)
    hang_n3 = fault(2000, ("n3",), kind="hang", fault_id=2, healed_at_ms=5000)
    operations = [
        op(1000, "fail", client=0, target="n1", node=None, latency_ms=5), op(1010, client=0, node="n2"),
        op(2000, "info", client=1, target="n3", node=None, latency_ms=2000), op(4000, client=1, node="n2"),
    ]
    crash, hang = measure(operations, [crash_n1, hang_n3], [])
    assert (crash.apps[0].disrupted_clients, crash.apps[0].mttr_ms, crash.apps[0].unknown) == (1, 20, 0)
    assert (hang.apps[0].disrupted_clients, hang.apps[0].mttr_ms, hang.apps[0].failed) == (1, 2010, 0)
