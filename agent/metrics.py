"""Prometheus metrics of one peer, in a registry of its own.

A registry per peer (not the global default) lets tests and embedded users run several
peers in one process without their series colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PeerMetrics:
    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.info = Gauge("redge_peer_info", "Constant 1, labelled with the node id", ["node"], **labels)
        self.info.labels(node=node_id).set(1)
        self.raft_term = Gauge("redge_raft_term", "Current Raft term", **labels)
        self.raft_commit_index = Gauge("redge_raft_commit_index", "Raft commit index", **labels)
        self.raft_is_leader = Gauge("redge_raft_is_leader", "1 when this peer is the Raft leader", **labels)
        self.raft_has_quorum = Gauge("redge_raft_has_quorum", "1 when this peer sees a Raft majority", **labels)
        self.leader_changes = Counter("redge_raft_leader_changes_total", "Leader or term changes seen", **labels)
        self.epoch = Gauge("redge_plan_epoch", "Epoch of the committed plan", **labels)
        self.members = Gauge("redge_members", "Members by status", ["status"], **labels)
        self.commands_applied = Counter(
            "redge_commands_applied_total", "Commands applied by outcome", ["command", "outcome"], **labels
        )
        self.proposal_seconds = Histogram(
            "redge_proposal_seconds",
            "Time from proposing a command to seeing it committed",
            ["command"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            **labels,
        )
        self.proposal_failures = Counter(
            "redge_proposal_failures_total", "Proposals that failed or timed out", ["command", "error"], **labels
        )
        self.verdicts = Counter(
            "redge_detector_verdicts_total", "Local detector verdicts by kind (Suspect, Recover, ...)", ["kind"], **labels
        )
        self.elections_hastened = Counter(
            "redge_elections_hastened_total",
            "Times this peer brought its Raft election turn forward because its leader was quiet or "
            "suspected (no election follows if the leader answers before the turn)",
            ["why"],
            **labels,
        )
        self.raft_frames_refused = Gauge(
            "redge_raft_frames_refused",
            "Raft connections closed by the frame guard, by reason (oversized, bad_length, unauthenticated, ...)",
            ["reason"],
            **labels,
        )
        self.heartbeats_sent = Gauge("redge_heartbeats_sent", "Heartbeats sent since start", **labels)
        self.heartbeats_accepted = Gauge("redge_heartbeats_accepted", "Heartbeats accepted since start", **labels)
        self.heartbeats_rejected = Gauge(
            "redge_heartbeats_rejected", "Packets dropped by reason (forged, foreign, malformed)", ["reason"], **labels
        )
        self.heartbeat_send_gap_ms_max = Gauge(
            "redge_heartbeat_send_gap_ms_max", "Longest gap between two heartbeat sends", **labels
        )
        self.detector_phi_max = Gauge(
            "redge_detector_phi_max",
            "Highest phi a watched node reached before its next heartbeat arrived, without being suspected",
            **labels,
        )
        self.detector_self_pause_ms_max = Gauge(
            "redge_detector_self_pause_ms_max", "Longest stall of this peer's own detector loop", **labels
        )
        self.inference_seconds = Histogram(
            "redge_inference_seconds",
            "Time to run one inference on this peer (model host round trip)",
            ["app"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            **labels,
        )
        self.model_seconds = Histogram(
            "redge_model_seconds",
            "Time inside the model for one inference (the rest of redge_inference_seconds is the host hop and its queue)",
            ["app"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            **labels,
        )
        self.forwards = Counter(
            "redge_forwards_total", "Requests forwarded to another peer, by outcome", ["outcome"], **labels
        )
        self.request_body_bytes_held = Gauge(
            "redge_request_body_bytes_held", "Bytes of request bodies the HTTP workers hold now", **labels
        )
        self.requests_held = Counter(
            "redge_requests_held_total",
            "Inference requests held while their app recovered, by how the hold ended (answered, expired: the "
            "deadline came first, refused: the worker held its most already)",
            ["outcome"],
            **labels,
        )
        self.hold_seconds = Histogram(
            "redge_request_hold_seconds", "How long held requests waited for their app to recover",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), **labels,
        )
        self.request_bodies_refused = Counter(
            "redge_request_bodies_refused_total",
            "Inference requests refused before their body was read, by status (411 no length, 413 too large, "
            "503 over the bytes held)",
            ["status"],
            **labels,
        )
        self.dataplane_worker_restarts = Gauge(
            "redge_dataplane_worker_restarts", "HTTP worker processes restarted after they died", **labels
        )
        self.detector_probe_rounds = Gauge(
            "redge_detector_probe_rounds", "Probe rounds this peer started (a hint or a silence to check)", **labels
        )
        self.detector_probe_rounds_answered = Gauge(
            "redge_detector_probe_rounds_answered", "Probe rounds an authenticated answer ended", **labels
        )
        self.detector_hints_refuted = Gauge(
            "redge_detector_hints_refuted",
            "Refusals and dropped connections that the node's probe answers disproved",
            **labels,
        )
        self.detector_local_health = Gauge(
            "redge_detector_local_health",
            "This peer's local health score (0 healthy; its own stalls raise it, and its timeouts with it)",
            **labels,
        )
        self.gc_pause_ms_max = Gauge(
            "redge_gc_pause_ms_max", "Longest pause of the control process's garbage collector", **labels
        )
        self.http_requests = Counter(
            "redge_http_requests_total", "HTTP requests by route and status", ["route", "status"], **labels
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
