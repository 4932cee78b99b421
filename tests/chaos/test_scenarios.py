"""Shipped scenarios end to end on real peers: each run must pass its own checker.

Short on purpose (about 20 s each): crash and leader-kill on loopback, partition in network
namespaces (skipped, with the reason, where there is no root or no nftables),
primary-crash, the inference path with every metric (about 35 s), and hostile-short, every
attack at once (about 60 s, root). The 10-minute soaks (soak, soak-iobt) and the long
hostile and random-storm runs are run by hand: docs/chaos.md.
"""

from __future__ import annotations

import pytest

from redge.chaos.runner import run_scenario
from redge.chaos.scenario import load_scenario

pytestmark = pytest.mark.cluster


def run_unchecked(name: str, out) -> dict:
    reason = load_scenario(name).unavailable_reason()
    if reason:
        pytest.skip(f"{name}: {reason}")
    return run_scenario(name, out, quiet=True)


def run(name: str, out, report: dict | None = None) -> dict:
    """Run a scenario (or take a run's `report`) and assert it passed its checker."""
    report = report if report is not None else run_unchecked(name, out)
    assert report["check"]["valid"], report["check"]["violations"]
    assert report["errors"] == []
    assert (out / "report.json").exists() and (out / "timeline.png").exists() and (out / "history.jsonl").exists()
    return report


def only_fault(report: dict) -> dict:
    assert len(report["measurements"]) == 1
    return report["measurements"][0]


def test_crash_of_a_follower_is_confirmed_and_clients_recover(tmp_path):
    report = run("crash", tmp_path)
    crash = only_fault(report)
    assert crash["kind"] == "crash" and crash["confirmation_ms"] is not None
    assert crash["detection_ms"] <= crash["confirmation_ms"]
    assert report["check"]["counts"]["ok"] > 100


def test_leader_kill_is_confirmed_and_commits_resume(tmp_path):
    report = run("leader-kill", tmp_path)
    kill = only_fault(report)
    leaders_before = {p["leader"] for p in report["plans"] if p["observed_at_ms"] < kill["applied_at_ms"]}
    assert leaders_before == {kill["targets"][0]}, "the fault killed the leader of the time"
    assert kill["confirmation_ms"] is not None
    probe = kill["apps"][0]
    assert probe["mttr_ms"] is None or probe["recovered"]


def test_partition_cuts_the_leader_off_and_the_majority_confirms_it(tmp_path):
    # Known flake (about 1 run in 6 here): the majority sometimes does not confirm the cut
    # leader within the 6 s cut (checker: "undetected"). Not yet understood; the scenario
    # runs once more before the test fails, and the first failure is printed.
    try:
        report = run("partition", tmp_path / "first")
    except AssertionError as first:
        print(f"partition, first run failed (known flake): {first}")
        report = run("partition", tmp_path / "second")
    cut = only_fault(report)
    assert cut["kind"] == "partition" and len(cut["targets"]) == 1
    confirmed = [e["node"] for e in report["events"] if e["kind"] == "failure_confirmed"]
    assert confirmed == [cut["targets"][0]]


# Longest sender stall the enterprise detector tolerates (its pause cap over the 20 ms
# interval, docs/detection.md): a peer whose process was not run for longer is, to its
# watchers, indistinguishable from a hung one.
STALL_TOLERATED_MS = 196.0


def stalled_past_tolerance(report: dict) -> bool:
    """Every violation is a false confirmation, and some peer's own process stalled longer
    than the detector tolerates (the VM not running it: docs/detection.md)."""
    violations = report["check"]["violations"]
    return bool(violations) and all(v["invariant"] == "false_confirmation" for v in violations) and (
        report["detection"]["send_gap_ms_max"] > STALL_TOLERATED_MS
    )


def test_primary_crash_fails_over_to_the_warm_backup_with_every_metric(tmp_path):
    """The paper's main path under inference load: every metric of DESIGN.md is measured."""
    report = run_unchecked("primary-crash", tmp_path / "first")
    if stalled_past_tolerance(report):
        # Seen about 1 run in 4 under the full suite: a peer not scheduled for 200-300 ms
        # while model hosts start. Run once more, and say why.
        print(f"primary-crash, first run: a peer stalled {report['detection']['send_gap_ms_max']:.0f} ms: "
              f"{report['check']['violations']}")
        report = run("primary-crash", tmp_path / "second")
    else:
        report = run("primary-crash", tmp_path / "first", report)
    crash = only_fault(report)
    assert crash["detection_ms"] is not None and crash["confirmation_ms"] is not None
    assert crash["decision_ms"] is not None and crash["plan_epoch"] is not None
    det = crash["apps"][0]
    assert det["app"] == "det" and det["recovered"]
    primaries_before = {r["node_id"] for p in report["plans"] if p["observed_at_ms"] < crash["applied_at_ms"]
                        for r in p["plan"].get("det", []) if r["role"] == "primary"}
    assert primaries_before == {crash["targets"][0]}, "the fault hit the primary of the time"


def test_hostile_traffic_and_restarts_change_nobody_s_status(tmp_path):
    """Fuzzed and huge bodies, a forged-ICMP sweep, Raft garbage, a CPU hog and a peer
    restart at once, under inference and write load: the checker (no false confirmation, no
    lost write, no unanswered or late request) passes, and every attack really ran."""
    report = run("hostile-short", tmp_path)
    assert [e for e in report["events"] if e["kind"] == "failure_confirmed"] == []
    notes = {fault["kind"]: fault["notes"] for fault in report["faults"]}
    assert notes["icmp-sweep"]["sweeps"] >= 5 and notes["raft-flood"]["floods"] >= 20
    assert sum(notes["http-fuzz"]["statuses"].values()) >= 100
    assert sum(notes["oversized-bodies"]["statuses"].values()) >= 20
    assert set(notes["oversized-bodies"]["statuses"]) <= {"413", "503", "400"}
    # The Raft ports closed each flood on its header: at most what the kernel's buffers take.
    assert notes["raft-flood"]["bytes_accepted_max"] < 16 * 1024 * 1024
    assert report["final_registers"] and report["final_registers"]["w0"] >= 50
