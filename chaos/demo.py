"""`redge demo`: a local cluster, a real failure, and what it cost, measured.

Starts three real peers on loopback, registers apps, runs a closed-loop client that keeps
committing through the cluster, then SIGKILLs the Raft leader. It prints the timeline from
the replicated event log and the client's own record (time to a new leader, time until
commits succeed again, failed requests) as a table, and writes a JSON report and a plot.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from redge.chaos.cluster import ADMIN_TOKEN, LocalCluster, http_json
from redge.chaos.stats import summary

APPS = [
    {"name": "detector", "variants": ["resnet50", "resnet18"], "priority": "critical", "slo_ms": 150, "backup": "warm"},
    {"name": "tagger", "variants": ["mobilenet_v3_large", "mobilenet_v3_small"], "priority": "standard",
     "slo_ms": 300, "backup": "cold"},
]


class ClosedLoopCommitter(threading.Thread):
    """Commits no-op probes one after another through whichever peer answers, recording each."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.records: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            peers = [p for p in self.cluster.peers.values() if p.running()]
            peer = peers[index % len(peers)]
            index += 1
            started = time.time()
            try:
                status, body = http_json(
                    "POST", peer.url + "/cluster/probe", {"count": 1, "deadline_s": 1.0, "attempt_timeout_s": 1.0},
                    timeout_s=2.0, token=ADMIN_TOKEN,
                )
                outcome = "ok" if status == 200 and body.get("committed") == 1 else "error"
            except OSError:
                outcome = "error"
            self.records.append({"node": peer.node_id, "start": started, "end": time.time(), "outcome": outcome})
            time.sleep(0.01)


def run_demo(out_dir: Path, peer_count: int = 3) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"starting {peer_count} peers on loopback ...")
    with LocalCluster(size=peer_count) as cluster:
        leader = cluster.wait_leader()
        for app in APPS:
            status, body = cluster.register_app(leader, app)
            if status != 200:
                raise RuntimeError(f"registering {app['name']} failed: {body}")
        print(f"cluster ready, leader {leader}; client running")
        client = ClosedLoopCommitter(cluster)
        client.start()
        time.sleep(2.0)
        fault_at = time.time()
        cluster.peers[leader].kill()
        print(f"SIGKILL to the Raft leader {leader}")
        survivors = [n for n in cluster.peers if n != leader]
        new_leader = cluster.wait_leader(survivors, timeout_s=30, not_node=leader)
        leader_seen_at = time.time()
        time.sleep(2.0)
        client.stopping.set()
        client.join(timeout=5)
        status, events = http_json("GET", cluster.peers[survivors[0]].url + "/cluster/events?limit=2000")
    records = client.records
    after = [r for r in records if r["start"] >= fault_at and r["outcome"] == "ok"]
    first_ok_after = min((r["end"] for r in after), default=None)
    failed = [r for r in records if r["outcome"] != "ok"]
    before = [1000 * (r["end"] - r["start"]) for r in records if r["end"] < fault_at and r["outcome"] == "ok"]
    report = {
        "fault": {"kind": "crash", "target": leader, "role": "raft leader", "at": fault_at},
        "new_leader": new_leader,
        "new_leader_seen_ms": 1000 * (leader_seen_at - fault_at),
        "first_commit_after_fault_ms": None if first_ok_after is None else 1000 * (first_ok_after - fault_at),
        "failed_requests": len(failed),
        "requests": len(records),
        "commit_round_trip_ms_before": summary(before),
        "events": events.get("events", []) if isinstance(events, dict) else [],
        "history": records,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    _plot(records, fault_at, out_dir / "timeline.png")
    _print_table(report)
    print(f"wrote {out_dir / 'report.json'} and {out_dir / 'timeline.png'}")
    return 0


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"crash of the Raft leader {report['fault']['target']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("new leader", str(report["new_leader"]))
    table.add_row("new leader seen by the client (ms)", f"{report['new_leader_seen_ms']:.0f}")
    first = report["first_commit_after_fault_ms"]
    table.add_row("first successful commit after the fault (ms)", "none" if first is None else f"{first:.0f}")
    table.add_row("failed requests", f"{report['failed_requests']} of {report['requests']}")
    table.add_row("commit round trip before (p50 ms)", f"{report['commit_round_trip_ms_before'].get('p50', float('nan')):.1f}")
    Console(width=100).print(table)


def _plot(records: list[dict[str, Any]], fault_at: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = records[0]["start"] if records else fault_at
    figure, axis = plt.subplots(figsize=(9, 3.5))
    ok = [(r["start"] - start, 1000 * (r["end"] - r["start"])) for r in records if r["outcome"] == "ok"]
    bad = [(r["start"] - start, 1000 * (r["end"] - r["start"])) for r in records if r["outcome"] != "ok"]
    if ok:
        axis.plot(*zip(*ok), ".", markersize=3, label="ok")
    if bad:
        axis.plot(*zip(*bad), "x", color="red", label="failed")
    axis.axvline(fault_at - start, color="black", linestyle="--", label="leader killed")
    axis.set_xlabel("time (s)")
    axis.set_ylabel("response time (ms)")
    axis.set_yscale("log")
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
