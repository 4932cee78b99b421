"""The paper's experiments (chaos/paper.py): the table arithmetic as table tests, and one
short real run of Fig. 3 on loopback with the small MLP family."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from redge.chaos import paper
from redge.chaos.history import FAIL, OK, Operation

METRICS_PAGE = """\
# HELP redge_inference_seconds Time to run one inference on this peer (model host round trip)
# TYPE redge_inference_seconds histogram
redge_inference_seconds_bucket{app="a",le="0.001"} 0.0
redge_inference_seconds_count{app="a"} 4.0
redge_inference_seconds_sum{app="a"} 0.2
redge_inference_seconds_count{app="b-1"} 1.0
redge_inference_seconds_sum{app="b-1"} 0.05
redge_inference_seconds_created{app="a"} 1.7e9
redge_model_seconds_count{app="a"} 4.0
redge_model_seconds_sum{app="a"} 0.1
redge_forwards_total{outcome="ok"} 3.0
"""


def operation(app: str, start_ms: float, latency_ms: float, outcome: str = OK, node: str = "n1") -> Operation:
    return Operation(index=0, client=0, kind="infer", app=app, target=node, start_ms=start_ms,
                     end_ms=start_ms + latency_ms, latency_ms=latency_ms, outcome=outcome, node=node)


def test_inference_totals_reads_sum_and_count_per_app_and_nothing_else():
    assert paper.inference_totals(METRICS_PAGE) == {"a": (0.2, 4.0), "b-1": (0.05, 1.0)}
    assert paper.inference_totals(METRICS_PAGE, paper.MODEL_METRIC) == {"a": (0.1, 4.0)}
    assert paper.inference_totals("") == {}


@pytest.mark.parametrize(
    "before, after, expected_ms",
    [
        ({"a": (1.0, 10.0)}, {"a": (1.5, 15.0)}, 100.0),
        ({}, {"a": (0.3, 3.0)}, 100.0),  # a series that did not exist yet counts from zero
        ({"a": (1.0, 10.0)}, {"a": (1.0, 10.0)}, None),  # nothing ran in the window
        ({"a": (1.0, 10.0)}, {}, None),  # the peer did not answer afterwards
    ],
)
def test_server_mean_is_the_difference_of_two_readings(before, after, expected_ms):
    result = paper.server_mean_ms(before, after, "a")
    assert result == (pytest.approx(expected_ms) if expected_ms is not None else None)


@pytest.mark.parametrize(
    "before, after, expected",
    [(100.0, 117.2, 17.2), (100.0, 88.2, -11.8), (0.0, 5.0, None), (None, 5.0, None), (5.0, None, None),
     (math.nan, 5.0, None)],
)
def test_percent_change(before, after, expected):
    result = paper.percent_change(before, after)
    assert result == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    "values, expected",
    [([10.0, 10.0, 10.0], 0.0), ([1.0, 3.0], math.sqrt(2) / 2), ([5.0], None), ([], None), ([0.0, 0.0], None)],
)
def test_coefficient_of_variation_is_sample_stdev_over_mean(values, expected):
    result = paper.coefficient_of_variation(values)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_fig3_row_splits_response_into_inference_and_network():
    row = paper.fig3_row("resnet18", [40.0, 50.0, 60.0], [30.0, 40.0])
    assert row["requests"] == 3
    assert row["response_ms"]["p50"] == 50.0
    assert row["inference_ms_mean"] == pytest.approx(35.0)
    assert row["network_ms_mean"] == pytest.approx(15.0)
    empty = paper.fig3_row("x", [], [])
    assert empty["inference_ms_mean"] is None and empty["network_ms_mean"] is None and empty["requests"] == 0


def test_fig3_compare_gives_iobt_over_enterprise_per_model():
    enterprise = {"rows": [paper.fig3_row("m", [10.0, 10.0], [8.0]), paper.fig3_row("only-here", [1.0], [1.0])]}
    iobt = {"rows": [paper.fig3_row("m", [50.0, 50.0], [40.0])]}
    (row,) = paper.fig3_compare(enterprise, iobt)
    assert row["model"] == "m"
    assert row["inference_percent"] == pytest.approx(400.0)  # 8 -> 40 ms
    assert row["network_percent"] == pytest.approx(400.0)  # 2 -> 10 ms
    assert row["response_p50_percent"] == pytest.approx(400.0)


def test_fig4_rows_pool_phases_and_take_per_round_ratios():
    rounds = [
        {"isolated": {"a": {"latencies_ms": [10.0, 10.0], "server_ms": 8.0, "model_ms": 5.0}},
         "colocated": {"a": {"latencies_ms": [12.0, 12.0], "server_ms": 10.0, "model_ms": 6.0}}},
        {"isolated": {"a": {"latencies_ms": [20.0], "server_ms": 16.0}},
         "colocated": {"a": {"latencies_ms": [30.0], "server_ms": None}}},
    ]
    (row,) = paper.fig4_rows(rounds)
    assert row["model"] == "a"
    assert row["isolated_ms"]["count"] == 3 and row["colocated_ms"]["count"] == 3
    # pooled means: 40/3 against 54/3
    assert row["response_mean_increase_percent"] == pytest.approx(35.0)
    # server means: (8+16)/2 = 12 against 10 (the round without a reading is left out)
    assert row["inference_mean_increase_percent"] == pytest.approx(-100 / 6)
    assert row["response_increase_percent_per_round"]["count"] == 2
    assert row["response_increase_percent_per_round"]["max"] == pytest.approx(50.0)
    assert row["inference_increase_percent_per_round"]["count"] == 1
    assert row["model_mean_increase_percent"] == pytest.approx(20.0)  # only where the peer reports it


def test_fig5bc_row_compares_before_the_fault_with_after_it_settled():
    operations = [
        operation("app1", 0, 100.0), operation("app1", 500, 100.0),
        operation("app2", 0, 200.0, node="n2"), operation("app2", 900, 5.0, FAIL, node="n2"),
        # inside the settle window: neither before nor after
        operation("app1", 1500, 999.0), operation("app2", 1500, 999.0),
        operation("app1", 4000, 110.0), operation("app2", 4000, 176.0),
    ]
    servers = {"app1": {"before": 90.0, "after": 99.0}, "app2": {"before": 180.0, "after": None}}
    row = paper.fig5bc_row("heterogeneous", operations, fault_ms=1000, settle_ms=2000, servers=servers)
    assert row["backup"] == "heterogeneous"
    assert row["app1"]["before_ms"]["count"] == 2 and row["app1"]["after_ms"]["count"] == 1
    assert row["app1"]["response_mean_percent"] == pytest.approx(10.0)
    assert row["app2"]["before_ms"]["count"] == 1  # the failed call is not a response time
    assert row["app2"]["response_mean_percent"] == pytest.approx(-12.0)
    assert row["app1"]["inference_percent"] == pytest.approx(10.0)
    assert row["app2"]["inference_percent"] is None


def test_fig5bc_summary_takes_the_median_change_over_trials_per_backup_and_app():
    def trial(backup: str, app1: float | None, app2: float) -> dict:
        entry = {"response_p50_percent": None}
        return {"backup": backup,
                "app1": dict(entry, response_mean_percent=app1, inference_percent=app1),
                "app2": dict(entry, response_mean_percent=app2, inference_percent=app2)}

    rows = [trial("homogeneous", 10.0, 20.0), trial("homogeneous", None, 30.0), trial("homogeneous", 5.0, 10.0),
            trial("heterogeneous", 8.0, -12.0)]
    summary = {(e["backup"], e["app"]): e for e in paper.fig5bc_summary(rows)}
    assert summary[("homogeneous", "app2")]["response_mean_percent"]["p50"] == 20.0
    assert summary[("homogeneous", "app1")]["response_mean_percent"]["count"] == 2  # a trial without a value
    assert summary[("homogeneous", "app1")]["trials"] == 3
    assert summary[("heterogeneous", "app2")]["inference_percent"]["p50"] == -12.0
    assert summary[("heterogeneous", "app1")]["response_p50_percent"] == {"count": 0}


def _replica(node: str, variant: str, role: str) -> dict[str, str]:
    return {"node_id": node, "variant": variant, "role": role}


@pytest.mark.parametrize(
    "plan, as_paper",
    [
        ({"app1": [_replica("n1", "r", "primary"), _replica("n2", "r", "warm")],
          "app2": [_replica("n2", "e", "primary"), _replica("n1", "e0", "warm")]}, True),
        ({"app1": [_replica("n1", "r", "primary")],
          "app2": [_replica("n2", "e", "primary"), _replica("n1", "e", "warm")]}, True),
        # APP2's backup is not beside APP1: failing over would not co-locate them
        ({"app1": [_replica("n1", "r", "primary")],
          "app2": [_replica("n2", "e", "primary"), _replica("n3", "e", "warm")]}, False),
        ({"app1": [_replica("n1", "r", "primary")], "app2": [_replica("n2", "e", "primary")]}, False),
        ({}, False),
    ],
)
def test_fig5bc_layout_recognises_the_papers_crossed_backups(plan, as_paper):
    layout = paper.fig5bc_layout({"plan": plan})
    assert layout["as_paper"] is as_paper
    if as_paper:
        assert (layout["A"], layout["B"], layout["app2_backup_node"]) == ("n2", "n1", "n1")


def test_fig5a_run_row_takes_the_crash_and_the_backups_first_serving_event():
    report = {
        "scenario": {"seed": 51},
        "check": {"valid": True},
        "measurements": [
            {"kind": "delay", "applied_at_ms": 0, "confirmation_ms": None, "apps": [], "targets": ["n1"]},
            {"kind": "crash", "applied_at_ms": 1000.0, "targets": ["n1"], "detection_ms": 500.0,
             "confirmation_ms": 510.0, "decision_ms": 120.0,
             "apps": [{"reconfiguration_ms": 30.0, "mttr_ms": None, "outage_ms": 900.0, "unknown": 1}]},
        ],
        "events": [
            {"kind": "serving", "at_ms": 1400.0, "node": "n2"},  # before the confirmation
            {"kind": "serving", "at_ms": 1700.0, "node": "n1"},  # the crashed node, restarted
            {"kind": "serving", "at_ms": 1650.0, "node": "n2"},
        ],
    }
    row = paper.fig5a_run_row(report)
    assert row["recovery_ms"] == pytest.approx(140.0)
    assert (row["detection_ms"], row["decision_ms"], row["outage_ms"], row["unknown"]) == (500.0, 120.0, 900.0, 1)
    assert row["mttr_ms"] is None and row["valid"] is True


def test_markdown_table_formats_missing_values_as_a_dash():
    table = paper.markdown_table(("a", "b"), [(1.234, None), ("x", math.nan)])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1.2 | - |", "| x | - |"]


def test_the_fig5a_scenario_survives_the_toml_round_trip_used_for_its_enterprise_variant():
    data = tomllib.loads(paper.SCENARIO_FIG5A.read_text())
    assert tomllib.loads(paper._toml(data)) == data
    assert data["profile"] == "iobt" and data["mode"] == "netns"
    assert any(f["kind"] == "crash" and f["node"].startswith("primary:") for f in data["faults"])


def test_quick_settings_are_smaller_in_every_dimension():
    full, quick = paper.Settings(), paper.Settings.quick()
    assert quick.rounds < full.rounds and quick.requests_per_model < full.requests_per_model
    assert quick.window_s < full.window_s and quick.fig5a_repeat <= full.fig5a_repeat


@pytest.mark.cluster
def test_fig3_through_a_real_peer_gives_a_row_per_model(tmp_path: Path):
    from redge.runtime.testing import write_family

    source = tmp_path / "source"
    source.mkdir()
    write_family(source, formats=("onnx",))
    models = ("mlp-large", "mlp-small")
    settings = paper.Settings(rounds=1, requests_per_model=4)
    result = paper.fig3(paper.PROFILES["enterprise"], settings, source, tmp_path / "scratch", models=models)
    assert result["figure"] == "fig3" and result["degraded_by"] == []
    assert [row["model"] for row in result["rows"]] == list(models)
    for row in result["rows"]:
        assert row["requests"] == 4 and row["failed"] == 0
        assert 0 < row["inference_ms_mean"] <= row["response_ms"]["mean"]
        assert row["network_ms_mean"] >= 0
    markdown = paper.fig3_markdown(result)
    assert markdown.count("\n") == 1 + len(models) and "mlp-small" in markdown
