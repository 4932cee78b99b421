"""The runner's offline half: a saved run is measured and checked again from its files."""

from __future__ import annotations

import json
from dataclasses import asdict

from redge.chaos.checker import Expectations
from redge.chaos.history import History
from redge.chaos.report import detection_summary
from redge.chaos.runner import main, recheck
from redge.chaos.testing import event, fault, op


def saved_run(directory, expect: Expectations) -> None:
    operations = [op(900, node="n1"), op(1000, "fail", target="n1", node=None, latency_ms=5), op(1030, node="n2"),
                  op(2500, node="n2")]
    History.of(operations).write_jsonl(directory / "history.jsonl")
    report = {
        "scenario": {"name": "saved", "seed": 3, "profile": "enterprise", "mode": "loopback", "peers": 3,
                     "expect": asdict(expect)},
        "started_at_ms": 900.0, "ended_at_ms": 2600.0,
        "faults": [fault(1000, ("n1",)).to_dict()],
        "events": [event(1030, "suspicion", node="n1", observer="n2"),
                   event(1040, "failure_confirmed", node="n1", observers=["n2", "n3"])],
        "plans": [],
    }
    (directory / "report.json").write_text(json.dumps(report))


def test_recheck_measures_a_saved_run_and_rewrites_its_report(tmp_path):
    saved_run(tmp_path, Expectations(confirmed=True))
    report = recheck(tmp_path, quiet=True)
    assert report["check"]["valid"]
    [crash] = report["measurements"]
    assert (crash["detection_ms"], crash["confirmation_ms"], crash["apps"][0]["mttr_ms"]) == (30, 40, 40)
    saved = json.loads((tmp_path / "report.json").read_text())["measurements"]
    assert saved == json.loads(json.dumps(report["measurements"]))
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert [row["source"] for row in report["timeline"]][:1] == ["nemesis"]


def test_recheck_exit_status_follows_the_checker(tmp_path):
    saved_run(tmp_path, Expectations(mttr_ms_max=10))
    assert main(["--recheck", str(tmp_path), "--quiet"]) == 1
    saved_run(tmp_path, Expectations())
    assert main(["--recheck", str(tmp_path), "--quiet"]) == 0


def test_a_bad_scenario_exits_2_with_the_reason(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\npeers = 0\n')
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "peers must be 1..9" in capsys.readouterr().err


def test_detection_summary_counts_suspicions_and_confirmations_of_the_whole_run():
    report = {
        "started_at_ms": 1000.0,
        "events": [
            event(500, "suspicion", node="n1", observer="n2", reason="silent"),  # while the apps load
            event(1100, "suspicion", node="n1", observer="n2", reason="phi"),
            event(1105, "suspicion", node="n1", observer="n3", reason="phi"),
            event(1106, "failure_confirmed", node="n1", observers=["n2", "n3"]),
            event(2000, "suspicion", node="n3", observer="n1", reason="unreachable"),
        ],
        "peer_metrics": {
            "n1": {"redge_heartbeat_send_gap_ms_max": 140.0, "redge_detector_phi_max": 2.5,
                   'redge_elections_hastened_total{why="quiet"}': 1.0, "redge_raft_leader_changes_total": 3.0},
            "n2": {"redge_heartbeat_send_gap_ms_max": 30.0, "redge_detector_phi_max": 6.0,
                   "redge_detector_self_pause_ms_max": 45.0, 'redge_elections_hastened_total{why="quiet"}': 2.0,
                   'redge_elections_hastened_total{why="suspected"}': 1.0, "redge_raft_leader_changes_total": 4.0},
        },
    }
    summary = detection_summary(report)
    assert summary["suspicions"] == 4
    assert summary["suspicions_by_reason"] == {"phi": 2, "silent": 1, "unreachable": 1}
    assert summary["suspicions_by_node"] == {"n1": 3, "n3": 1}
    assert (summary["confirmations"], summary["confirmed_nodes"]) == (1, ["n1"])
    assert (summary["send_gap_ms_max"], summary["phi_max"], summary["self_pause_ms_max"]) == (140.0, 6.0, 45.0)
    assert (summary["elections_hastened_quiet"], summary["elections_hastened_suspected"]) == (3.0, 1.0)
    assert summary["leader_changes_max"] == 4.0
    assert detection_summary({"started_at_ms": 0.0, "events": []})["phi_max"] is None
