"""`redge demo`: a local cluster, real models, real failures, and what each one cost.

Three real peers on loopback share a model repository exported from the torchvision zoo
(cached under ~/.cache/redge/zoo). A critical app (`detector`: resnet50, falling back to
resnet18) gets a warm backup, a standard app (`tagger`: mobilenet_v3_large / small) a cold
one. Closed-loop clients call both apps through the redge client, and a plain HTTP client
calls one peer, never a fault's victim (it relies on that peer's routing). Then:

1. the node holding the detector's primary is killed (SIGKILL), and later restarted;
2. the Raft leader of that moment is killed.

For each fault the demo reads the replicated event log and the clients' own history and
prints the timeline: detection (first suspicion, confirmation), decision (confirmation to
committed plan), loading, reconfiguration (until the clients are served by the new
replica), MTTR, and failed requests. It writes a JSON report and a plot of response time
over time with the faults marked.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from redge.chaos.cluster import LocalCluster, http_json, wait_until
from redge.chaos.observe import primary_of, replicas_loaded
from redge.chaos.stats import summary

ZOO_MODELS = ("resnet50", "resnet18", "mobilenet_v3_large", "mobilenet_v3_small")
ZOO_FORMATS = ("onnx", "safetensors")
APPS = [
    {"name": "detector", "variants": ["resnet50", "resnet18"], "priority": "critical", "slo_ms": 400, "backup": "warm"},
    {"name": "tagger", "variants": ["mobilenet_v3_large", "mobilenet_v3_small"], "priority": "standard",
     "slo_ms": 400, "backup": "cold"},
]
REQUEST_DEADLINE_S = 5.0
# Clients pause this long between requests: closed loop, but leaving the two CPUs of a small
# machine some room for three peers and their model hosts.
THINK_TIME_S = 0.05


@dataclass
class Operation:
    """One client request, Jepsen-style: ok, fail (a definite error) or info (unknown)."""

    client: str
    app: str
    start: float
    end: float
    outcome: str
    node_id: str | None = None
    epoch: int | None = None
    variant: str | None = None
    error: str = ""
    role: str | None = None


def zoo_directory() -> Path:
    import torch
    import torchvision

    cache = Path(os.environ.get("REDGE_ZOO_CACHE", Path.home() / ".cache" / "redge" / "zoo"))
    return cache / f"torch-{torch.__version__}-torchvision-{torchvision.__version__}".replace("+", "_")


def prepare_zoo() -> Path:
    """Export the demo's models once per machine; later runs reuse them."""
    from redge.runtime.zoo import export

    directory = zoo_directory()
    missing = [m for m in ZOO_MODELS for f in ZOO_FORMATS if not (directory / m / f"1-{f}" / "manifest.json").is_file()]
    if missing:
        print(f"exporting {len(missing)} zoo artifacts to {directory} (first run only) ...", flush=True)

        def progress(step: Any) -> None:
            if step.manifest is not None and step.seconds:
                print(f"  [{step.index}/{step.total}] {step.model} {step.format} in {step.seconds:.1f} s", flush=True)

        export(directory, ZOO_MODELS, ZOO_FORMATS, progress)
    return directory


class ClosedLoopClient(threading.Thread):
    """Calls one app back to back, through the redge client or plain HTTP to one peer."""

    def __init__(self, name: str, app: str, cluster: LocalCluster, plain_url: str | None = None) -> None:
        super().__init__(daemon=True, name=name)
        self.client_name = name
        self.app = app
        self.cluster = cluster
        self.plain_url = plain_url
        self.history: list[Operation] = []
        self.stopping = threading.Event()
        self.inputs = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}

    def run(self) -> None:
        if self.plain_url is not None:
            self._run_plain()
            return
        from redge.agent.client import Client, ClientError

        urls = [p.url for p in self.cluster.peers.values()]
        with Client(urls, deadline_s=REQUEST_DEADLINE_S, attempt_timeout_s=1.0) as client:
            while not self.stopping.is_set():
                start = time.time()
                try:
                    result = client.infer(self.app, self.inputs)
                    self.history.append(Operation(self.client_name, self.app, start, time.time(), "ok",
                                                  result.node_id, result.epoch, result.variant, role=result.role))
                except ClientError as error:
                    self.history.append(Operation(self.client_name, self.app, start, time.time(), "fail", error=str(error)[:200]))
                self.stopping.wait(THINK_TIME_S)

    def _run_plain(self) -> None:
        from redge.agent import oip

        body, headers = oip.encode_infer_request(self.inputs)
        while not self.stopping.is_set():
            start = time.time()
            request = urllib.request.Request(f"{self.plain_url}/v2/models/{self.app}/infer", data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_DEADLINE_S) as response:
                    header, _ = oip.decode_infer_response(response.read(), response.headers.get(oip.HEADER_LENGTH))
                    parameters = header.get("parameters", {})
                    self.history.append(Operation(self.client_name, self.app, start, time.time(), "ok",
                                                  parameters.get("node_id"), parameters.get("epoch"), parameters.get("variant")))
            except urllib.error.HTTPError as error:
                self.history.append(Operation(self.client_name, self.app, start, time.time(), "fail", error=f"HTTP {error.code}"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if isinstance(getattr(error, "reason", error), ConnectionRefusedError):
                    # Refused before anything was sent: it certainly did not run (as chaos/load.py).
                    outcome, message = "fail", f"not delivered: {error}"
                else:
                    # No answer at all: the request may or may not have run (unknown, not failed).
                    outcome, message = "info", str(error)
                self.history.append(Operation(self.client_name, self.app, start, time.time(), outcome, error=message[:200]))
            self.stopping.wait(THINK_TIME_S)


def serving(cluster: LocalCluster, via: str) -> bool:
    return replicas_loaded(cluster, via, [app["name"] for app in APPS], backups_min=1)


def fault_timeline(fault: dict[str, Any], events: list[dict[str, Any]], history: list[Operation]) -> dict[str, Any]:
    """The paper's metrics for one fault, from the event log and the client history. Pure."""
    at_ms = fault["at"] * 1000
    victim = fault["node"]
    later = [e for e in events if e["at_ms"] >= at_ms - 1 and e["at_ms"] <= at_ms + fault["window_s"] * 1000]
    suspicions = [e for e in later if e["kind"] == "suspicion" and e.get("node") == victim]
    confirmed = next((e for e in later if e["kind"] == "failure_confirmed" and e.get("node") == victim), None)
    plan = next((e for e in later if confirmed and e["kind"] == "plan_committed" and e["seq"] > confirmed["seq"]), None)
    row: dict[str, Any] = {
        "fault": fault["kind"],
        "node": victim,
        "first_suspicion_ms": min(e.get("since_ms", e["at_ms"]) for e in suspicions) - at_ms if suspicions else None,
        "confirmation_ms": confirmed["at_ms"] - at_ms if confirmed else None,
        "decision_ms": plan["at_ms"] - confirmed["at_ms"] if plan and confirmed else None,
        "apps": {},
    }
    for app in APPS:
        name = app["name"]
        ops = [o for o in history if o.app == name and o.start * 1000 >= at_ms - 10_000 and o.start * 1000 <= at_ms + fault["window_s"] * 1000]
        served_by_victim_before = any(o.node_id == victim for o in ops if o.end * 1000 < at_ms and o.outcome == "ok")
        loads = [e for e in later if e.get("app") == name and e["kind"] in ("load_started", "load_done")]
        load_ms = None
        load_phases = ""
        done = [e for e in loads if e["kind"] == "load_done" and not e.get("detail", "").startswith("switched")]
        if done:
            longest = max(done, key=lambda e: e.get("duration_ms", 0.0))
            load_ms = longest.get("duration_ms", 0.0)
            load_phases = short_phases(longest.get("detail", ""))
        after_ok = [o for o in ops if o.start * 1000 >= at_ms and o.outcome == "ok" and o.node_id != victim]
        first_error = min((o.end for o in ops if o.outcome != "ok" and o.end * 1000 >= at_ms), default=None)
        mttr_ms = (min(o.end for o in after_ok) * 1000 - at_ms) if after_ok and served_by_victim_before else None
        reconfiguration_ms = None
        if after_ok and served_by_victim_before:
            start_ms = plan["at_ms"] if plan else (first_error * 1000 if first_error else at_ms)
            first_new = min(o.end for o in after_ok if o.start * 1000 >= at_ms)
            reconfiguration_ms = max(0.0, first_new * 1000 - start_ms)
        row["apps"][name] = {
            "served_by_failed_node": served_by_victim_before,
            "loading_ms": load_ms,
            "load_phases": load_phases,
            "reconfiguration_ms": reconfiguration_ms,
            "mttr_ms": mttr_ms,
            "failed_requests": sum(1 for o in ops if o.outcome == "fail" and o.start * 1000 >= at_ms),
            "unknown_requests": sum(1 for o in ops if o.outcome == "info" and o.start * 1000 >= at_ms),
            "response_ms_before": summary([1000 * (o.end - o.start) for o in ops if o.outcome == "ok" and o.end * 1000 < at_ms]).get("p50"),
            "response_ms_after": summary([1000 * (o.end - o.start) for o in after_ok if o.start * 1000 >= at_ms + 2000]).get("p50"),
            "variant_after": after_ok[-1].variant if after_ok else None,
        }
    return row


def short_phases(detail: str) -> str:
    """`onnx: verify 0.0 read 4.2 deserialize 22.9 ... warmup 6.6 ms (derived graph)` ->
    `onnx* r4 d23 w7` (read, deserialize, warm-up in ms; * from the derived graph)."""
    format_name, _, rest = detail.partition(":")
    words = rest.replace("(derived graph)", "").split()
    values = dict(zip(words[::2], words[1::2], strict=False))
    parts = [f"{letter}{float(values[name]):.0f}" for name, letter in (("read", "r"), ("deserialize", "d"), ("warmup", "w"))
             if name in values and values[name].replace(".", "", 1).isdigit()]
    return f"{format_name.strip()}{'*' if 'derived graph' in detail else ''} {' '.join(parts)}".strip()


def run_demo(out_dir: Path, peer_count: int = 3) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("REDGE_DEMO_MODEL_THREADS", "1"))
    zoo = prepare_zoo()
    print(f"starting {peer_count} peers on loopback, models from {zoo} ...", flush=True)
    faults: list[dict[str, Any]] = []
    clients: list[ClosedLoopClient] = []
    with LocalCluster(size=peer_count, extra_args=["--source", str(zoo), "--model-threads", str(threads)]) as cluster:
        leader = cluster.wait_leader()
        for app in APPS:
            status, body = cluster.register_app(leader, app)
            if status != 200:
                raise RuntimeError(f"registering {app['name']} failed: {body}")
        print("apps registered; waiting until every replica is loaded ...", flush=True)
        wait_until(lambda: serving(cluster, leader), 300, interval_s=0.2, what="all replicas loaded")
        # Fault 1 will hit the node serving the critical app; the plain HTTP client talks to
        # another peer, one that no fault kills, and relies on its routing.
        victim = primary_of(cluster, leader, "detector")
        survivors = [n for n in cluster.peers if n != victim]
        plain_node = next((n for n in survivors if n != leader), survivors[0])
        plain = ClosedLoopClient("plain-http/detector", "detector", cluster, plain_url=cluster.peers[plain_node].url)
        for app in APPS:
            clients.append(ClosedLoopClient(f"redge-client/{app['name']}", app["name"], cluster))
        clients.append(plain)
        print(f"plain HTTP client calls {plain_node}", flush=True)
        for client in clients:
            client.start()
        time.sleep(5.0)

        print(f"SIGKILL to {victim}, which serves the detector's primary", flush=True)
        faults.append({"kind": "crash of the detector's primary", "node": victim, "at": time.time(), "window_s": 12.0})
        cluster.peers[victim].kill()
        time.sleep(10.0)
        print(f"restarting {victim} from its data dir", flush=True)
        cluster.peers[victim].start()
        cluster.wait_ready([victim], timeout_s=60)
        wait_until(lambda: serving(cluster, survivors[0]), 120, interval_s=0.2, what="backups restored")
        time.sleep(3.0)

        # Fault 2: the Raft leader dies. Leadership may have moved to the plain client's peer
        # since (fault 1 may have killed the leader): it then calls another peer first.
        leader = cluster.wait_leader()
        if plain_node == leader:
            plain_node = next(n for n in cluster.peers if n != leader)
            plain.plain_url = cluster.peers[plain_node].url
            print(f"plain HTTP client now calls {plain_node}", flush=True)
        print(f"SIGKILL to the Raft leader {leader}", flush=True)
        faults.append({"kind": "crash of the Raft leader", "node": leader, "at": time.time(), "window_s": 10.0})
        cluster.peers[leader].kill()
        time.sleep(10.0)
        for client in clients:
            client.stopping.set()
        for client in clients:
            client.join(timeout=REQUEST_DEADLINE_S + 5)
        observer = next(n for n in cluster.peers if cluster.peers[n].running())
        status, body = http_json("GET", cluster.peers[observer].url + "/cluster/events?limit=2000", timeout_s=10)
        events = body.get("events", []) if status == 200 else []
    history = sorted((op for client in clients for op in client.history), key=lambda o: o.start)
    timelines = [fault_timeline(fault, events, history) for fault in faults]
    report = {
        "apps": APPS,
        "faults": faults,
        "timelines": timelines,
        "requests": {
            "total": len(history),
            "ok": sum(1 for o in history if o.outcome == "ok"),
            "failed": sum(1 for o in history if o.outcome == "fail"),
            "unknown": sum(1 for o in history if o.outcome == "info"),
            "interim": sum(1 for o in history if o.role == "interim"),
        },
        "events": events,
        "history": [asdict(o) for o in history],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_timeline(history, faults, events, out_dir / "timeline.png")
    print_tables(report)
    print(f"wrote {out_dir / 'report.json'} and {out_dir / 'timeline.png'}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    for timeline in report["timelines"]:
        table = Table(title=f"{timeline['fault']} ({timeline['node']})")
        table.add_column("metric")
        for app in APPS:
            table.add_column(app["name"], justify="right")
        apps = timeline["apps"]
        table.add_row("first suspicion (ms)", *[_ms(timeline["first_suspicion_ms"])] * len(APPS))
        table.add_row("confirmed failure (ms)", *[_ms(timeline["confirmation_ms"])] * len(APPS))
        table.add_row("decision: confirmed -> plan (ms)", *[_ms(timeline["decision_ms"])] * len(APPS))
        table.add_row("hit by the fault", *["yes" if apps[a["name"]]["served_by_failed_node"] else "no" for a in APPS])
        table.add_row("loading (ms)", *[_ms(apps[a["name"]]["loading_ms"]) for a in APPS])
        table.add_row("  phases: read, deserialize, warm-up", *[apps[a["name"]].get("load_phases") or "-" for a in APPS])
        table.add_row("reconfiguration (ms)", *[_ms(apps[a["name"]]["reconfiguration_ms"]) for a in APPS])
        table.add_row("MTTR: fault -> first answer (ms)", *[_ms(apps[a["name"]]["mttr_ms"]) for a in APPS])
        table.add_row("failed / unknown requests", *[f"{apps[a['name']]['failed_requests']} / {apps[a['name']]['unknown_requests']}" for a in APPS])
        table.add_row("response p50 before / after (ms)", *[
            f"{_ms(apps[a['name']]['response_ms_before'])} / {_ms(apps[a['name']]['response_ms_after'])}" for a in APPS])
        table.add_row("variant after", *[str(apps[a["name"]]["variant_after"] or "-") for a in APPS])
        console.print(table)
    requests = report["requests"]
    console.print(f"requests: {requests['total']} total, {requests['ok']} ok, {requests['failed']} failed, {requests['unknown']} unknown"
                  + (f", {requests['interim']} answered by another app's copy while recovering" if requests.get("interim") else ""))
    console.print("phases: r read, d deserialize, w warm-up (ms); * the node's derived graph, weights mapped")


def load_spans(events: list[dict[str, Any]], app: str, start_s: float) -> list[dict[str, Any]]:
    """Each load of `app` after `start_s` as (from, to) seconds since then, with its phases."""
    spans = []
    for event in events:
        if event["kind"] != "load_done" or event.get("app") != app or event["at_ms"] / 1000 < start_s:
            continue
        to_s = event["at_ms"] / 1000 - start_s
        spans.append({"from_s": to_s - event.get("duration_ms", 0.0) / 1000, "to_s": to_s,
                      "label": f"{event.get('node')}: {short_phases(event.get('detail', ''))}"})
    return spans


def plot_timeline(history: list[Operation], faults: list[dict[str, Any]], events: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    start = history[0].start
    figure, axes = plt.subplots(len(APPS), 1, figsize=(10, 2.8 * len(APPS)), sharex=True)
    for axis, app in zip(axes, APPS, strict=True):
        for client in sorted({o.client for o in history if o.app == app["name"]}):
            ops = [o for o in history if o.app == app["name"] and o.client == client]
            ok = [(o.start - start, 1000 * (o.end - o.start)) for o in ops if o.outcome == "ok"]
            bad = [(o.start - start, 1000 * (o.end - o.start)) for o in ops if o.outcome != "ok"]
            if ok:
                axis.plot(*zip(*ok, strict=True), ".", markersize=2, label=f"{client}")
            if bad:
                axis.plot(*zip(*bad, strict=True), "x", color="red", markersize=5, label=f"{client} failed")
        for fault in faults:
            axis.axvline(fault["at"] - start, color="black", linestyle="--", linewidth=1)
            axis.text(fault["at"] - start, axis.get_ylim()[1] if axis.lines else 1, " " + fault["kind"], fontsize=7, va="top")
        for event in events:
            if event["kind"] == "plan_committed" and event["at_ms"] / 1000 >= start:
                axis.axvline(event["at_ms"] / 1000 - start, color="green", linestyle=":", linewidth=0.8)
        for load in load_spans(events, app["name"], start):
            axis.axvspan(load["from_s"], load["to_s"], color="orange", alpha=0.25, linewidth=0)
            # x in seconds, y as a fraction of the axis: inside it whatever the data's range.
            axis.text(load["to_s"], 0.8, f" {load['label']}", fontsize=6, va="bottom", color="darkorange",
                      transform=axis.get_xaxis_transform())
        axis.set_ylabel(f"{app['name']}\nresponse (ms)")
        axis.set_yscale("log")
        axis.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("time (s); dashed: faults, dotted green: committed plans, orange: loads (r read, d deserialize, w warm-up, ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
