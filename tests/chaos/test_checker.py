"""The checker over synthetic runs: each invariant caught, clean runs left alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.chaos.checker import Expectations, check
from redge.chaos.measure import measure
from redge.chaos.testing import event, fault, op

PLAN_E1 = {"observed_at_ms": 500, "via": "n2", "epoch": 1,
           "plan": {"det": [{"node_id": "n1", "role": "primary"}, {"node_id": "n2", "role": "warm"}]}}
PLAN_E2 = {"observed_at_ms": 1500, "via": "n3", "epoch": 2,
           "plan": {"det": [{"node_id": "n2", "role": "primary"}, {"node_id": "n3", "role": "cold"}]}}
CLEAN_OPERATIONS = [op(100, node="n1", epoch=1), op(1000, "fail", latency_ms=5), op(1100, node="n2", epoch=2),
                    op(3000, node="n2", epoch=2)]
CLEAN_EVENTS = [event(1030, "suspicion", node="n1", observer="n2"),
                event(1040, "failure_confirmed", node="n1", observers=["n2", "n3"]),
                event(1050, "plan_committed", epoch=2)]


def invariants(**changes) -> list[str]:
    arguments = {"operations": CLEAN_OPERATIONS, "faults": [fault(990)], "events": CLEAN_EVENTS,
                 "plans": [PLAN_E1, PLAN_E2], "expect": Expectations()}
    arguments.update(changes)
    arguments["measurements"] = measure(arguments["operations"], arguments["faults"], arguments["events"])
    return [v.invariant for v in check(**arguments).violations]


def test_a_clean_failover_is_valid():
    assert invariants() == []


@pytest.mark.parametrize(
    "changes, expected",
    [
        # a node with no serving role in epoch 2 answered
        ({"operations": [*CLEAN_OPERATIONS, op(2000, node="n3", epoch=2)]}, ["two_primaries"]),
        # the warm backup answering in the primary's epoch is allowed
        ({"operations": [*CLEAN_OPERATIONS, op(1010, node="n2", epoch=1)]}, []),
        # a plan with two primaries
        ({"plans": [{**PLAN_E2, "plan": {"det": [{"node_id": "n2", "role": "primary"},
                                                 {"node_id": "n3", "role": "primary"}]}}]}, ["two_primaries"]),
        # two peers disagree on epoch 2's primary
        ({"plans": [PLAN_E2, {**PLAN_E2, "via": "n1", "plan": {"det": [{"node_id": "n3", "role": "primary"}]}}]},
         ["two_primaries"]),
        # one epoch committed twice
        ({"events": [*CLEAN_EVENTS, event(1300, "plan_committed", epoch=2)]}, ["two_primaries"]),
        # n3 confirmed failed though only n1 was touched
        ({"events": [*CLEAN_EVENTS, event(1200, "failure_confirmed", node="n3")]}, ["false_confirmation"]),
        # a confirmation before the fault happened is false too
        ({"events": [event(900, "failure_confirmed", node="n1"), *CLEAN_EVENTS]}, ["false_confirmation"]),
        # a slowed node is alive: confirming it is a false positive ...
        ({"faults": [fault(990), fault(990, ("n3",), kind="slow-node", fault_id=2)],
          "events": [*CLEAN_EVENTS, event(1200, "failure_confirmed", node="n3")]}, ["false_confirmation"]),
        # ... unless the scenario says degraded nodes may be confirmed
        ({"faults": [fault(990), fault(990, ("n3",), kind="slow-node", fault_id=2)],
          "events": [*CLEAN_EVENTS, event(1200, "failure_confirmed", node="n3")],
          "expect": Expectations(degraded_confirmation_ok=True)}, []),
        # an unknown outcome is a lost request, within the allowance it is not
        ({"operations": [*CLEAN_OPERATIONS, op(1000, "info", client=1)]}, ["lost_request"]),
        ({"operations": [*CLEAN_OPERATIONS, op(1000, "info", client=1)], "expect": Expectations(lost_requests_max=1)},
         []),
        # the app never answers again
        ({"operations": [op(100, node="n1", epoch=1), op(1000, "fail"), op(3000, "fail")]}, ["unrecovered"]),
        ({"operations": [op(100, node="n1", epoch=1), op(1000, "fail"), op(3000, "fail")],
          "expect": Expectations(recovered=False)}, []),
        # expectations a scenario may set
        ({"events": [], "expect": Expectations(confirmed=True)}, ["undetected"]),
        ({"expect": Expectations(confirmation_ms_max=20)}, ["slow_detection"]),
        ({"expect": Expectations(mttr_ms_max=100)}, ["slow_recovery"]),
        ({"expect": Expectations(failed_requests_max=0)}, ["failed_requests"]),
    ],
)
def test_each_broken_promise_is_reported(changes, expected):
    assert invariants(**changes) == expected


def test_a_partition_minority_may_be_confirmed_but_not_the_majority():
    partition = fault(1000, ("n3",), kind="partition")
    events = [event(1300, "failure_confirmed", node="n3")]
    assert invariants(faults=[partition], events=events) == []
    assert invariants(faults=[partition], events=[event(1300, "failure_confirmed", node="n2")]) == ["false_confirmation"]


def test_a_confirmation_long_after_the_heal_is_not_explained():
    crash = fault(1000, ("n1",), healed_at_ms=2000)
    late = [event(2000 + 15_001, "failure_confirmed", node="n1")]
    assert invariants(faults=[crash], events=late) == ["false_confirmation"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["n1", "n2", "n3"]), st.integers(1, 300)),
                min_size=1, max_size=40))
def test_all_ok_answers_without_faults_or_plans_are_valid(rows):
    operations = [op(t, node=n, latency_ms=lat) for t, n, lat in rows]
    result = check(operations, [], [], [], Expectations())
    assert result.valid and result.counts["ok"] == len(operations)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["ok", "fail", "info"])), max_size=40),
       st.integers(0, 5))
def test_lost_requests_are_flagged_exactly_above_the_allowance(rows, allowance):
    operations = [op(t, outcome) for t, outcome in rows]
    result = check(operations, [], [], [], Expectations(lost_requests_max=allowance, recovered=False))
    unknown = sum(1 for _, outcome in rows if outcome == "info")
    assert ("lost_request" in [v.invariant for v in result.violations]) == (unknown > allowance)


def test_a_restarted_node_confirmed_again_after_it_came_back_is_a_false_positive():
    crash = fault(1000, ("n1",), healed_at_ms=5000)
    first = event(1040, "failure_confirmed", seq=10, node="n1", incarnation=1)
    back = event(6000, "member_recovered", seq=20, node="n1", incarnation=2)
    again = event(7000, "failure_confirmed", seq=30, node="n1", incarnation=2)
    assert invariants(faults=[crash], events=[first, back]) == []
    assert invariants(faults=[crash], events=[first, back, again]) == ["false_confirmation"]
    # the old incarnation's confirmation, committed late, is still the crash's
    late_old = event(6500, "failure_confirmed", seq=25, node="n1", incarnation=1)
    assert invariants(faults=[crash], events=[first, back, late_old]) == []
