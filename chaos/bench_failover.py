"""Benchmark of failure handling on real peers: detection, decision and promotion times.

For each profile and fault kind it runs repeated trials on a 3-peer cluster that serves two
apps (a critical one with a warm backup, a standard one with a cold backup, small MLP
families so that loading is not what is measured here). Each trial crashes (SIGKILL) or
hangs (SIGSTOP) the node holding the critical app's primary and reads the replicated event
log for:

- detection: the fault -> the first `suspicion` of that node, and -> `failure_confirmed`;
- decision: `failure_confirmed` committed -> the next `plan_committed` committed (commit
  times as the observer applied them, `applied_ms`); `planned` is the part up to the
  leader's proposal of the plan;
- promotion: that plan's commit -> the new primary's `serving` event;
- observers: how many distinct observers the confirmation named.

Then it heals the fault (restart from the data dir, or SIGCONT) and waits for the cluster to
serve everything again before the next trial. Output is JSON with p50 / p99 / max.

With `--backgrounds quiet,hostile` every profile and fault is measured twice in one run: on
an otherwise quiet machine, and while the hostile scenario's load runs on the same machine
(chaos/hostile.py: HTTP fuzz, huge bodies, forged-ICMP sweeps when root, Raft garbage
floods, a CPU hog, inference through the redge client). Each trial also counts the nodes
other than its victim that were confirmed failed meanwhile (`others_confirmed`: false
positives).

    python -m redge.chaos.bench_failover --out results/bench_failover.json [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redge.chaos.cluster import ClusterError, LocalCluster, http_json, wait_until
from redge.chaos.measure import commit_interval_ms, committed_ms
from redge.chaos.observe import primary_of, replicas_loaded
from redge.chaos.stats import summary

APPS = [
    {"name": "det", "variants": ["mlp-large", "mlp-small"], "priority": "critical", "slo_ms": 200, "backup": "warm"},
    {"name": "tag", "variants": ["mlp-medium", "mlp-small"], "priority": "standard", "slo_ms": 200, "backup": "cold"},
]


def events_since(cluster: LocalCluster, via: str, since_ms: float) -> list[dict[str, Any]]:
    status, body = http_json("GET", cluster.peers[via].url + "/cluster/events?limit=2000", timeout_s=5)
    if status != 200:
        return []
    return [e for e in body["events"] if e["at_ms"] >= since_ms]


def all_serving(cluster: LocalCluster, via: str) -> bool:
    return replicas_loaded(cluster, via, [app["name"] for app in APPS], backups_min=1, members_alive=True)


def trial(cluster: LocalCluster, fault: str, settle_s: float) -> dict[str, Any]:
    observer = next(n for n, p in cluster.peers.items() if p.running())
    victim = primary_of(cluster, observer, "det")
    assert victim is not None
    observer = next(n for n in cluster.peers if n != victim)
    # Confirming a fault of the Raft leader needs an election first: keep which case it was.
    victim_led = cluster.leader() == victim
    fault_at_ms = time.time() * 1000
    if fault == "crash":
        cluster.peers[victim].kill()
    else:
        cluster.peers[victim].signal(signal.SIGSTOP)

    def timeline() -> dict[str, Any] | None:
        # The log as the current leader applied it: it applies each entry as it commits, and
        # before any other peer, so commit times (`applied_ms`) are the true ones and a
        # node's later `serving` report never precedes the plan's commit.
        # The survivors agree on the hung victim as leader until they elect another one.
        leader = cluster.leader(among=[n for n in cluster.peers if n != victim])
        via = leader if leader is not None and leader != victim else observer
        events = events_since(cluster, via, fault_at_ms - 1)
        suspicions = [e for e in events if e["kind"] == "suspicion" and e.get("node") == victim]
        confirmed = next((e for e in events if e["kind"] == "failure_confirmed" and e.get("node") == victim), None)
        if not suspicions or confirmed is None:
            return None
        plan = next((e for e in events if e["kind"] == "plan_committed" and e["seq"] > confirmed["seq"]), None)
        if plan is None:
            return None
        serving = next(
            (e for e in events if e["kind"] == "serving" and e.get("app") == "det" and e["seq"] > plan["seq"]
             and e.get("epoch", 0) >= plan["epoch"]),
            None,
        )
        if serving is None:
            return None
        others = sorted({e.get("node") for e in events if e["kind"] == "failure_confirmed" and e.get("node") != victim})
        return {
            "others_confirmed": others,
            "victim": victim,
            "victim_was_leader": victim_led,
            "first_suspicion_ms": min(e.get("since_ms", e["at_ms"]) for e in suspicions) - fault_at_ms,
            # Commit times as the observer saw them (DESIGN.md: detection to the committed
            # confirmation, decision from it to the committed plan); the plan's proposal apart.
            "confirmation_ms": committed_ms(confirmed) - fault_at_ms,
            "decision_ms": commit_interval_ms(confirmed, plan),
            "planned_ms": plan["at_ms"] - committed_ms(confirmed),
            "promotion_ms": serving["at_ms"] - committed_ms(plan),
            "fault_to_serving_ms": serving["at_ms"] - fault_at_ms,
            "observers": len(confirmed.get("observers", [])),
            "suspicion_reasons": sorted({e.get("reason", "") for e in suspicions}),
        }

    try:
        result = wait_until(timeline, 20, interval_s=0.05, what=f"failover after a {fault} of {victim}")
    except ClusterError as error:
        # A trial that did not complete is a result too: keep it, with what the log showed.
        kinds = [e["kind"] for e in events_since(cluster, observer, fault_at_ms - 1)]
        result = {"victim": victim, "incomplete": str(error), "event_kinds": kinds}
    if fault == "crash":
        cluster.peers[victim].start()
    else:
        cluster.peers[victim].signal(signal.SIGCONT)
    cluster.wait_ready([victim], timeout_s=60)
    wait_until(lambda: all_serving(cluster, observer), 90, interval_s=0.1, what="everything serving again")
    # Let the detectors' windows of heartbeat intervals fill with steady traffic again: a
    # fault right after a restart meets a detector still wary from the last one.
    time.sleep(settle_s)
    return result


def hostile_background(cluster: LocalCluster) -> tuple[Any, Any]:
    """The hostile scenario's attacks and an inference load through the redge client, on
    `cluster`, until stopped: (nemesis, load)."""
    import os
    import random

    from redge.chaos.faults import CpuLoad, Nemesis
    from redge.chaos.hostile import HttpFuzz, IcmpSweep, OversizedBodies, RaftFlood
    from redge.chaos.load import LoadGenerator, LoadSpec

    nemesis = Nemesis(cluster, random.Random(7))
    faults = [CpuLoad(workers=2, busy_fraction=0.5), RaftFlood(), HttpFuzz(app="det"), OversizedBodies(app="det")]
    if os.geteuid() == 0:
        faults.append(IcmpSweep())
    for fault in faults:
        nemesis.apply(fault)
    spec = LoadSpec(kind="client", app="det", clients=2, rate_per_s=20, timeout_s=2.0, input_shape=(1, 16))
    load = LoadGenerator(spec, {node_id: peer.url for node_id, peer in cluster.peers.items()})
    load.start(3600)
    return nemesis, load


def measure(profile: str, fault: str, trials: int, source: Path, settle_s: float, peers: int = 3,
            background: str = "quiet") -> dict[str, Any]:
    rows = []
    with LocalCluster(size=peers, profile=profile, extra_args=["--source", str(source)]) as cluster:
        leader = cluster.wait_leader()
        for app in APPS:
            status, body = cluster.register_app(leader, app)
            if status != 200:
                raise RuntimeError(f"register {app['name']}: {body}")
        wait_until(lambda: all_serving(cluster, leader), 120, interval_s=0.1, what="apps serving")
        nemesis = load = None
        if background == "hostile":
            nemesis, load = hostile_background(cluster)
        try:
            for index in range(trials):
                row = trial(cluster, fault, settle_s)
                rows.append(row)
                if "incomplete" in row:
                    print(f"  {profile} {fault} {background} {index + 1}/{trials}: incomplete: {row['event_kinds']}",
                          file=sys.stderr)
                    continue
                print(
                    f"  {profile} {fault} {background} {index + 1}/{trials}: suspicion {row['first_suspicion_ms']:.0f} ms, "
                    f"confirmed {row['confirmation_ms']:.0f} ms, decision {row['decision_ms']:.0f} ms, "
                    f"promoted {row['promotion_ms']:.0f} ms" + (f", others confirmed {row['others_confirmed']}"
                                                                 if row["others_confirmed"] else ""),
                    file=sys.stderr,
                )
        finally:
            if load is not None:
                load.stop()
            if nemesis is not None:
                nemesis.close()
    keys = ("first_suspicion_ms", "confirmation_ms", "decision_ms", "planned_ms", "promotion_ms", "fault_to_serving_ms")
    complete = [r for r in rows if "incomplete" not in r]
    return {
        "profile": profile,
        "fault": fault,
        "background": background,
        "peers": peers,
        "settle_s": settle_s,
        "incomplete_trials": len(rows) - len(complete),
        "others_confirmed": sum(len(r["others_confirmed"]) for r in complete),
        **{k: summary([r[k] for r in complete]) for k in keys},
        "trials": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_failover.json"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--profiles", default="enterprise,iobt")
    parser.add_argument("--faults", default="crash,hang")
    parser.add_argument("--settle-s", type=float, default=5.0, help="steady time between a recovery and the next fault")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--backgrounds", default="quiet",
                        help="quiet, hostile, or both (quiet,hostile): what else runs on the machine meanwhile")
    args = parser.parse_args(argv)
    from redge.runtime.testing import write_family

    report: dict[str, Any] = {
        "benchmark": "failover",
        "command": "python -m redge.chaos.bench_failover " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version()},
        "goals": {"enterprise_crash_confirmation_ms": {"p50": 60, "p99": 150},
                  "enterprise_hang_confirmation_ms": {"p50": 100, "p99": 200}, "iobt_confirmation_ms": {"p50": 600},
                  "decision_ms_p50_5_peers": 20, "others_confirmed": 0},
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="redge-bench-source-") as scratch:
        write_family(Path(scratch), formats=("onnx",))
        for profile in args.profiles.split(","):
            for fault in args.faults.split(","):
                for background in args.backgrounds.split(","):
                    print(f"measuring {profile} / {fault} / {background}", file=sys.stderr)
                    report["results"].append(measure(profile, fault, args.trials, Path(scratch), args.settle_s,
                                                     args.peers, background))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for result in report["results"]:
        print(
            f"{result['profile']:10s} {result['fault']:5s} {result['background']:7s} first suspicion p50/p99 "
            f"{result['first_suspicion_ms']['p50']:.0f}/{result['first_suspicion_ms']['p99']:.0f} ms, confirmation "
            f"{result['confirmation_ms']['p50']:.0f}/{result['confirmation_ms']['p99']:.0f} ms, decision "
            f"{result['decision_ms']['p50']:.0f}/{result['decision_ms']['p99']:.0f} ms, promotion "
            f"{result['promotion_ms']['p50']:.0f}/{result['promotion_ms']['p99']:.0f} ms, "
            f"others confirmed {result['others_confirmed']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
