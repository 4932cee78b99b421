"""Run one scenario end to end: cluster, apps, load, faults on schedule, then measure and check.

The runner is the only part of chaos/ that does everything at once, and it does it in a fixed
order so that what it records can be trusted: start the cluster and wait for a leader,
register the apps, start the clients, apply and heal faults at their times on one monotonic
clock, stop the clients, heal whatever is still active, wait (bounded) for the peers to be
ready, then read the cluster's event log. The measurement and the checker are pure functions
over those records (measure.py, checker.py), so a saved report can be re-examined later.

Every wait has a deadline, and the cluster, its namespaces, cgroups and proxies are torn down
on the way out, also on an exception or Ctrl-C. `redge chaos run SCENARIO [--out DIR]` calls
`main`; `run_scenario(path, out_dir)` is the same for Python callers and tests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from redge.chaos import report as report_module
from redge.chaos.checker import Expectations, check
from redge.chaos.cluster import ADMIN_TOKEN, ClusterError, LocalCluster, http_json, wait_until
from redge.chaos.faults import FaultRecord, FaultUnavailable, Nemesis
from redge.chaos.history import History, Operation
from redge.chaos.load import LoadGenerator
from redge.chaos.measure import distributions, measure, overhead, response_times
from redge.chaos.observe import replicas_loaded
from redge.chaos.scenario import Scenario, load_scenario, load_scenario_with_seed

CLUSTER_START_S = 90.0
APP_REGISTER_S = 20.0
APPS_SERVING_S = 120.0
EVENTS_PAGES_MAX = 50
EVENTS_PAGE = 2000
EVENTS_TAILED_MAX = 200_000
PLAN_OBSERVATION_INTERVAL_S = 0.5
PLAN_OBSERVATIONS_MAX = 5000
REPEAT_MAX = 100
METRICS_BYTES_MAX = 1 << 20


class ScenarioUnavailable(Exception):
    """The scenario needs something this machine lacks (root, nftables, cgroups)."""


class PlanObserver(threading.Thread):
    """Samples the committed plan from the running peers, in turn, for the checker."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True, name="plan-observer")
        self.cluster = cluster
        self.observations: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        turn = 0
        while not self.stopping.is_set() and len(self.observations) < PLAN_OBSERVATIONS_MAX:
            peers = [p for p in self.cluster.peers.values() if p.running()]
            if peers:
                peer = peers[turn % len(peers)]
                turn += 1
                snapshot = peer.snapshot(timeout_s=1.0)
                if snapshot is not None:
                    self.observations.append({
                        "observed_at_ms": time.time() * 1000, "via": peer.node_id, "epoch": snapshot.get("epoch"),
                        "leader": snapshot.get("leader"), "plan": snapshot.get("plan") or {},
                    })
            self.stopping.wait(PLAN_OBSERVATION_INTERVAL_S)


class EventTail(threading.Thread):
    """Follows the event log while the run lasts (long polls, any running peer): the log the
    peers keep is bounded, and a long run with many faults outgrows it."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True, name="event-tail")
        self.cluster = cluster
        self.events: dict[int, dict[str, Any]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        since = 0
        turn = 0
        while not self.stopping.is_set() and len(self.events) < EVENTS_TAILED_MAX:
            peers = [p for p in self.cluster.peers.values() if p.running()]
            if not peers:
                self.stopping.wait(0.2)
                continue
            peer = peers[turn % len(peers)]
            try:
                status, body = http_json("GET", f"{peer.url}/cluster/events?since={since}&limit={EVENTS_PAGE}&wait_s=1",
                                         timeout_s=5.0)
            except OSError:
                status, body = 0, None
            if status != 200 or not isinstance(body, dict):
                turn += 1  # that peer is down or busy: ask the next one
                self.stopping.wait(0.1)
                continue
            for event in body.get("events", []):
                self.events.setdefault(event["seq"], event)
                since = max(since, event["seq"])

    def merged_with(self, final: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The final read of the log (the leader's commit times), and before it what only the
        tail saw (events the bounded log dropped since)."""
        by_seq = dict(self.events)
        by_seq.update({event["seq"]: event for event in final})
        return [by_seq[seq] for seq in sorted(by_seq)]


def final_registers(cluster: LocalCluster) -> dict[str, float] | None:
    """The committed value of every app's `request_rate_per_s` (the write load's registers)."""
    leader = cluster.leader()
    for peer in sorted(cluster.peers.values(), key=lambda p: p.node_id != leader):
        if peer.running():
            snapshot = peer.snapshot(timeout_s=5.0)
            if snapshot is not None:
                return {app["name"]: app["request_rate_per_s"] for app in snapshot.get("apps", [])}
    return None


def fetch_events(cluster: LocalCluster) -> list[dict[str, Any]]:
    """The whole event log, page by page (bounded): from the leader if there is one, since it
    applies each entry as it commits (its `applied_ms` are the commit times; a follower that
    lagged or restarted applied late), else from the first peer that answers."""
    leader = cluster.leader()
    ordered = sorted(cluster.peers.values(), key=lambda p: p.node_id != leader)
    for peer in ordered:
        if not peer.running():
            continue
        events: list[dict[str, Any]] = []
        since = 0
        try:
            for _ in range(EVENTS_PAGES_MAX):
                status, body = http_json("GET", f"{peer.url}/cluster/events?since={since}&limit={EVENTS_PAGE}",
                                         timeout_s=5.0)
                if status != 200 or not body.get("events"):
                    break
                events += body["events"]
                since = body["events"][-1]["seq"]
                if since >= body.get("last_seq", since):
                    break
        except OSError:
            continue
        if events:
            return events
    return []


def scrape_detection_metrics(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    """Each running peer's detection figures from its /metrics (report.DETECTION_METRICS)."""
    figures: dict[str, dict[str, float]] = {}
    for peer in cluster.peers.values():
        if not peer.running():
            continue
        try:
            with urllib.request.urlopen(f"{peer.url}/metrics", timeout=5.0) as response:
                text = response.read(METRICS_BYTES_MAX).decode(errors="replace")
        except OSError:
            continue
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in report_module.DETECTION_METRICS:
                try:
                    found[name] = float(value)
                except ValueError:
                    pass
        figures[peer.node_id] = found
    return figures


def register_apps(cluster: LocalCluster, apps: list[dict[str, Any]]) -> None:
    for app in apps:
        def registered(app: dict[str, Any] = app) -> bool:
            try:
                leader = cluster.leader()
                status, _ = cluster.register_app(leader or next(iter(cluster.peers)), app)
            except OSError:
                return False
            return status == 200

        wait_until(registered, APP_REGISTER_S, interval_s=0.2, what=f"app {app.get('name')} registered")


def run_scenario(path: Path | str, out_dir: Path | str, *, quiet: bool = False,
                 seed: int | None = None) -> dict[str, Any]:
    """Run the scenario file at `path`, write report.json, history.jsonl and timeline.png to
    `out_dir`, print the tables unless `quiet`, and return the report (a JSON-able dict).
    `seed` replaces the file's seed (and so every random choice of the run)."""
    scenario = load_scenario(path)
    if seed is not None:
        scenario = load_scenario_with_seed(path, seed)
    reason = scenario.unavailable_reason()
    if reason:
        raise ScenarioUnavailable(f"{scenario.name}: {reason}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _run(scenario, out, quiet)


def serving(cluster: LocalCluster, apps: list[str]) -> bool:
    """Every app has a primary, and its primary and warm backups report loaded (leader's view)."""
    leader = cluster.leader()
    return bool(leader) and replicas_loaded(cluster, leader, apps)


def _source_args(scenario: Scenario, scratch: Path) -> list[str]:
    if not scenario.source:
        return []
    if scenario.source != "test-family":
        return ["--source", scenario.source]
    from redge.runtime.testing import write_family  # only scenarios that ask pay for torch here

    directory = scratch / "source"
    directory.mkdir(parents=True, exist_ok=True)
    write_family(directory, formats=("onnx", "safetensors"))
    return ["--source", str(directory)]


def analyse(report: dict[str, Any], operations: list[Operation], faults: list[FaultRecord],
            expect: Expectations) -> dict[str, Any]:
    """Fill in the report's measurements, check and timeline from the run's records (pure)."""
    measurements = measure(operations, faults, report["events"])
    scenario = report["scenario"]
    timeouts = [load.get("timeout_s") for load in scenario.get("loads") or [scenario.get("load") or {}]]
    known = [timeout for timeout in timeouts if timeout is not None]
    result = check(operations, faults, report["events"], report["plans"], expect, measurements,
                   final_registers=report.get("final_registers"), timeout_s=max(known) if known else None)
    report.update(
        faults=[record.to_dict() for record in faults],
        measurements=[m.to_dict() for m in measurements],
        distributions=distributions(measurements),
        overhead=overhead(operations, faults),
        check=result.to_dict(),
        detection=report_module.detection_summary(report),
        response_times=response_times(operations, report["started_at_ms"]),
    )
    report["timeline"] = report_module.timeline(report)
    return report


def recheck(out_dir: Path | str, *, quiet: bool = False) -> dict[str, Any]:
    """Measure and check a saved run again (after a change to measure.py or checker.py),
    from its report.json and history.jsonl; rewrites both files' derived parts and the plot."""
    out = Path(out_dir)
    report = json.loads((out / "report.json").read_text())
    operations = list(History.read_jsonl(out / "history.jsonl"))
    faults = [FaultRecord.from_dict(f) for f in report["faults"]]
    analyse(report, operations, faults, Expectations(**report["scenario"]["expect"]))
    report_module.write_json(report, out / "report.json")
    report_module.plot(report, operations, out / "timeline.png")
    if not quiet:
        report_module.print_tables(report)
    return report


def _run(scenario: Scenario, out: Path, quiet: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="redge-chaos-") as scratch:
        return _run_in(scenario, out, quiet, Path(scratch))


def _run_in(scenario: Scenario, out: Path, quiet: bool, scratch: Path) -> dict[str, Any]:
    errors: list[str] = []
    cluster = LocalCluster(size=scenario.peers, profile=scenario.profile, mode=scenario.mode,
                           root=scratch / "cluster", extra_args=_source_args(scenario, scratch))
    nemesis = Nemesis(cluster, random.Random(scenario.seed))
    observer = PlanObserver(cluster)
    tail = EventTail(cluster)
    loads = [LoadGenerator(spec, {}, token=ADMIN_TOKEN) for spec in (scenario.load, *scenario.extra_loads)]
    registers: dict[str, float] | None = None
    try:
        cluster.start(timeout_s=CLUSTER_START_S)
        cluster.wait_leader(timeout_s=30)
        register_apps(cluster, scenario.apps)
        if scenario.apps:
            names = [app["name"] for app in scenario.apps]
            wait_until(lambda: serving(cluster, names), APPS_SERVING_S, interval_s=0.1,
                       what=f"apps {names} placed and loaded")
        for load in loads:
            load.targets = {node_id: peer.url for node_id, peer in cluster.peers.items()}
        observer.start()
        tail.start()
        started_at_ms = time.time() * 1000
        started = time.monotonic()
        for load in loads:
            load.start(scenario.duration_s + 5)
        errors += _execute(scenario, nemesis, started)
        histories = [load.stop() for load in loads]
        ended_at_ms = time.time() * 1000
        errors += nemesis.heal_all()
        try:
            cluster.wait_ready(list(cluster.peers), timeout_s=scenario.settle_s)
        except ClusterError as error:
            errors.append(f"after healing: {error}")
        observer.stopping.set()
        observer.join(timeout=5)
        tail.stopping.set()
        tail.join(timeout=10)
        events = tail.merged_with(fetch_events(cluster))
        peer_metrics = scrape_detection_metrics(cluster)
        if any(spec.kind == "write" for spec in (scenario.load, *scenario.extra_loads)):
            registers = final_registers(cluster)
    finally:
        for load in loads:
            load.stop()
        observer.stopping.set()
        tail.stopping.set()
        errors += nemesis.close()
        cluster.stop()
    history = histories[0]
    for other in histories[1:]:
        history.merge(other)
    operations = list(history)
    report: dict[str, Any] = {
        "scenario": {
            "name": scenario.name, "seed": scenario.seed, "description": scenario.description,
            "profile": scenario.profile, "peers": scenario.peers, "mode": scenario.mode,
            "duration_s": scenario.duration_s, "path": str(scenario.path) if scenario.path else None,
            "load": asdict(scenario.load), "loads": [asdict(spec) for spec in (scenario.load, *scenario.extra_loads)],
            "expect": asdict(scenario.expect),
        },
        "final_registers": registers,
        "started_at_ms": started_at_ms,
        "ended_at_ms": ended_at_ms,
        "history_dropped": history.dropped,
        "errors": errors,
        "events": events,
        "peer_metrics": peer_metrics,
        "plans": observer.observations,
        "files": {"history": "history.jsonl", "plot": "timeline.png", "report": "report.json"},
    }
    analyse(report, operations, nemesis.records, scenario.expect)
    history.write_jsonl(out / "history.jsonl")
    report_module.write_json(report, out / "report.json")
    report_module.plot(report, operations, out / "timeline.png")
    if not quiet:
        report_module.print_tables(report)
        print(f"wrote {out / 'report.json'}, {out / 'history.jsonl'} and {out / 'timeline.png'}")
    return report


def _execute(scenario: Scenario, nemesis: Nemesis, started: float) -> list[str]:
    """Apply and heal the schedule on the monotonic clock; return errors instead of stopping."""
    actions: list[tuple[float, int, Any]] = []
    for at_s, fault, duration_s in scenario.timeline():
        actions.append((at_s, 1, fault))
        if duration_s is not None and at_s + duration_s < scenario.duration_s:
            actions.append((at_s + duration_s, 0, fault))  # heals sort before applies at one instant
    actions.sort(key=lambda action: (action[0], action[1]))
    errors = []
    clock = threading.Event()  # never set: its wait is an interruptible timer
    for at_s, is_apply, fault in actions:
        clock.wait(max(0.0, started + at_s - time.monotonic()))
        try:
            if is_apply:
                nemesis.apply(fault)
            else:
                nemesis.heal(fault)
        except (FaultUnavailable, ClusterError, OSError) as error:
            errors.append(f"{'applying' if is_apply else 'healing'} {fault.describe()} at {at_s:g}s: {error}")
    clock.wait(max(0.0, started + scenario.duration_s - time.monotonic()))
    return errors


def run_repeated(path: Path | str, out_dir: Path, runs: int, first_seed: int, quiet: bool = False) -> dict[str, Any]:
    """`runs` runs with consecutive seeds into out_dir/seed-N/, and summary.json over all of them:
    the metrics as distributions (p50, p99, max), as DESIGN.md asks, and every run's verdict."""
    reports = []
    for seed in range(first_seed, first_seed + runs):
        reports.append(run_scenario(path, out_dir / f"seed-{seed}", quiet=quiet, seed=seed))
    measurements = [m for report in reports for m in report["measurements"]]
    summary = {
        "scenario": reports[0]["scenario"]["name"],
        "runs": [{"seed": r["scenario"]["seed"], "valid": r["check"]["valid"], "counts": r["check"]["counts"],
                  "violations": [v["invariant"] for v in r["check"]["violations"]]} for r in reports],
        "distributions": distributions(measurements),
        "check": {"valid": all(r["check"]["valid"] for r in reports)},
    }
    report_module.write_json(summary, out_dir / "summary.json")
    if not quiet:
        print(f"{sum(r['valid'] for r in summary['runs'])} of {runs} runs valid; wrote {out_dir / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redge chaos run", description="Run a chaos scenario and check it.")
    parser.add_argument("scenario", nargs="?",
                        help="a scenario TOML file, or the name of a shipped one (crash, leader-kill, ...)")
    parser.add_argument("--recheck", type=Path, metavar="DIR",
                        help="measure and check a saved run in DIR again instead of running anything")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default results/chaos/NAME)")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run N times with seeds SEED, SEED+1, ... and summarise the metrics over all runs")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= REPEAT_MAX:
        parser.error(f"--repeat must be 1..{REPEAT_MAX}")
    if (args.scenario is None) == (args.recheck is None):
        parser.error("give a scenario to run, or --recheck DIR")
    try:
        if args.recheck is not None:
            return 0 if recheck(args.recheck, quiet=args.quiet)["check"]["valid"] else 1
        scenario = load_scenario(args.scenario)
        out = args.out or Path("results/chaos") / scenario.name
        path = scenario.path or args.scenario
        if args.repeat == 1:
            report = run_scenario(path, out, quiet=args.quiet)
        else:
            report = run_repeated(path, out, args.repeat, scenario.seed, quiet=args.quiet)
    except ScenarioUnavailable as error:
        print(f"redge chaos run: cannot run here: {error}", file=sys.stderr)
        return 3
    except (ValueError, ClusterError, OSError) as error:
        print(f"redge chaos run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if report["check"]["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
