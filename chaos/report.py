"""What a chaos run produced, for people and for scripts: a JSON report, a plot and a timeline.

The plot follows the paper's Figs. 5 and 6: response time against time, one colour per
serving node (so the switch to a backup shows) and one marker per app, with each fault, confirmation, plan and recovery marked where it happened, so the cost of a
failure can be seen at a glance. Failed requests are red crosses and unknown ones orange
triangles, drawn at the time they took; they are never hidden among the successes.

The timeline table merges the three records of a run (faults, the cluster's events, the
clients' first error and first recovery) on one clock, in seconds from the start of the load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redge.chaos.history import FAIL, INFO, OK, Operation

TIMELINE_EVENT_KINDS = (
    "suspicion", "failure_confirmed", "plan_committed", "load_started", "load_done", "serving", "load_failed",
    "member_recovered", "member_rejoined", "member_cleared", "suspicion_withdrawn", "member_degraded",
    "member_restored",
)
TIMELINE_ROWS_MAX = 200


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def timeline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {t_s, source, what} from faults, events and client recoveries, in time order."""
    start = report["started_at_ms"]
    rows = []
    for fault in report["faults"]:
        rows.append({"t_s": (fault["applied_at_ms"] - start) / 1000, "source": "nemesis",
                     "what": f"apply {fault['kind']} on {','.join(fault['targets']) or '?'}"
                             + (f" (error: {fault['error']})" if fault["error"] else "")})
        if fault["healed_at_ms"] is not None:
            rows.append({"t_s": (fault["healed_at_ms"] - start) / 1000, "source": "nemesis",
                         "what": f"heal {fault['kind']} on {','.join(fault['targets'])}"})
    for event in report["events"]:
        if event["kind"] in TIMELINE_EVENT_KINDS and event["at_ms"] >= start:
            details = " ".join(f"{k}={v}" for k, v in event.items()
                               if k in ("node", "observer", "observers", "epoch", "app", "reason", "duration_ms"))
            rows.append({"t_s": (event["at_ms"] - start) / 1000, "source": "cluster", "what": f"{event['kind']} {details}"})
    for m in report["measurements"]:
        for app in m["apps"]:
            if app["mttr_ms"] is not None:
                rows.append({"t_s": (m["applied_at_ms"] + app["mttr_ms"] - start) / 1000, "source": "clients",
                             "what": f"{app['app']} recovered: every disrupted client answered again "
                                     f"(MTTR {app['mttr_ms']:.0f} ms)"})
    rows.sort(key=lambda row: row["t_s"])
    return rows[:TIMELINE_ROWS_MAX]


DETECTION_METRICS = (
    "redge_heartbeat_send_gap_ms_max", "redge_detector_phi_max", "redge_detector_self_pause_ms_max",
    "redge_raft_leader_changes_total",
    'redge_elections_hastened_total{why="quiet"}', 'redge_elections_hastened_total{why="suspected"}',
)


def detection_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the failure detectors said in the whole run, start-up included (a live node
    confirmed while the apps load is as false as one confirmed under load): committed
    suspicions by reason and by node, confirmations, and each peer's own figures
    (`peer_metrics`, scraped at the end of the run): its longest heartbeat send gap, the
    highest phi it saw answered, its longest stall. A soak without faults must show no
    confirmation; the rest says how close it came."""
    events = report["events"]
    suspicions = [e for e in events if e["kind"] == "suspicion"]
    by_reason: dict[str, int] = {}
    by_node: dict[str, int] = {}
    for event in suspicions:
        by_reason[str(event.get("reason"))] = by_reason.get(str(event.get("reason")), 0) + 1
        by_node[str(event.get("node"))] = by_node.get(str(event.get("node")), 0) + 1
    peers: dict[str, dict[str, float]] = report.get("peer_metrics") or {}

    def largest(name: str) -> float | None:
        values = [figures[name] for figures in peers.values() if name in figures]
        return max(values) if values else None

    def total(name: str) -> float:
        return sum(figures.get(name, 0.0) for figures in peers.values())

    return {
        "suspicions": len(suspicions),
        "suspicions_by_reason": dict(sorted(by_reason.items())),
        "suspicions_by_node": dict(sorted(by_node.items())),
        "confirmations": sum(1 for e in events if e["kind"] == "failure_confirmed"),
        "confirmed_nodes": [e.get("node") for e in events if e["kind"] == "failure_confirmed"],
        "send_gap_ms_max": largest("redge_heartbeat_send_gap_ms_max"),
        "phi_max": largest("redge_detector_phi_max"),
        "self_pause_ms_max": largest("redge_detector_self_pause_ms_max"),
        # Election turns a peer brought forward: on a quiet leader (before any suspicion) or on
        # a suspected one. Each follower counts its own, and no election follows if the leader
        # answers before the turn; leader_changes_max says how often the leader did change.
        "elections_hastened_quiet": total('redge_elections_hastened_total{why="quiet"}'),
        "elections_hastened_suspected": total('redge_elections_hastened_total{why="suspected"}'),
        "leader_changes_max": largest("redge_raft_leader_changes_total"),
        "peers": peers,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(report: dict[str, Any], width: int = 120) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=width)
    scenario = report["scenario"]
    check = report["check"]
    verdict = "[green]valid[/green]" if check["valid"] else "[red]INVALID[/red]"
    console.print(f"scenario [bold]{scenario['name']}[/bold] seed {scenario['seed']} ({scenario['mode']}, "
                  f"{scenario['peers']} peers, {scenario['profile']}): {verdict}; requests {check['counts']}")
    events = Table(title="timeline (s from the start of the load)")
    for column in ("t (s)", "source", "what"):
        events.add_column(column)
    for row in report["timeline"]:
        events.add_row(f"{row['t_s']:.3f}", row["source"], row["what"])
    console.print(events)
    metrics = Table(title="per fault (ms)")
    for column in ("fault", "targets", "detect", "confirm", "decide", "load", "app", "reconfig", "MTTR",
                   "outage", "failed", "unknown"):
        metrics.add_column(column)
    for m in report["measurements"]:
        loading = ",".join(_ms(load["loading_ms"]) for load in m["loading"]) or "-"
        apps = m["apps"] or [None]
        for app in apps:
            metrics.add_row(
                f"{m['fault_id']} {m['kind']}", ",".join(m["targets"]), _ms(m["detection_ms"]),
                _ms(m["confirmation_ms"]), _ms(m["decision_ms"]), loading,
                app["app"] if app else "-", _ms(app["reconfiguration_ms"]) if app else "-",
                _ms(app["mttr_ms"]) if app else "-", _ms(app["outage_ms"]) if app else "-",
                str(app["failed"]) if app else "-", str(app["unknown"]) if app else "-",
            )
    console.print(metrics)
    detection = report.get("detection")
    if detection:
        console.print(
            f"detection: {detection['suspicions']} suspicions {detection['suspicions_by_reason']} on "
            f"{detection['suspicions_by_node']}, {detection['confirmations']} confirmations "
            f"{detection['confirmed_nodes']}; send gap max {_ms(detection['send_gap_ms_max'])} ms, "
            f"phi max {_number(detection['phi_max'])}, self pause max {_ms(detection['self_pause_ms_max'])} ms; "
            f"election turns brought forward {detection.get('elections_hastened_quiet', 0):.0f} on a quiet "
            f"leader, {detection.get('elections_hastened_suspected', 0):.0f} on a suspected one; "
            f"leader changes seen {_ms(detection.get('leader_changes_max'))}"
        )
    for violation in check["violations"]:
        console.print(f"[red]violation[/red] {violation['invariant']}: {violation['message']}")


def plot(report: dict[str, Any], operations: Sequence[Operation], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = report["started_at_ms"]
    figure, axis = plt.subplots(figsize=(11, 4))
    apps = sorted({o.app for o in operations})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    servers = sorted({o.node or o.target for o in operations if o.outcome == OK})
    markers = ".+1234"
    for index, app in enumerate(apps):
        mine = [o for o in operations if o.app == app]
        # One colour per serving node, as in Fig. 6: the switch to the backup is visible.
        for server_index, server in enumerate(servers):
            ok = [((o.start_ms - start) / 1000, o.latency_ms) for o in mine
                  if o.outcome == OK and (o.node or o.target) == server]
            if ok:
                axis.plot(*zip(*ok, strict=True), markers[index % len(markers)], markersize=3,
                          color=colors[server_index % len(colors)], label=f"{app} ok from {server}")
        for outcome, marker, color, label in ((FAIL, "x", "red", "failed"), (INFO, "^", "black", "unknown")):
            points = [((o.start_ms - start) / 1000, max(o.latency_ms, 0.1)) for o in mine if o.outcome == outcome]
            if points:
                axis.plot(*zip(*points, strict=True), marker, color=color, markersize=5, linestyle="none", label=f"{app} {label}")
    marks_seen: set[str] = set()

    def mark(at_ms: float, color: str, style: str, label: str) -> None:
        axis.axvline((at_ms - start) / 1000, color=color, linestyle=style, linewidth=1,
                     label=label if label not in marks_seen else None)
        marks_seen.add(label)

    for fault in report["faults"]:
        mark(fault["applied_at_ms"], "black", "--", "fault")
        axis.annotate(f"{fault['kind']} {','.join(fault['targets'])}", ((fault["applied_at_ms"] - start) / 1000, 1),
                      xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7)
        if fault["healed_at_ms"] is not None:
            mark(fault["healed_at_ms"], "gray", ":", "healed")
    for m in report["measurements"]:
        if m["confirmation_ms"] is not None:
            mark(m["applied_at_ms"] + m["confirmation_ms"], "purple", "-.", "failure confirmed")
        for app in m["apps"]:
            if app["mttr_ms"] is not None:
                mark(m["applied_at_ms"] + app["mttr_ms"], "green", "-", "recovered")
    for event in report["events"]:
        if event["kind"] == "plan_committed" and event["at_ms"] >= start:
            mark(event["at_ms"], "tab:blue", (0, (1, 3)), "plan committed")
    axis.set_xlabel("time (s)")
    axis.set_ylabel("response time (ms)")
    axis.set_yscale("log")
    axis.set_title(f"{report['scenario']['name']} (seed {report['scenario']['seed']}, {report['scenario']['profile']})")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
