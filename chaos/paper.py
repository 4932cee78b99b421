"""The paper's experiments (Figs. 3, 4, 5a, 5b/5c) on real redge clusters, one command each.

Each experiment starts `redge peer` processes (chaos/cluster.py), calls them over HTTP with
closed-loop clients (one request in flight each, as the paper's clients), and writes a JSON
table, a markdown table (printed too) and a PNG plot under `--out`. The paper's own numbers
travel with each table (`PAPER`), so that docs/paper.md can set them side by side.

Both of the paper's edges are emulated on one CPU-only machine:

- `enterprise`: peers on loopback, no CPU limit (the "large GPU" is the machine's cores);
- `iobt`: peers in network namespaces with WiFi-like links on every node (a delay proxy,
  20 +- 15 ms on what the node receives, and 2 % random loss; chaos/faults.py), and every
  serving node held to half a CPU by a cgroup v1 quota, standing in for the weaker board.

Fig. 2 (loading time) is `python -m redge.chaos.bench_loading` (docs/runtime.md).

Server-side inference time comes from the serving peer's `redge_inference_seconds`
histogram (sum and count, read before and after each window: a mean per window, not per
request), and time inside the model from `redge_model_seconds` where the peer has it (the
difference is the hop to the model host and its queue); network and HTTP time is the
client's response time minus the inference time. The tables and their arithmetic are pure functions at the
top of this module, so they have table tests (tests/test_paper.py); the shell below them
runs the processes.

    python -m redge.chaos.paper fig3|fig4|fig5a|fig5bc|all --profile enterprise|iobt|both \
        --out results/paper/ [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redge.agent.profile import get_profile
from redge.chaos.history import FAIL, INFO, OK, Operation
from redge.chaos.load import failed_outcome
from redge.chaos.stats import summary

FIGURES = ("fig3", "fig4", "fig5a", "fig5bc")
SCENARIO_FIG5A = Path(__file__).parent / "scenarios" / "paper-fig5a.toml"
CLUSTER_START_S = 90.0
SERVING_WAIT_S = 300.0
REQUEST_TIMEOUT_S = 10.0
OPERATIONS_PER_WINDOW_MAX = 10_000

# What the paper reports (section IV), by figure, for the tables in docs/paper.md.
PAPER: dict[str, Any] = {
    "fig2": {"loading_ms_mean": {"enterprise": 150, "iobt": 170}, "loading_ms_max": 500},
    "fig3": {
        "effnet_b2_iobt_over_enterprise_percent": {"inference": 400, "network": 3500},
        "cov": {"enterprise": {"processing": 0.22, "latency": 0.12}, "iobt": {"processing": 0.32, "latency": 0.14}},
    },
    "fig4": {"increase_percent": {"enterprise": {"effnet_b2": 3.1, "resnet101": 2.1},
                                  "iobt": {"effnet_b2": 7.8, "resnet101": 11.0}}},
    "fig5a": {"heartbeat_interval_ms": 50, "detection_ms_mean": 1500, "recovery_ms_mean": 3},
    "fig5bc": {"homogeneous": {"app2_percent": 17.2, "app1_percent": 9.8},
               "heterogeneous": {"app2_percent": -11.8, "app1_percent": 8.0}},
}


@dataclass(frozen=True)
class Profile:
    """How one of the paper's two edges is emulated here."""

    name: str
    mode: str  # LocalCluster mode
    node_cpu_fraction: float | None  # cgroup quota per serving node; None: no limit
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: int = 0

    def describe(self) -> str:
        parts = [f"{self.mode}"]
        if self.delay_ms:
            parts.append(f"{self.delay_ms:g} +- {self.jitter_ms:g} ms on what each node receives")
        if self.loss_percent:
            parts.append(f"{self.loss_percent} % loss")
        parts.append(f"{self.node_cpu_fraction:g} CPU per serving node" if self.node_cpu_fraction else "no CPU limit")
        return ", ".join(parts)


PROFILES = {
    "enterprise": Profile("enterprise", "loopback", None),
    "iobt": Profile("iobt", "netns", 0.5, delay_ms=20.0, jitter_ms=15.0, loss_percent=2),
}


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; `quick` is for trying the commands, not for numbers."""

    rounds: int = 3
    requests_per_model: int = 20  # fig3, per round
    window_s: float = 8.0  # fig4, per phase and round
    fig5bc_before_s: float = 10.0
    fig5bc_after_s: float = 20.0
    fig5a_repeat: int = 3
    fig5bc_repeat: int = 3

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=1, requests_per_model=5, window_s=3.0, fig5bc_before_s=6.0, fig5bc_after_s=8.0,
                   fig5a_repeat=1, fig5bc_repeat=1)


# Fig. 3's five models (the paper names EfficientNet-B2; the others are common torchvision ones).
FIG3_MODELS = ("mobilenet_v3_large", "resnet18", "efficientnet_b2", "resnet50", "resnet101")
FIG4_MODELS = ("efficientnet_b2", "resnet101")
# Fig. 5b/c: APP1 one variant; APP2 a family whose smaller variant is the heterogeneous backup.
# Both of APP2's variants take 224x224 inputs, so one client serves either (efficientnet_b0 and
# b2 do not: 224 against 288, and the backup answers the primary's input with a 400).
FIG5BC_APP1 = ("efficientnet_b2",)
FIG5BC_APP2 = ("resnet50", "resnet18")

# ---------------------------------------------------------------------- pure: metrics and tables

INFERENCE_METRIC = "redge_inference_seconds"  # the peer's model host round trip, queue included
MODEL_METRIC = "redge_model_seconds"  # time inside the model only, where the peer reports it


def inference_totals(metrics_text: str, metric: str = INFERENCE_METRIC) -> dict[str, tuple[float, float]]:
    """app -> (seconds, count) of histogram `metric` in a Prometheus text page."""
    pattern = re.compile(rf'^{re.escape(metric)}_(sum|count)\{{([^}}]*)\}}\s+(\S+)$')
    totals: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        match = pattern.match(line.strip())
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if "app" not in labels:
            continue
        entry = totals.setdefault(labels["app"], [0.0, 0.0])
        entry[0 if match.group(1) == "sum" else 1] += float(match.group(3))
    return {app: (seconds, count) for app, (seconds, count) in totals.items()}


def server_mean_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                   app: str) -> float | None:
    """Mean server-side inference time of `app` between two readings, or None if none ran."""
    seconds_before, count_before = before.get(app, (0.0, 0.0))
    seconds_after, count_after = after.get(app, (0.0, 0.0))
    count = count_after - count_before
    if count <= 0:
        return None
    return (seconds_after - seconds_before) / count * 1000


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    if mean == 0:
        return None
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return math.sqrt(variance) / mean


def percent_change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0 or math.isnan(before) or math.isnan(after):
        return None
    return (after / before - 1) * 100


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ok_latencies(operations: Sequence[Operation], app: str, start_ms: float = -math.inf,
                 end_ms: float = math.inf) -> list[float]:
    """Latencies of `app`'s ok operations that started in [start_ms, end_ms)."""
    return [o.latency_ms for o in operations
            if o.app == app and o.outcome == OK and start_ms <= o.start_ms < end_ms]


def fig3_row(model: str, latencies_ms: Sequence[float], server_means_ms: Sequence[float]) -> dict[str, Any]:
    """One model's line of Fig. 3: response time, server-side inference, what the network adds."""
    response = summary(latencies_ms)
    mean_response = _mean(latencies_ms)
    mean_server = _mean(server_means_ms)
    return {
        "model": model,
        "requests": len(latencies_ms),
        "response_ms": response,
        "inference_ms_mean": mean_server,
        "network_ms_mean": (mean_response - mean_server) if mean_response is not None and mean_server is not None else None,
        "response_cov": coefficient_of_variation(latencies_ms),
        "inference_cov_between_rounds": coefficient_of_variation(server_means_ms),
    }


def fig3_compare(enterprise: dict[str, Any], iobt: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model: how much higher iobt's inference and network time are than enterprise's (%)."""
    rows = []
    by_model = {row["model"]: row for row in iobt["rows"]}
    for row in enterprise["rows"]:
        other = by_model.get(row["model"])
        if other is None:
            continue
        rows.append({
            "model": row["model"],
            "inference_percent": percent_change(row["inference_ms_mean"], other["inference_ms_mean"]),
            "network_percent": percent_change(row["network_ms_mean"], other["network_ms_mean"]),
            "response_p50_percent": percent_change(row["response_ms"].get("p50"), other["response_ms"].get("p50")),
        })
    return rows


def fig4_rows(rounds: Sequence[dict[str, dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Fig. 4 from rounds of {phase: {model: {"latencies_ms": [...], "server_ms": float|None}}},
    phases "isolated" and "colocated": per model, the increase of the mean response and of the
    server-side inference time, pooled and as the median of the per-round ratios."""
    models = sorted({m for r in rounds for m in r.get("isolated", {})})
    rows = []
    for model in models:
        pooled: dict[str, list[float]] = {"isolated": [], "colocated": []}
        server: dict[str, list[float]] = {"isolated": [], "colocated": []}
        model_only: dict[str, list[float]] = {"isolated": [], "colocated": []}
        ratios: list[float] = []
        server_ratios: list[float] = []
        for one in rounds:
            means = {}
            for phase in pooled:
                entry = one.get(phase, {}).get(model)
                if not entry:
                    continue
                pooled[phase] += entry["latencies_ms"]
                if entry.get("server_ms") is not None:
                    server[phase].append(entry["server_ms"])
                if entry.get("model_ms") is not None:
                    model_only[phase].append(entry["model_ms"])
                means[phase] = (_mean(entry["latencies_ms"]), entry.get("server_ms"))
            if len(means) == 2:
                (isolated_mean, isolated_server), (colocated_mean, colocated_server) = means["isolated"], means["colocated"]
                if isolated_mean and colocated_mean:
                    ratios.append(colocated_mean / isolated_mean)
                if isolated_server and colocated_server:
                    server_ratios.append(colocated_server / isolated_server)
        rows.append({
            "model": model,
            "isolated_ms": summary(pooled["isolated"]),
            "colocated_ms": summary(pooled["colocated"]),
            "response_mean_increase_percent": percent_change(_mean(pooled["isolated"]), _mean(pooled["colocated"])),
            "inference_mean_increase_percent": percent_change(_mean(server["isolated"]), _mean(server["colocated"])),
            "model_ms_isolated": _mean(model_only["isolated"]),
            "model_ms_colocated": _mean(model_only["colocated"]),
            "model_mean_increase_percent": percent_change(_mean(model_only["isolated"]), _mean(model_only["colocated"])),
            "response_increase_percent_per_round": summary([(r - 1) * 100 for r in ratios]),
            "inference_increase_percent_per_round": summary([(r - 1) * 100 for r in server_ratios]),
        })
    return rows


def fig5bc_row(variant: str, operations: Sequence[Operation], fault_ms: float, settle_ms: float,
               servers: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """One line of Fig. 5b/c: each app's response (and server-side inference) time before the
    fault against after it has settled. `servers[app]` holds "before" and "after" means."""
    result: dict[str, Any] = {"backup": variant}
    for app in ("app1", "app2"):
        before = ok_latencies(operations, app, end_ms=fault_ms)
        after = ok_latencies(operations, app, start_ms=fault_ms + settle_ms)
        server = servers.get(app, {})
        result[app] = {
            "before_ms": summary(before),
            "after_ms": summary(after),
            "response_mean_percent": percent_change(_mean(before), _mean(after)),
            "response_p50_percent": percent_change(summary(before).get("p50"), summary(after).get("p50")),
            "inference_ms_before": server.get("before"),
            "inference_ms_after": server.get("after"),
            "inference_percent": percent_change(server.get("before"), server.get("after")),
        }
    return result


def fig5bc_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per backup kind and app, the trials' changes (%): their median (p50) and range."""
    result = []
    for variant in ("homogeneous", "heterogeneous"):
        trials = [row for row in rows if row["backup"] == variant]
        if not trials:
            continue
        for app in ("app1", "app2"):
            entry: dict[str, Any] = {"backup": variant, "app": app, "trials": len(trials)}
            for key in ("response_mean_percent", "response_p50_percent", "inference_percent"):
                values = [t[app][key] for t in trials if t[app][key] is not None]
                entry[key] = summary(values)
            result.append(entry)
    return result


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fig3_markdown(result: dict[str, Any]) -> str:
    rows = [(r["model"], r["requests"], r["response_ms"].get("p50"), r["response_ms"].get("p99"),
             r["inference_ms_mean"], r.get("model_ms_mean"), r["network_ms_mean"], r["response_cov"])
            for r in result["rows"]]
    return markdown_table(("model", "requests", "response p50 ms", "response p99 ms", "inference mean ms",
                           "of which in the model ms", "network+HTTP mean ms", "response CoV"), rows)


def fig4_markdown(result: dict[str, Any]) -> str:
    rows = [(r["model"], r["isolated_ms"].get("p50"), r["colocated_ms"].get("p50"), r["isolated_ms"].get("p99"),
             r["colocated_ms"].get("p99"), r["response_mean_increase_percent"], r["inference_mean_increase_percent"],
             r.get("model_mean_increase_percent"), r["response_increase_percent_per_round"].get("p50"))
            for r in result["rows"]]
    return markdown_table(("model", "isolated p50 ms", "co-located p50 ms", "isolated p99 ms", "co-located p99 ms",
                           "response mean +%", "inference mean +%", "in-model mean +%", "per-round response +% (p50)"),
                          rows)


def fig5bc_markdown(result: dict[str, Any]) -> str:
    rows = []
    for row in result["rows"]:
        for app in ("app1", "app2"):
            entry = row[app]
            rows.append((row["backup"], row.get("trial"), app, entry["before_ms"].get("p50"),
                         entry["after_ms"].get("p50"), entry["response_mean_percent"], entry["inference_ms_before"],
                         entry["inference_ms_after"], entry["inference_percent"]))
    trials = markdown_table(("backup", "trial", "app", "before p50 ms", "after p50 ms", "response mean +%",
                             "inference before ms", "inference after ms", "inference +%"), rows)
    medians = [(e["backup"], e["app"], e["trials"], e["response_mean_percent"].get("p50"),
                e["response_mean_percent"].get("min"), e["response_mean_percent"].get("max"),
                e["inference_percent"].get("p50"), e["inference_percent"].get("min"), e["inference_percent"].get("max"))
               for e in result.get("summary", [])]
    summary_table = markdown_table(("backup", "app", "trials", "response mean +% (p50)", "min", "max",
                                    "inference +% (p50)", "min", "max"), medians)
    return summary_table + "\n\n" + trials


def fig5a_markdown(result: dict[str, Any]) -> str:
    rows = [(run["seed"], run["detection_ms"], run["confirmation_ms"], run["decision_ms"], run["recovery_ms"],
             run["reconfiguration_ms"], run["mttr_ms"], run["outage_ms"], run["unknown"], run["valid"])
            for run in result["runs"]]
    return markdown_table(("seed", "detection ms", "confirmation ms", "decision ms", "recovery ms",
                           "reconfiguration ms", "MTTR ms", "outage ms", "unknown requests", "checker"), rows)


def fig5a_run_row(report: dict[str, Any]) -> dict[str, Any]:
    """The crash's measurements from one chaos report. `recovery_ms` is the paper's recovery
    time of a warm replica: from the committed confirmation to the backup's `serving` event."""
    crash = next((m for m in report["measurements"] if m["kind"] == "crash"), None) or {}
    app = (crash.get("apps") or [{}])[0]
    recovery_ms = None
    if crash.get("confirmation_ms") is not None:
        confirmed_ms = crash["applied_at_ms"] + crash["confirmation_ms"]
        serving = [e["at_ms"] for e in report["events"] if e["kind"] == "serving" and e["at_ms"] >= confirmed_ms
                   and e.get("node") not in crash.get("targets", ())]
        recovery_ms = min(serving) - confirmed_ms if serving else None
    return {
        "seed": report["scenario"]["seed"],
        "detection_ms": crash.get("detection_ms"),
        "confirmation_ms": crash.get("confirmation_ms"),
        "decision_ms": crash.get("decision_ms"),
        "recovery_ms": recovery_ms,
        "reconfiguration_ms": app.get("reconfiguration_ms"),
        "mttr_ms": app.get("mttr_ms"),
        "outage_ms": app.get("outage_ms"),
        "unknown": app.get("unknown"),
        "valid": report["check"]["valid"],
    }


# ---------------------------------------------------------------------- shell: clients and clusters


def machine_load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "cpus": os.cpu_count(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def input_of(source: Path, model: str) -> tuple[str, list[int], str]:
    """(name, shape with batch 1, datatype) of a model's first input, from its manifest."""
    for manifest in sorted((source / model).glob("*/manifest.json")):
        first = json.loads(manifest.read_text())["inputs"][0]
        return first["name"], [1 if size < 0 else size for size in first["shape"]], first["datatype"]
    raise FileNotFoundError(f"no artifact of {model} under {source}")


def memory_of(source: Path, model: str) -> int:
    """The memory the leader assumes a variant takes without a profile (agent/leader.py)."""
    sizes = [json.loads(m.read_text())["size_bytes"] for m in (source / model).glob("*/manifest.json")]
    return int(max(sizes) * 1.5)


def request_body(source: Path, model: str) -> tuple[bytes, dict[str, str]]:
    import numpy as np

    from redge.agent import oip

    name, shape, datatype = input_of(source, model)
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}[datatype]
    array = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return oip.encode_infer_request({name: array})


async def closed_loop(app: str, urls: Sequence[tuple[str, str]], body: bytes, headers: dict[str, str],
                      client: int, deadline: float, count_max: int, operations: list[Operation],
                      timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    """One client, one request in flight: POST until `deadline` (monotonic) or `count_max`.
    `urls` are (node, base URL); the client starts on the first and moves on after a failure."""
    import aiohttp

    position = 0
    count = 0
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline and count < min(count_max, OPERATIONS_PER_WINDOW_MAX):
            node, base = urls[position]
            start_ms = time.time() * 1000
            started = time.perf_counter()
            outcome, status, served, epoch, error = INFO, None, None, None, ""
            try:
                async with session.post(f"{base}/v2/models/{app}/infer", data=body, headers=headers) as response:
                    status = response.status
                    payload = await response.read()
                    served = response.headers.get("X-Redge-Node")
                    raw_epoch = response.headers.get("X-Redge-Epoch")
                    epoch = int(raw_epoch) if raw_epoch and raw_epoch.isdigit() else None
                    if status == 200:
                        outcome = OK
                    elif status == 504:
                        outcome, error = INFO, payload[:200].decode(errors="replace")
                    else:
                        outcome, error = FAIL, payload[:200].decode(errors="replace")
            except (aiohttp.ClientError, OSError, TimeoutError) as exception:
                outcome, error = failed_outcome(exception, timeout_s)
            latency_ms = (time.perf_counter() - started) * 1000
            count += 1
            operations.append(Operation(
                index=len(operations) + 1, client=client, kind="infer", app=app, target=node,
                start_ms=start_ms, end_ms=start_ms + latency_ms, latency_ms=latency_ms, outcome=outcome,
                node=served, epoch=epoch, status=status, error=error[:300],
            ))
            if outcome != OK:
                position = (position + 1) % len(urls)
                await asyncio.sleep(0.01)  # do not spin on a dead endpoint


def run_clients(clients: Sequence[tuple[str, Sequence[tuple[str, str]], bytes, dict[str, str]]],
                duration_s: float, count_max: int = OPERATIONS_PER_WINDOW_MAX) -> list[Operation]:
    """Run one closed-loop client per (app, urls, body, headers) at once; their operations."""
    operations: list[Operation] = []
    deadline = time.monotonic() + duration_s

    async def all_clients() -> None:
        await asyncio.gather(*(closed_loop(app, urls, body, headers, index, deadline, count_max, operations)
                               for index, (app, urls, body, headers) in enumerate(clients)))

    asyncio.run(all_clients())
    return operations


def read_totals(url: str, metric: str = INFERENCE_METRIC) -> dict[str, tuple[float, float]]:
    return read_all_totals(url).get(metric, {})


def read_all_totals(url: str) -> dict[str, dict[str, tuple[float, float]]]:
    """metric -> app -> (seconds, count), for the inference and the model-only histograms."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {metric: inference_totals(text, metric) for metric in (INFERENCE_METRIC, MODEL_METRIC)}


def zoo_source(models: Sequence[str]) -> Path:
    """The zoo directory with `models` exported as ONNX (exported once per machine)."""
    from redge.chaos.demo import zoo_directory
    from redge.runtime.zoo import export

    directory = zoo_directory()
    missing = [m for m in models if not (directory / m / "1-onnx" / "manifest.json").is_file()]
    if missing:
        print(f"exporting {', '.join(missing)} to {directory} (first run only) ...", flush=True)
        export(directory, missing, ["onnx"])
    return directory


class Bench:
    """A LocalCluster with the profile's network and CPU limits, and apps registered."""

    def __init__(self, profile: Profile, size: int, source: Path, scratch: Path, node_args: dict[str, list[str]],
                 model_host_nice: int = 0) -> None:
        from redge.chaos.cluster import LocalCluster
        from redge.chaos.faults import Nemesis

        extra = ["--source", str(source), "--model-threads", "1", "--model-host-nice", str(model_host_nice)]
        self.profile = profile
        self.cluster = LocalCluster(size=size, profile=profile.name, mode=profile.mode, root=scratch / "cluster",
                                    extra_args=extra)
        for node_id, args in node_args.items():
            self.cluster.peers[node_id].args += args
        self.nemesis = Nemesis(self.cluster, random.Random(7))

    def __enter__(self) -> Bench:
        self.cluster.__enter__()
        self.cluster.wait_leader(timeout_s=60)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.nemesis.close()
        finally:
            self.cluster.stop()

    def register(self, app: dict[str, Any]) -> None:
        from redge.chaos.runner import register_apps

        register_apps(self.cluster, [app])

    def wait_loaded(self, apps: Sequence[str], backups_min: int = 0) -> dict[str, Any]:
        from redge.chaos.cluster import wait_until
        from redge.chaos.observe import replicas_loaded

        def loaded() -> bool:
            leader = self.cluster.leader()
            return bool(leader) and replicas_loaded(self.cluster, leader, apps, backups_min=backups_min)

        wait_until(loaded, SERVING_WAIT_S, interval_s=0.2, what=f"apps {list(apps)} loaded")
        return self.cluster.peers[self.cluster.wait_leader()].snapshot() or {}

    def degrade(self, nodes: Sequence[str], serving: Sequence[str]) -> list[str]:
        """Apply the profile's links to `nodes` and its CPU limit to `serving` (after loading,
        so that the model hosts are in the node's group)."""
        from redge.chaos.faults import Delay, PacketLoss, SlowNode

        applied = []
        if self.profile.delay_ms:
            self.nemesis.apply(Delay(nodes=tuple(nodes), ms=self.profile.delay_ms, jitter_ms=self.profile.jitter_ms))
            applied.append("delay")
        if self.profile.loss_percent:
            self.nemesis.apply(PacketLoss(nodes=tuple(nodes), percent=self.profile.loss_percent))
            applied.append("packet-loss")
        if self.profile.node_cpu_fraction:
            for node in serving:
                self.nemesis.apply(SlowNode(node=node, cpu_fraction=self.profile.node_cpu_fraction))
            applied.append("cpu-quota")
        return applied

    def url(self, node: str) -> str:
        return self.cluster.peers[node].url


def _app(name: str, variants: Sequence[str], backup: str = "none", priority: str = "standard") -> dict[str, Any]:
    return {"name": name, "variants": list(variants), "priority": priority, "slo_ms": 60_000, "backup": backup}


def _app_name(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def _serve_on_one_node(bench: Bench, apps: dict[str, str],
                       bodies: dict[str, tuple[bytes, dict[str, str]]]) -> tuple[Any, str]:
    """Register one app per model on the bench's single node, wait until all are loaded, hold
    the node to the profile's weaker device, and warm each model up (first calls pay for lazy
    allocations). Returns what the degradation applied and the node's URL."""
    for model, app in apps.items():
        bench.register(_app(app, [model]))
    bench.wait_loaded(list(apps.values()))
    applied = bench.degrade(["n1"], ["n1"])
    url = bench.url("n1")
    for model, app in apps.items():
        run_clients([(app, [("n1", url)], *bodies[model])], 30.0, count_max=3)
    return applied, url


# ---------------------------------------------------------------------- Fig. 3


def fig3(profile: Profile, settings: Settings, source: Path, scratch: Path,
         models: Sequence[str] = FIG3_MODELS) -> dict[str, Any]:
    """Response time per model through one peer's HTTP endpoint, inference vs network."""
    apps = {model: _app_name(model) for model in models}
    bodies = {model: request_body(source, model) for model in models}
    latencies: dict[str, list[float]] = {model: [] for model in models}
    server: dict[str, list[float]] = {model: [] for model in models}
    model_only: dict[str, list[float]] = {model: [] for model in models}
    failures: dict[str, int] = {model: 0 for model in models}
    with Bench(profile, 1, source, scratch, {}) as bench:
        applied, url = _serve_on_one_node(bench, apps, bodies)
        for round_index in range(settings.rounds):
            for model in models:
                body, headers = bodies[model]
                before = read_all_totals(url)
                operations = run_clients([(apps[model], [("n1", url)], body, headers)], 120.0,
                                         count_max=settings.requests_per_model)
                after = read_all_totals(url)
                latencies[model] += ok_latencies(operations, apps[model])
                failures[model] += sum(1 for o in operations if o.outcome != OK)
                mean = server_mean_ms(before.get(INFERENCE_METRIC, {}), after.get(INFERENCE_METRIC, {}), apps[model])
                if mean is not None:
                    server[model].append(mean)
                mean = server_mean_ms(before.get(MODEL_METRIC, {}), after.get(MODEL_METRIC, {}), apps[model])
                if mean is not None:
                    model_only[model].append(mean)
            print(f"  fig3 {profile.name}: round {round_index + 1}/{settings.rounds}", file=sys.stderr, flush=True)
    rows = [dict(fig3_row(model, latencies[model], server[model]), failed=failures[model],
                 model_ms_mean=_mean(model_only[model])) for model in models]
    return {"figure": "fig3", "profile": profile.name, "emulation": profile.describe(), "degraded_by": applied,
            "rounds": settings.rounds, "requests_per_model_per_round": settings.requests_per_model, "rows": rows}


def plot_fig3(results: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for axis, (profile, result) in zip(axes[0], sorted(results.items()), strict=True):
        models = [row["model"] for row in result["rows"]]
        inference = [row["inference_ms_mean"] or 0 for row in result["rows"]]
        network = [max(0.0, row["network_ms_mean"] or 0) for row in result["rows"]]
        axis.bar(models, inference, label="inference (server side)")
        axis.bar(models, network, bottom=inference, label="network + HTTP")
        p99 = [row["response_ms"].get("p99", 0) for row in result["rows"]]
        axis.plot(models, p99, "k_", markersize=18, label="response p99")
        axis.set_title(f"Fig. 3, {profile}: response time (mean)")
        axis.set_ylabel("ms")
        axis.tick_params(axis="x", rotation=30, labelsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------- Fig. 4


def fig4(profile: Profile, settings: Settings, source: Path, scratch: Path,
         models: Sequence[str] = FIG4_MODELS) -> dict[str, Any]:
    """Each model alone under load, then both at once, on the same node, in interleaved rounds."""
    apps = {model: _app_name(model) for model in models}
    bodies = {model: request_body(source, model) for model in models}
    rounds: list[dict[str, dict[str, dict[str, Any]]]] = []
    with Bench(profile, 1, source, scratch, {}) as bench:
        applied, url = _serve_on_one_node(bench, apps, bodies)
        clients = {model: (apps[model], [("n1", url)], *bodies[model]) for model in models}

        def window(chosen: Sequence[str]) -> dict[str, dict[str, Any]]:
            before = read_all_totals(url)
            operations = run_clients([clients[m] for m in chosen], settings.window_s)
            after = read_all_totals(url)
            return {m: {"latencies_ms": ok_latencies(operations, apps[m]),
                        "server_ms": server_mean_ms(before.get(INFERENCE_METRIC, {}), after.get(INFERENCE_METRIC, {}),
                                                    apps[m]),
                        "model_ms": server_mean_ms(before.get(MODEL_METRIC, {}), after.get(MODEL_METRIC, {}), apps[m]),
                        "failed": sum(1 for o in operations if o.app == apps[m] and o.outcome != OK)}
                    for m in chosen}

        for round_index in range(settings.rounds):
            isolated: dict[str, dict[str, Any]] = {}
            for model in models:
                isolated.update(window([model]))
            rounds.append({"isolated": isolated, "colocated": window(list(models))})
            print(f"  fig4 {profile.name}: round {round_index + 1}/{settings.rounds}", file=sys.stderr, flush=True)
    return {"figure": "fig4", "profile": profile.name, "emulation": profile.describe(), "degraded_by": applied,
            "rounds": settings.rounds, "window_s": settings.window_s, "rows": fig4_rows(rounds),
            "raw_rounds": [{phase: {m: {k: v for k, v in e.items() if k != "latencies_ms"} | {"count": len(e["latencies_ms"])}
                                    for m, e in phases.items()} for phase, phases in one.items()} for one in rounds]}


def plot_fig4(results: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, (profile, result) in zip(axes[0], sorted(results.items()), strict=True):
        models = [row["model"] for row in result["rows"]]
        positions = range(len(models))
        isolated = [row["isolated_ms"].get("mean", 0) for row in result["rows"]]
        colocated = [row["colocated_ms"].get("mean", 0) for row in result["rows"]]
        axis.bar([p - 0.2 for p in positions], isolated, width=0.4, label="isolated")
        axis.bar([p + 0.2 for p in positions], colocated, width=0.4, label="co-located")
        for p, row in zip(positions, result["rows"], strict=True):
            axis.annotate(f"+{_fmt(row['response_mean_increase_percent'])} %", (p + 0.2, colocated[p]),
                          ha="center", va="bottom", fontsize=8)
        axis.set_xticks(list(positions), models)
        axis.set_ylabel("mean response time (ms)")
        axis.set_title(f"Fig. 4, {profile}: co-location")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------- Fig. 5a


def fig5a(profile: Profile, settings: Settings, out: Path) -> dict[str, Any]:
    """The paper-fig5a chaos scenario (iobt links, warm backup, crash the primary), repeated;
    for the enterprise profile the same scenario on loopback without the link faults."""
    from redge.chaos.runner import run_scenario

    data = tomllib.loads(SCENARIO_FIG5A.read_text())
    if profile.name != "iobt":
        data.update(profile=profile.name, mode=profile.mode, name=f"{data['name']}-{profile.name}")
        data["faults"] = [f for f in data["faults"] if f["kind"] not in ("delay", "packet-loss")]
    scenario_path = out / f"fig5a-{profile.name}.toml"
    scenario_path.write_text(_toml(data))
    runs = []
    for index in range(settings.fig5a_repeat):
        seed = data["seed"] + index
        report = run_scenario(scenario_path, out / f"fig5a-{profile.name}-seed{seed}", quiet=True, seed=seed)
        runs.append(fig5a_run_row(report))
        print(f"  fig5a {profile.name}: run {index + 1}/{settings.fig5a_repeat}", file=sys.stderr, flush=True)
    metrics = ("detection_ms", "confirmation_ms", "decision_ms", "recovery_ms", "reconfiguration_ms", "mttr_ms",
               "outage_ms")
    return {"figure": "fig5a", "profile": profile.name, "scenario": str(scenario_path),
            "heartbeat_interval_ms": get_profile(profile.name).heartbeat_interval_ms, "runs": runs,
            "distributions": {m: summary([r[m] for r in runs if r[m] is not None]) for m in metrics},
            "timelines": [f"fig5a-{profile.name}-seed{data['seed'] + i}/timeline.png" for i in range(len(runs))]}


def _toml(data: dict[str, Any]) -> str:
    """A scenario dict back to TOML (scalars, lists, tables, arrays of tables: what scenarios use)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, dict):
            return "{" + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + "}"
        return repr(item)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict | list) or
             (isinstance(v, list) and not all(isinstance(x, dict) for x in v)) or (isinstance(v, list) and not v)]
    for key, item in data.items():
        if isinstance(item, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {value(v)}" for k, v in item.items()]
        elif isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
            for entry in item:
                lines += ["", f"[[{key}]]"] + [f"{k} = {value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- Fig. 5b/5c


def fig5bc_memory(source: Path, variant: str) -> int:
    """Memory for nodes A and B: ample for homogeneous backups; for heterogeneous, room on B
    for APP1 and APP2's smaller variant but not its larger one, so the planner picks the smaller."""
    if variant == "homogeneous":
        return 16 * 1024**3
    app1 = memory_of(source, FIG5BC_APP1[0])
    large, small = (memory_of(source, m) for m in FIG5BC_APP2)
    return int((app1 + (large + small) / 2) / 0.9)  # the planner keeps 10 % headroom


def fig5bc_layout(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Who is where: B hosts APP1's primary, A APP2's primary; APP2's warm backup must be on B."""
    plan = snapshot.get("plan", {})

    def replica(app: str, role: str) -> dict[str, Any] | None:
        return next((r for r in plan.get(app, []) if r["role"] == role), None)

    app1, app2, app2_warm, app1_warm = (replica("app1", "primary"), replica("app2", "primary"),
                                        replica("app2", "warm"), replica("app1", "warm"))
    return {
        "B": app1 and app1["node_id"], "A": app2 and app2["node_id"],
        "app2_backup_node": app2_warm and app2_warm["node_id"], "app2_backup_variant": app2_warm and app2_warm["variant"],
        "app1_backup_node": app1_warm and app1_warm["node_id"],
        "as_paper": bool(app1 and app2 and app2_warm and app2_warm["node_id"] == app1["node_id"]
                         and app1["node_id"] != app2["node_id"]),
    }


def fig5bc_variant(profile: Profile, settings: Settings, source: Path, scratch: Path, variant: str,
                   app1: Sequence[str] = FIG5BC_APP1, app2: Sequence[str] = FIG5BC_APP2,
                   memory_bytes: int | None = None) -> tuple[dict[str, Any], list[Operation], dict[str, Any]]:
    from redge.chaos.cluster import wait_until
    from redge.chaos.faults import Crash

    memory = memory_bytes or fig5bc_memory(source, variant)
    tiny = ["--memory-bytes", "1000000", "--storage-budget-bytes", "1000000"]
    node_args = {"n1": ["--memory-bytes", str(memory)], "n2": ["--memory-bytes", str(memory)], "n3": tiny}
    # The peer's default model-host nice (10): failure detection must not starve here.
    with Bench(profile, 3, source, scratch, node_args, model_host_nice=10) as bench:
        # The planner spreads primaries and puts a warm backup on another node with room; n3
        # has none. APP1 first without a backup, then APP2 (primary on the other node, warm
        # backup beside APP1), then APP1's own warm backup: the paper's crossed layout.
        bench.register(_app("app1", app1, backup="none", priority="critical"))
        bench.wait_loaded(["app1"])
        bench.register(_app("app2", app2, backup="warm", priority="critical"))
        bench.wait_loaded(["app2"], backups_min=1)
        bench.register(_app("app1", app1, backup="warm", priority="critical"))
        try:
            bench.wait_loaded(["app1", "app2"], backups_min=1)
        except Exception:  # noqa: BLE001 - APP1's backup on A is not what is measured
            pass
        snapshot = bench.wait_loaded(["app1", "app2"])
        layout = fig5bc_layout(snapshot)
        if not layout["as_paper"]:
            raise RuntimeError(f"the planner did not give the paper's layout: {layout}")
        node_a, node_b = layout["A"], layout["B"]
        node_c = next(n for n in bench.cluster.peers if n not in (node_a, node_b))
        applied = bench.degrade(list(bench.cluster.peers), [node_a, node_b])
        order = {"app1": [node_b, node_a, node_c], "app2": [node_a, node_b, node_c]}
        bodies = {"app1": request_body(source, app1[0]), "app2": request_body(source, app2[0])}
        clients = [(app, [(n, bench.url(n)) for n in order[app]], *bodies[app]) for app in ("app1", "app2")]
        for client in clients:
            run_clients([(client[0], client[1][:1], client[2], client[3])], 30.0, count_max=3)
        started_at_ms = time.time() * 1000
        operations: list[Operation] = []
        readings: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}

        def load() -> None:
            operations.extend(run_clients(clients, settings.fig5bc_before_s + settings.fig5bc_after_s))

        import threading

        thread = threading.Thread(target=load, daemon=True)
        readings["start"] = {n: read_totals(bench.url(n)) for n in (node_a, node_b)}
        thread.start()
        fault_at = time.monotonic() + settings.fig5bc_before_s
        wait_until(lambda: time.monotonic() >= fault_at, settings.fig5bc_before_s + 5, interval_s=0.05,
                   what="the fault time")
        readings["fault"] = {n: read_totals(bench.url(n)) for n in (node_a, node_b)}
        record = bench.nemesis.apply(Crash(node=node_a))
        settle_s = min(5.0, settings.fig5bc_after_s / 3)
        settled_at = time.monotonic() + settle_s
        wait_until(lambda: time.monotonic() >= settled_at, settle_s + 5, interval_s=0.05, what="the settle time")
        readings["settled"] = {node_b: read_totals(bench.url(node_b))}
        thread.join(timeout=settings.fig5bc_after_s + REQUEST_TIMEOUT_S + 30)
        readings["end"] = {node_b: read_totals(bench.url(node_b))}
        after_snapshot = bench.cluster.peers[node_b].snapshot() or {}
        from redge.chaos.runner import fetch_events

        events = fetch_events(bench.cluster)
    servers = {
        "app1": {"before": server_mean_ms(readings["start"][node_b], readings["fault"][node_b], "app1"),
                 "after": server_mean_ms(readings["settled"][node_b], readings["end"][node_b], "app1")},
        "app2": {"before": server_mean_ms(readings["start"][node_a], readings["fault"][node_a], "app2"),
                 "after": server_mean_ms(readings["settled"][node_b], readings["end"][node_b], "app2")},
    }
    row = fig5bc_row(variant, operations, record.applied_at_ms, settle_s * 1000, servers)
    row.update(layout=layout, degraded_by=applied, memory_bytes_a_b=memory,
               plan_after=after_snapshot.get("plan", {}),
               failed=sum(1 for o in operations if o.outcome == FAIL),
               unknown=sum(1 for o in operations if o.outcome == INFO))
    timeline = {"started_at_ms": started_at_ms, "faults": [record.to_dict()], "events": events,
                "scenario": {"name": f"fig5bc {variant}", "seed": 7, "profile": profile.name}}
    return row, operations, timeline


def fig5bc(profile: Profile, settings: Settings, source: Path, scratch: Path, out: Path) -> dict[str, Any]:
    from redge.chaos.faults import FaultRecord
    from redge.chaos.measure import measure
    from redge.chaos.report import plot

    rows = []
    # Trials alternate the two variants, so that the machine's background load hits both alike.
    for trial in range(1, settings.fig5bc_repeat + 1):
        for variant in ("homogeneous", "heterogeneous"):
            name = f"fig5bc-{profile.name}-{variant}-trial{trial}"
            row, operations, timeline = fig5bc_variant(profile, settings, source, scratch / name, variant)
            faults = [FaultRecord.from_dict(f) for f in timeline["faults"]]
            timeline["measurements"] = [m.to_dict() for m in measure(operations, faults, timeline["events"])]
            plot(timeline, operations, out / f"{name}.png")
            (out / f"{name}-history.jsonl").write_text("".join(json.dumps(o.to_dict()) + "\n" for o in operations))
            rows.append(dict(row, trial=trial))
            print(f"  fig5bc {profile.name}: {variant} trial {trial}/{settings.fig5bc_repeat} done",
                  file=sys.stderr, flush=True)
    return {"figure": "fig5bc", "profile": profile.name, "emulation": profile.describe(),
            "app1": list(FIG5BC_APP1), "app2": list(FIG5BC_APP2), "rows": rows, "summary": fig5bc_summary(rows)}


# ---------------------------------------------------------------------- CLI


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    result = dict(result, machine_load_end=machine_load(), paper=PAPER.get(result.get("figure", ""), {}))
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown + "\n")
    print(f"\n{name}\n{markdown}\n", flush=True)


def run_figure(figure: str, profiles: Sequence[Profile], settings: Settings, out: Path) -> dict[str, Any]:
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        load_start = machine_load()
        with tempfile.TemporaryDirectory(prefix=f"redge-paper-{figure}-") as scratch:
            if figure == "fig3":
                result = fig3(profile, settings, zoo_source(FIG3_MODELS), Path(scratch))
                markdown = fig3_markdown(result)
            elif figure == "fig4":
                result = fig4(profile, settings, zoo_source(FIG4_MODELS), Path(scratch))
                markdown = fig4_markdown(result)
            elif figure == "fig5a":
                result = fig5a(profile, settings, out)
                markdown = fig5a_markdown(result)
            else:
                result = fig5bc(profile, settings, zoo_source(FIG5BC_APP1 + FIG5BC_APP2), Path(scratch), out)
                markdown = fig5bc_markdown(result)
        result["machine_load_start"] = load_start
        _write(out, f"{figure}-{profile.name}", result, markdown)
        results[profile.name] = result
    if figure == "fig3":
        plot_fig3(results, out / "fig3.png")
        if set(results) == {"enterprise", "iobt"}:
            comparison = fig3_compare(results["enterprise"], results["iobt"])
            _write(out, "fig3-compare", {"figure": "fig3", "rows": comparison}, markdown_table(
                ("model", "iobt inference +%", "iobt network +%", "iobt response p50 +%"),
                [(r["model"], r["inference_percent"], r["network_percent"], r["response_p50_percent"])
                 for r in comparison]))
    elif figure == "fig4":
        plot_fig4(results, out / "fig4.png")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=[*FIGURES, "all"])
    parser.add_argument("--profile", choices=["enterprise", "iobt", "both"], default="both")
    parser.add_argument("--out", type=Path, default=Path("results/paper"))
    parser.add_argument("--quick", action="store_true", help="one short round: to try the commands, not for numbers")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = ["enterprise", "iobt"] if args.profile == "both" else [args.profile]
    profiles = [PROFILES[name] for name in names]
    if any(p.mode == "netns" for p in profiles) and os.geteuid() != 0:
        print("the iobt profile needs root (network namespaces, nftables, cgroups)", file=sys.stderr)
        return 3
    settings = Settings.quick() if args.quick else Settings()
    for figure in FIGURES if args.figure == "all" else [args.figure]:
        run_figure(figure, profiles, settings, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
