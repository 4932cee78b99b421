"""Benchmark of cold recovery on real peers: fault to first good answer, beside the raw read.

For each model (mobilenet_v3_large, resnet18, resnet50 by default) it starts 3 peers with
the demo's zoo as their source and registers two apps: the demo's `detector` (resnet50
with a warm backup, so the demo's load runs beside the measurement) and `target`, the
model measured, with a cold backup only. Closed-loop redge clients call both, as in
`make demo`. Each trial:

1. waits until the target's cold backup is prepared (its artifacts stored and the serving
   format's optimised graph derived on that node);
2. measures, under the same load, the raw read of the artifact the recovery will load
   (into fresh memory, from disk: its pages are evicted first, three reads, the median);
3. evicts those pages again, so that the recovery reads from disk too (only the
   artifact's: dropping the whole page cache would make every process on the machine read
   its own code back from disk, which is not what a node sees when one of its peers dies);
4. kills (SIGKILL) the node holding the target's primary and records, from the client's
   history, the time to the cold backup's first good answer (MTTR; and to the first good
   answer of any kind: with resnet50 the detector's copy answers meanwhile, as progressive
   failover allows) and the requests that failed, and from the event log the load's phases;
5. restarts the victim and lets the cluster settle.

The goal it reports: MTTR p50 <= 3 x (raw read p50 + the target's response time p50 before
the fault), per model; 0 failed requests when the client's deadline (5 s) outlasts the
recovery. Output: JSON with every trial and p50 / p99.

    python -m redge.chaos.bench_recovery --out results/bench_recovery.json [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from redge.chaos.bench_loading import drop_caches_permitted, evict, raw_read_ms
from redge.chaos.cluster import LocalCluster, http_json, wait_until
from redge.chaos.demo import ClosedLoopClient, prepare_zoo
from redge.chaos.observe import primary_of, replicas_loaded
from redge.chaos.stats import summary
from redge.runtime.manifest import Manifest

MODELS_DEFAULT = ("mobilenet_v3_large", "resnet18", "resnet50")
DETECTOR = {"name": "detector", "variants": ["resnet50"], "priority": "critical", "slo_ms": 1000, "backup": "warm"}
WINDOW_S = 8.0
GOAL_FACTOR = 3.0


def target_app(model: str) -> dict[str, Any]:
    return {"name": "target", "variants": [model], "priority": "standard", "slo_ms": 1000, "backup": "cold"}


def cold_node(cluster: LocalCluster, via: str) -> str | None:
    snapshot = cluster.peers[via].snapshot() or {}
    return next((r["node_id"] for r in snapshot.get("plan", {}).get("target", []) if r["role"] == "cold"), None)


def prepared(cluster: LocalCluster, node: str, serving: Manifest) -> Path | None:
    """The serving artifact's file on `node`, once its optimised graph is derived there.
    (Two stats and one small glob: this polls, in the process whose threads are the clients.)"""
    store = cluster.peers[node].data_dir / "store"
    model_file = store / serving.name / serving.version / serving.files[0].path
    derived = next((store / ".derived").glob(f"{serving.files[0].sha256}-*/model.onnx"), None)
    return model_file if model_file.is_file() and derived is not None else None


def trial(cluster: LocalCluster, clients: list[ClosedLoopClient], serving: Manifest, cold_method: str,
          apps: list[str]) -> dict[str, Any]:
    via = next(n for n, p in cluster.peers.items() if p.running())
    wait_until(lambda: replicas_loaded(cluster, via, apps, backups_min=1, members_alive=True),
               180, interval_s=0.2, what="both apps served with their backups")
    backup = wait_until(lambda: cold_node(cluster, via), 60, interval_s=0.1, what="a cold backup planned")
    model_file = wait_until(lambda: prepared(cluster, backup, serving), 120, interval_s=0.1, what="the cold backup prepared")
    victim = primary_of(cluster, via, "target")
    assert victim is not None and victim != backup
    files = sorted(path for path in model_file.parent.iterdir() if path.is_file())
    derived = sorted(p for p in (model_file.parents[2] / ".derived").glob(f"{serving.files[0].sha256}-*/*") if p.is_file())
    reads = []
    for _ in range(3):
        if cold_method != "none":
            evict([model_file], cold_method)
        reads.append(raw_read_ms([model_file]))
    read_ms = sorted(reads)[1]
    if cold_method != "none":
        evict(files + derived, cold_method)
    victim_led = cluster.leader() == victim
    fault_s = time.time()
    cluster.peers[victim].kill()
    time.sleep(WINDOW_S)  # the window the client history is read over
    history = [op for client in clients for op in client.history if op.app == "target"]
    before = [1000 * (op.end - op.start) for op in history if op.outcome == "ok" and fault_s - 5 <= op.end < fault_s]
    after = [op for op in history if op.end >= fault_s and op.end <= fault_s + WINDOW_S]
    recovered = [op.end for op in after if op.outcome == "ok" and op.node_id not in (None, victim)]
    # The cold backup's own first answer: not another app's copy answering meanwhile.
    recovered_cold = [op.end for op in after if op.outcome == "ok" and op.node_id not in (None, victim)
                      and op.role != "interim"]
    observer = next(n for n, p in cluster.peers.items() if p.running())
    status, body = http_json("GET", cluster.peers[observer].url + "/cluster/events?limit=2000", timeout_s=10)
    logged = [e for e in (body.get("events", []) if status == 200 else []) if e["at_ms"] >= fault_s * 1000]
    events = [e for e in logged if e.get("app") == "target" and e["kind"] == "load_done"]
    first_load = events[0] if events else {}
    # Where the time went: each step's commit, in ms after the fault.
    steps = {}
    for event in logged:
        kind = event["kind"]
        if kind == "failure_confirmed" and event.get("node") == victim:
            steps.setdefault("confirmed", event)
        elif kind == "plan_committed" and "confirmed" in steps:
            steps.setdefault("planned", event)
        elif event.get("app") == "target" and kind in ("load_started", "load_done", "serving"):
            steps.setdefault(kind, event)
    timeline = {name: round(event.get("applied_ms", event["at_ms"]) - fault_s * 1000, 1) for name, event in steps.items()}
    if recovered_cold:
        timeline["first_answer"] = round((min(recovered_cold) - fault_s) * 1000, 1)
    cluster.peers[victim].start()
    cluster.wait_ready([victim], timeout_s=60)
    return {
        "victim": victim,
        "victim_led": victim_led,
        "new_primary": first_load.get("node"),
        "mttr_ms": (min(recovered) - fault_s) * 1000 if recovered else None,
        "mttr_cold_ms": (min(recovered_cold) - fault_s) * 1000 if recovered_cold else None,
        "interim_answers": sum(1 for op in after if op.role == "interim"),
        "failed_requests": sum(1 for op in after if op.outcome == "fail"),
        "unknown_requests": sum(1 for op in after if op.outcome == "info"),
        # What a failed or unknown request was told (the first few), to tell causes apart.
        "failure_errors": [op.error for op in after if op.outcome in ("fail", "info")][:5],
        "response_ms_before_p50": summary(before).get("p50"),
        "raw_read_ms": read_ms,
        "bytes": model_file.stat().st_size,
        "loading_ms": first_load.get("duration_ms"),
        "timeline_ms": timeline,
        "load_detail": first_load.get("detail", ""),
    }


def measure(model: str, trials: int, zoo: Path, cold_method: str, threads: int, peer_args: list[str],
            background: bool = True) -> dict[str, Any]:
    serving = Manifest.read(zoo / model / "1-onnx")
    registered = [DETECTOR, target_app(model)] if background else [target_app(model)]
    apps = [app["name"] for app in registered]
    clients: list[ClosedLoopClient] = []
    rows = []
    with LocalCluster(size=3, extra_args=["--source", str(zoo), "--model-threads", str(threads), *peer_args]) as cluster:
        leader = cluster.wait_leader()
        for app in registered:
            status, body = cluster.register_app(leader, app)
            if status != 200:
                raise RuntimeError(f"registering {app['name']} failed: {body}")
        wait_until(lambda: replicas_loaded(cluster, leader, apps, backups_min=1), 300,
                   interval_s=0.2, what="every replica loaded")
        for app in apps:
            clients.append(ClosedLoopClient(f"redge-client/{app}", app, cluster))
        for client in clients:
            client.start()
        try:
            for index in range(trials):
                row = trial(cluster, clients, serving, cold_method, apps)
                rows.append(row)
                print(f"  {model} trial {index + 1}/{trials}: MTTR {row['mttr_cold_ms']} ms (first answer {row['mttr_ms']}), raw read {row['raw_read_ms']:.0f} ms, "
                      f"failed {row['failed_requests']}, load {row['load_detail']}", flush=True)
        finally:
            for client in clients:
                client.stopping.set()
            for client in clients:
                client.join(timeout=10)
    mttr = [r["mttr_cold_ms"] for r in rows if r["mttr_cold_ms"] is not None]
    mttr_any = [r["mttr_ms"] for r in rows if r["mttr_ms"] is not None]
    reads = [r["raw_read_ms"] for r in rows]
    responses = [r["response_ms_before_p50"] for r in rows if r["response_ms_before_p50"] is not None]
    floor_ms = summary(reads).get("p50", 0.0) + summary(responses).get("p50", 0.0)
    return {
        "model": model,
        "background": "the demo's detector (resnet50) and its client" if background else "none",
        "bytes": serving.size_bytes,
        "trials": rows,
        "mttr_ms": summary(mttr),  # to the cold backup's own first answer
        "mttr_any_answer_ms": summary(mttr_any),  # to the first good answer, interim ones included
        "interim_answers": sum(r["interim_answers"] for r in rows),
        "raw_read_ms": summary(reads),
        "response_ms_before": summary(responses),
        "loading_ms": summary([r["loading_ms"] for r in rows if r["loading_ms"] is not None]),
        "failed_requests": sum(r["failed_requests"] for r in rows),
        "unknown_requests": sum(r["unknown_requests"] for r in rows),
        "unrecovered_trials": sum(1 for r in rows if r["mttr_cold_ms"] is None),
        "goal_ms": GOAL_FACTOR * floor_ms,
        "goal_met": bool(mttr) and summary(mttr)["p50"] <= GOAL_FACTOR * floor_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m redge.chaos.bench_recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_recovery.json"))
    parser.add_argument("--models", default=",".join(MODELS_DEFAULT))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="model threads per peer")
    parser.add_argument("--peer-args", default="", help="more `redge peer` flags, space-separated")
    parser.add_argument("--quiet", action="store_true", help="without the demo's detector and its load beside")
    parser.add_argument("--cold-method", choices=("fadvise", "drop_caches", "none"), default="fadvise",
                        help="how the artifact's pages leave the page cache before each read and the fault "
                             "(drop_caches: the whole cache, as root)")
    args = parser.parse_args(argv)
    cold_method = args.cold_method
    if cold_method == "drop_caches" and not drop_caches_permitted():
        parser.error("drop_caches needs root: use --cold-method fadvise")
    zoo = prepare_zoo()
    started = time.time()
    results = []
    for model in [m for m in args.models.split(",") if m]:
        beside = "" if args.quiet else " under the demo's load"
        print(f"{model}: {args.trials} cold recoveries{beside} ...", flush=True)
        results.append(measure(model, args.trials, zoo, cold_method, args.threads, args.peer_args.split(),
                               background=not args.quiet))
    report = {
        "command": "python -m redge.chaos.bench_recovery " + " ".join(argv if argv is not None else []),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "cold_method": cold_method,
        "seconds": round(time.time() - started, 1),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for result in results:
        print(f"{result['model']}: MTTR p50 {result['mttr_ms'].get('p50', float('nan')):.0f} ms "
              f"(p99 {result['mttr_ms'].get('p99', float('nan')):.0f}), raw read p50 {result['raw_read_ms']['p50']:.0f} ms, "
              f"response p50 {result['response_ms_before'].get('p50', float('nan')):.0f} ms, goal {result['goal_ms']:.0f} ms: "
              f"{'met' if result['goal_met'] else 'NOT met'}; failed {result['failed_requests']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
