"""Benchmark of the replicated state on real peers: commit latency, throughput, leader loss.

For 3 and 5 peers on loopback it measures, from inside a peer (so HTTP is not counted):
commit latency of sequential no-op probes proposed at the leader and at a follower, commits
per second with many proposals in flight, and the time from SIGKILL of the leader to the
next successful commit at a survivor, over repeated trials. Output is JSON.

    python -m redge.chaos.bench_raft --out results/bench_raft.json [--trials 20] [--sizes 3,5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from redge.chaos.cluster import ADMIN_TOKEN, LocalCluster, http_json
from redge.chaos.stats import summary


def probe(cluster: LocalCluster, node_id: str, **parameters: Any) -> dict[str, Any]:
    timeout_s = float(parameters.get("deadline_s", 10.0)) + 10.0
    status, body = http_json(
        "POST", cluster.peers[node_id].url + "/cluster/probe", parameters, timeout_s=timeout_s, token=ADMIN_TOKEN
    )
    if status != 200:
        raise RuntimeError(f"probe at {node_id} failed: {status} {body}")
    return body


def measure_size(size: int, profile: str, trials: int, commits: int) -> dict[str, Any]:
    result: dict[str, Any] = {"peers": size, "profile": profile}
    with LocalCluster(size=size, profile=profile) as cluster:
        leader = cluster.wait_leader()
        follower = next(n for n in cluster.peers if n != leader)
        probe(cluster, leader, count=50)  # warm up connections and code paths
        at_leader = probe(cluster, leader, count=commits)
        at_follower = probe(cluster, follower, count=commits)
        result["commit_latency_ms_at_leader"] = summary(at_leader["latencies_ms"])
        result["commit_latency_ms_at_follower"] = summary(at_follower["latencies_ms"])
        throughput = []
        for _ in range(3):
            run = probe(cluster, leader, count=2000, concurrency=64, deadline_s=30)
            throughput.append(run["committed"] / run["duration_s"])
        result["commits_per_second_concurrency_64"] = summary(throughput)

        recoveries_ms: list[float] = []
        elections: list[str] = []
        for trial in range(trials):
            leader = cluster.wait_leader(timeout_s=30)
            survivor = next(n for n in cluster.peers if n != leader)
            killed_at_ms = time.time() * 1000
            cluster.peers[leader].kill()
            run = probe(cluster, survivor, count=1, attempt_timeout_s=0.05, deadline_s=10)
            if run["first_committed_at_ms"] is None:
                raise RuntimeError(f"trial {trial}: no commit within 10 s after the leader died")
            recoveries_ms.append(run["first_committed_at_ms"] - killed_at_ms)
            elections.append(cluster.wait_leader([n for n in cluster.peers if n != leader], not_node=leader))
            cluster.peers[leader].start()
            cluster.wait_ready([leader], timeout_s=30)
            print(f"  {size} peers, trial {trial + 1}/{trials}: commit again after {recoveries_ms[-1]:.0f} ms",
                  file=sys.stderr)
        result["leader_loss_to_next_commit_ms"] = summary(recoveries_ms)
        result["leader_loss_to_next_commit_ms_trials"] = recoveries_ms
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_raft.json"))
    parser.add_argument("--sizes", default="3,5")
    parser.add_argument("--profile", default="enterprise")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--commits", type=int, default=1000)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "raft",
        "command": "python -m redge.chaos.bench_raft " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "targets": {"commit_p50_ms_at_leader": 2.0, "leader_loss_to_next_commit_p50_ms": 400.0},
        "results": [],
    }
    for size in [int(s) for s in args.sizes.split(",")]:
        print(f"measuring {size} peers ({args.profile})", file=sys.stderr)
        report["results"].append(measure_size(size, args.profile, args.trials, args.commits))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for result in report["results"]:
        leader = result["commit_latency_ms_at_leader"]
        follower = result["commit_latency_ms_at_follower"]
        recovery = result["leader_loss_to_next_commit_ms"]
        print(
            f"{result['peers']} peers: commit p50/p99 at leader {leader['p50']:.2f}/{leader['p99']:.2f} ms, "
            f"at follower {follower['p50']:.2f}/{follower['p99']:.2f} ms, "
            f"{result['commits_per_second_concurrency_64']['p50']:.0f} commits/s, "
            f"leader loss to next commit p50/p99 {recovery['p50']:.0f}/{recovery['p99']:.0f} ms"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
