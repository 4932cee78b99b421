"""The data plane's pure parts: the bytes-held budget and the routing table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redge.agent import routes
from redge.agent.dataplane import BodyBudget, WorkerConfig, parse_range
from redge.consensus import commands as c
from redge.consensus.state import ClusterState


def test_the_budget_is_all_or_nothing_and_counts_refusals():
    budget = BodyBudget(100)
    assert budget.reserve(60) and not budget.reserve(41) and budget.reserve(40)
    assert (budget.held_bytes, budget.refused) == (100, 1)
    budget.release(60)
    assert budget.reserve(50) and budget.held_bytes_peak == 100


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 50)), max_size=200))
def test_the_budget_never_holds_more_than_its_bound(operations):
    budget = BodyBudget(120)
    held: list[int] = []
    for reserve, size in operations:
        if reserve:
            if budget.reserve(size):
                held.append(size)
        elif held:
            budget.release(held.pop())
        assert 0 <= budget.held_bytes == sum(held) <= 120


def test_a_worker_config_survives_its_trip_through_stdin():
    config = WorkerConfig(node_id="n1", index=2, listen_fd=5, channel_fd=6, control_address="\0x", control_token="ab",
                          store_dir="/s", storage_budget_bytes=1, request_body_bytes_max=2, request_bytes_held_max=3,
                          dynamic_dimension_max=4, request_timeout_s=5.0, forward_timeout_s=2.0)
    assert WorkerConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [("bytes=0-9", 100, (0, 10)), ("bytes=90-", 100, (90, 100)), ("bytes=-10", 100, (90, 100)),
     ("bytes=100-", 100, None), ("bytes=5-2", 100, None), ("bytes=0-1,4-5", 100, None), ("items=0-1", 100, None)],
)
def test_ranges(header, size, expected):
    assert parse_range(header, size) == expected


def cluster_with_plan() -> ClusterState:
    state = ClusterState()
    for index, node in enumerate(("n1", "n2", "n3")):
        state.apply(c.Join(node, f"127.0.0.1:810{index}", f"127.0.0.1:910{index}", f"127.0.0.1:710{index}", 1, 0))
    state.apply(c.RegisterApp("det", ("big", "small"), "critical", 150.0, "warm", 0))
    state.apply(c.CommitPlan(1, (c.AppPlacement("det", (c.Replica("n2", "big", "primary"), c.Replica("n3", "small", "warm"),
                                                        c.Replica("n1", "small", "cold"))),), "n1", "test", 0))
    return state


def test_the_view_names_the_primary_and_the_order_to_forward_in():
    state = cluster_with_plan()
    here = routes.cluster_view(state, "n1")
    assert here["apps"]["det"]["primary_here"] is False
    assert [target[0] for target in here["apps"]["det"]["targets"]] == ["n2", "n3"]  # primary, then warm
    assert here["apps"]["det"]["servable"] is False  # nobody reported loaded yet
    state.apply(c.Report("n3", "load_done", 0, app="det", variant="small", epoch=1))
    assert routes.cluster_view(state, "n2")["apps"]["det"] == {
        "slo_ms": 150.0, "variants": ["big", "small"], "primary_here": True, "planned_here": True,
        "targets": [["n3", "127.0.0.1:8102", "warm", "small"]], "servable": True,
        "loading_on": ["n2"],  # the primary has not reported its copy loaded
        "interim": [],  # servable: nothing interim
        "failing_over": False,
    }


@pytest.mark.parametrize(
    ("reports", "down", "loading_on", "servable"),
    [
        ({}, (), ["n2", "n3"], False),  # a plan just committed: every serving role still to load
        ({"n2": "load_started"}, (), ["n2", "n3"], False),
        ({"n2": "load_started", "n3": "load_failed"}, (), ["n2"], False),  # a failed load is not recovering
        ({"n2": "serving"}, (), ["n3"], True),
        ({"n2": "serving", "n3": "load_done"}, (), [], True),
        ({"n2": "load_started"}, ("n2",), ["n3"], False),  # a node that is down loads nothing
        ({"n2": "load_failed", "n3": "load_failed"}, (), [], False),  # nothing to wait for: fail at once
        ({"n1": "load_started"}, (), ["n2", "n3"], False),  # a cold backup does not serve
    ],
)
def test_an_app_is_recovering_while_a_planned_replica_loads(reports, down, loading_on, servable):
    state = cluster_with_plan()
    for node, kind in reports.items():
        state.apply(c.Report(node, kind, 0, app="det", variant="big" if node == "n2" else "small", epoch=1))
    for node in down:
        state.members[node].status = "failed"
    view = routes.cluster_view(state, "n1")["apps"]["det"]
    assert (view["loading_on"], view["servable"]) == (loading_on, servable)
    assert view["failing_over"] is ("n2" in down)  # n2 is the plan's primary


def test_the_table_carries_what_is_loaded_here_and_where_the_host_listens():
    view = routes.cluster_view(cluster_with_plan(), "n2")
    local = routes.LocalModel("det", "det:big:1", "big", "1", "onnx", "primary",
                              ({"name": "input", "datatype": "FP32", "shape": [-1, 16]},), ())
    table = routes.route_table(view, [local], ready=(True, "ready"), host=("\0h", b"\x01\x02"))
    assert table["type"] == "routes" and table["epoch"] == 1
    assert table["local"]["det"]["key"] == "det:big:1" and table["host"] == {"address": "\0h", "token": "0102"}
    assert table["ready"] == [True, "ready"]
    assert routes.route_table(view, [], ready=(False, "starting"), host=None)["host"] is None


def cluster_with_family() -> ClusterState:
    """det (big, small) with a cold backup only; lite runs small on n2 (primary) and n3
    (warm); vision runs big on n3."""
    state = ClusterState()
    for index, node in enumerate(("n1", "n2", "n3")):
        state.apply(c.Join(node, f"127.0.0.1:810{index}", f"127.0.0.1:910{index}", f"127.0.0.1:710{index}", 1, 0))
    state.apply(c.RegisterApp("det", ("big", "small"), "standard", 150.0, "cold", 0))
    state.apply(c.RegisterApp("lite", ("small",), "standard", 150.0, "warm", 0))
    state.apply(c.RegisterApp("vision", ("huge", "big"), "standard", 150.0, "cold", 0))
    state.apply(c.CommitPlan(1, (
        c.AppPlacement("det", (c.Replica("n1", "big", "primary"), c.Replica("n2", "big", "cold"))),
        c.AppPlacement("lite", (c.Replica("n2", "small", "primary"), c.Replica("n3", "small", "warm"))),
        c.AppPlacement("vision", (c.Replica("n3", "big", "primary"),)),
    ), "n1", "test", 0))
    for app, node, variant in (("lite", "n2", "small"), ("lite", "n3", "small"), ("vision", "n3", "big")):
        state.apply(c.Report(node, "serving", 0, app=app, variant=variant, epoch=1))
    return state


@pytest.mark.parametrize(
    ("det_loaded", "down", "expected"),
    [
        # det's own primary is not loaded: the same variant elsewhere first, then smaller ones,
        # among equals a warm copy before another app's primary.
        (False, (), [["n3", "127.0.0.1:8102", "vision", "big"], ["n3", "127.0.0.1:8102", "lite", "small"],
                     ["n2", "127.0.0.1:8101", "lite", "small"]]),
        (True, (), []),  # servable: nothing interim
        (False, ("n3",), [["n2", "127.0.0.1:8101", "lite", "small"]]),  # only live nodes
        (False, ("n2", "n3"), []),
    ],
)
def test_interim_copies_are_the_apps_own_variants_loaded_for_other_apps(det_loaded, down, expected):
    state = cluster_with_family()
    if det_loaded:
        state.apply(c.Report("n1", "serving", 0, app="det", variant="big", epoch=1))
    for node in down:
        state.members[node].status = "failed"
    assert routes.interim_targets(state, "det") == expected


def test_no_interim_copy_is_larger_than_the_planned_variant():
    state = cluster_with_family()
    # det's plan names its smaller variant: vision's copy of big is larger, never used for it.
    state.apply(c.CommitPlan(2, (
        c.AppPlacement("det", (c.Replica("n1", "small", "primary"),)),
        c.AppPlacement("lite", (c.Replica("n2", "small", "primary"), c.Replica("n3", "small", "warm"))),
        c.AppPlacement("vision", (c.Replica("n3", "big", "primary"),)),
    ), "n1", "test", 0))
    assert [target[2:] for target in routes.interim_targets(state, "det")] == [["lite", "small"], ["lite", "small"]]
