"""The peer process: wires Raft, the HTTP API and the peer's own duties together.

A peer is one member of the Raft group. On start it binds its ports (failing with a clear
message when one is taken), joins or forms the group, and announces itself with a `Join`
command carrying an incarnation number that grows on every start, so the cluster can tell a
restarted node from a stale message about its previous life. It keeps that announcement
true: if the cluster confirms it failed while it was in fact alive (a pause, a partition),
it rejoins with a higher incarnation. On SIGTERM it leaves: it records `Leave`, hands over
leadership if it holds it, removes itself from the Raft group and stops.

This process is the control plane: Raft, heartbeats and probes, the leader's planning and
the reconciler, nothing that can hold the CPU for long. HTTP is served by data-plane worker
processes (agent/dataplane.py, started and restarted by agent/workers.py) on the port this
process binds; they route from a table it pushes (`routes_changed`), run inference on the
model host directly, and pass admin and cluster calls to this process's own API, which
listens only on an abstract Unix socket and asks for a per-boot token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web

from redge.agent import routes as routing
from redge.agent.api import build_app
from redge.agent.clock import wall_ms
from redge.agent.config import PeerConfig
from redge.agent.dataplane import WorkerConfig
from redge.agent.detection import DetectionConfig, FailureDetection
from redge.agent.errors import JoinFailed
from redge.agent.gcwatch import GcWatch, freeze_startup_objects
from redge.agent.joining import JOIN_SIGNATURE_HEADER, sign_join
from redge.agent.leader import LeaderDuty
from redge.agent.metrics import PeerMetrics
from redge.agent.profile import Profile, get_profile
from redge.agent.reconciler import Reconciler
from redge.agent.replicas import ReplicaManager
from redge.agent.slowness import SlownessJudge, SlownessSettings
from redge.agent.verdicts import Degraded, Restored
from redge.agent.workers import DataPlaneWorkers
from redge.consensus import commands as c
from redge.consensus.addresses import split_address
from redge.consensus.errors import ConsensusError
from redge.consensus.raft import RaftNode, RaftStatus, frame_stats
from redge.consensus.state import ALIVE, FAILED, LEFT, ClusterState, Outcome
from redge.runtime.host import HostOptions
from redge.runtime.priority import set_autogroup_nice
from redge.runtime.store import Store

log = structlog.get_logger("redge.peer")

# A node judged too slow with no requests for this long is restored: the planner moved its
# apps away, and without evidence it should get a chance again rather than stay marked.
SLO_QUIET_S = 30.0
SLO_JUDGE_INTERVAL_S = 1.0
HTTP_BACKLOG = 1024
# A peer that left the group (SIGTERM) and started again asks to be added back once it has
# seen no leader this long, then again every REJOIN_RETRY_S.
REJOIN_AFTER_S = 2.0
REJOIN_RETRY_S = 2.0
CONTROL_TOKEN_BYTES = 32


def now_ms() -> int:
    return wall_ms()


T = TypeVar("T")

class PeerCluster:
    """The ClusterPort (agent/ports.py) of a running peer, over its Raft node."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self.node_id = peer.node_id

    def read(self, reader: Callable[[ClusterState], T]) -> T:
        raft = self._peer.raft
        return reader(ClusterState()) if raft is None else raft.read(reader)  # (empty before it starts)

    def leading(self) -> bool:
        raft = self._peer.raft
        return raft is not None and raft.status().is_leader and self.following()

    def following(self) -> bool:
        # A replica that could not read a snapshot (RaftNode.unreadable) must not act on its state.
        raft = self._peer.raft
        return raft is not None and not raft.unreadable()

    def partners(self) -> list[str]:
        raft = self._peer.raft
        return [] if raft is None else list(raft.status().partners)

    async def propose(self, command: c.Command, timeout_s: float | None = None) -> Outcome:
        return await self._peer.propose(command, timeout_s)

    async def remove_voter(self, raft_address: str) -> None:
        assert self._peer.raft is not None
        await self._peer.raft.remove_member(raft_address, timeout_s=self._peer.profile.proposal_timeout_s)


class Peer:
    """One `redge peer`. Use `await peer.start()`, then `await peer.wait_closed()`."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.profile: Profile = get_profile(config.profile)
        self.metrics = PeerMetrics(config.node_id)
        self.raft: RaftNode | None = None
        self.detection: FailureDetection | None = None
        self.store: Store | None = None
        self.replicas: ReplicaManager | None = None
        self.workers: DataPlaneWorkers | None = None
        self.cluster = PeerCluster(self)
        self.leader = LeaderDuty(self.cluster, watch_rotation_s=config.watch_rotation_s)
        self.reconciler: Reconciler | None = None
        self.incarnation = 0
        self.started_at_ms = now_ms()
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = asyncio.Event()
        self._stopping = False
        self._registered = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._commit_hooks: list[Callable[[c.Command | None, Outcome], None]] = []
        self._commit_signal = asyncio.Event()
        # This node's own latencies against its apps' SLOs (the judge observers use for the
        # nodes they forward to, here pointed at itself): restored once the median is within
        # the SLO again, or after SLO_QUIET_S without requests (its apps were moved away).
        self.slowness = SlownessJudge(SlownessSettings(latency_factor=config.slo_factor, restore_factor=1.0))
        self._slo_detail = ""
        self._served_at_s = 0.0
        # The control API: an abstract Unix socket (a short private path where there is no
        # abstract namespace) and the token every call must carry; both new on each start.
        self.control_token = os.urandom(CONTROL_TOKEN_BYTES).hex()
        self.control_address = _control_address(config.node_id)
        self._routes_scheduled = False
        self._body_bytes_held: dict[int, int] = {}
        self.gc_watch = GcWatch()

    # ------------------------------------------------------------------ start

    async def start(self) -> None:

        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.incarnation = self._next_incarnation()
        partners = list(config.peers)
        if config.join:
            partners = await self._discover_members(config.join)
        self.raft = RaftNode(
            self_address=config.raft,
            partner_addresses=partners,
            secret=config.secret,
            timing=self.profile.raft,
            data_dir=config.data_dir / "raft",
            wall_ms=wall_ms,
        )
        self.raft.on_commit(self._on_commit)
        self.raft.on_leader_change(self._on_leader_change)
        listener: socket.socket | None = None
        try:
            listener = _bind_http(config.http)
            self.store = Store(config.store_dir, config.storage_budget_bytes)
            # The model host runs below the peer's CPU priority: on a saturated box heartbeats
            # and Raft must come first, or load alone looks like a failure to the neighbours.
            # The price is slower loads while the box is busy.
            self.replicas = ReplicaManager(
                self.store,
                config.device_kind,
                # Every artifact's sha256 is checked before its first load here and after any
                # change to its files (`store.verify_stamped`).
                HostOptions(device=config.device_kind, threads=config.model_threads, nice=config.model_host_nice,
                            load_nice=config.model_host_load_nice, verify="stamped"),
            )
            self.replicas.on_change = self.routes_changed
            self.reconciler = Reconciler(
                self.cluster, self.replicas, self.store, config.source, registered=self.wait_registered,
                cold_serving_format=config.cold_serving_format, read_token=config.read_token,
            )
            self.add_commit_hook(self.leader.on_commit)
            self.add_commit_hook(self.reconciler.on_commit)
            self.detection = FailureDetection(self.cluster, self.raft, self.metrics, DetectionConfig(
                heartbeat_address=config.heartbeat, secret=config.secret, settings=self.profile.detector,
                proposal_timeout_s=self.profile.proposal_timeout_s, watch_rotation_s=config.watch_rotation_s,
                incarnation=self.incarnation,
            ))
            await self.detection.start()
            self._runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.UnixSite(self._runner, self.control_address).start()
            self.workers = DataPlaneWorkers(self._worker_template(), config.http_workers, config.http_worker_nice,
                                            self.on_worker_stats)
            await self.workers.start(listener)
            workers = self.workers
            self.metrics.dataplane_worker_restarts.set_function(lambda: workers.restarts_total)
            self.gc_watch.install()
            self.metrics.gc_pause_ms_max.set_function(lambda: self.gc_watch.pause_ms_max)
            self.routes_changed()
            log.info(
                "peer_started",
                http=config.http,
                raft=config.raft,
                heartbeat=config.heartbeat,
                incarnation=self.incarnation,
                profile=self.profile.name,
                partners=partners,
            )
            if config.join:
                await self._request_join(config.join)
        except BaseException:
            if self.workers is not None:
                await self.workers.stop()
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            if self.detection is not None:
                await self.detection.stop()
            if listener is not None:
                listener.close()
            self.raft.close()
            raise
        self._listener = listener
        self._tasks.append(asyncio.create_task(self._keep_registered(), name="keep_registered"))
        self.leader.start()
        self.reconciler.start()
        self._tasks.append(asyncio.create_task(self._refresh_metrics(), name="refresh_metrics"))
        self._tasks.append(asyncio.create_task(self._report_slowness(), name="report_slowness"))

    def _worker_template(self) -> WorkerConfig:
        config = self.config
        return WorkerConfig(
            node_id=self.node_id, index=0, listen_fd=-1, channel_fd=-1,
            control_address=self.control_address, control_token=self.control_token,
            store_dir=str(config.store_dir), storage_budget_bytes=config.storage_budget_bytes,
            request_body_bytes_max=config.request_body_bytes_max,
            request_bytes_held_max=config.request_bytes_held_max // config.http_workers,
            dynamic_dimension_max=config.dynamic_dimension_max, held_requests_max=config.held_requests_max,
            request_timeout_s=self.profile.request_timeout_s, forward_timeout_s=self.profile.forward_timeout_s,
            log_level=config.log_level,
            read_digests=tuple(
                hashlib.sha256(token.encode()).hexdigest() for token in (config.read_token, config.admin_token) if token
            ) if config.read_token else (),
        )

    # ------------------------------------------------------------------ the data plane

    def routes_changed(self) -> None:
        """Something the workers route by may have changed: publish the table once this loop
        turn is over (a burst of commits makes one message)."""
        if self._routes_scheduled or self.workers is None:
            return
        self._routes_scheduled = True
        asyncio.get_running_loop().call_soon(self._publish_routes)

    def _publish_routes(self) -> None:
        self._routes_scheduled = False
        if self.raft is None or self.workers is None or self.replicas is None:
            return
        view = self.raft.read(lambda state: routing.cluster_view(state, self.node_id))
        table = routing.route_table(view, self.replicas.local_models(), ready=self.is_ready(),
                                    host=self.replicas.host_endpoint())
        self.workers.publish(table)

    def on_worker_stats(self, message: dict[str, Any]) -> None:
        """What a worker served since its last batch: into the metrics and the SLO judge."""
        metrics = self.metrics
        try:
            for app, latency_ms, model_ms, slo_ms in message.get("served", []):
                metrics.inference_seconds.labels(app=app).observe(latency_ms / 1000)
                metrics.model_seconds.labels(app=app).observe(model_ms / 1000)
                if slo_ms > 0:
                    # From the parsed request to the answer: not the client's upload, nor a
                    # failed forward to the primary that came before serving here.
                    self.on_served(slo_ms, latency_ms)
            for _ in range(int(message.get("timeouts", 0))):
                self.on_timed_out()
            if self.detection is not None:
                for node_id in message.get("request_timeouts", []):
                    self.detection.on_request_timeout(node_id)
            for outcome, count in message.get("forwards", {}).items():
                metrics.forwards.labels(outcome=outcome).inc(count)
            for route, status, count in message.get("http", []):
                metrics.http_requests.labels(route=route, status=status).inc(count)
            for status, count in message.get("bodies_refused", {}).items():
                metrics.request_bodies_refused.labels(status=status).inc(count)
            for outcome, count in message.get("held", {}).items():
                metrics.requests_held.labels(outcome=outcome).inc(count)
            for held_ms in message.get("held_ms", []):
                metrics.hold_seconds.observe(held_ms / 1000)
            self._body_bytes_held[int(message.get("index", 0))] = int(message.get("body_bytes_held", 0))
            metrics.request_body_bytes_held.set(sum(self._body_bytes_held.values()))
        except (TypeError, ValueError) as error:  # a worker of another build: its batch is lost, not us
            log.warning("worker_stats_unreadable", error=str(error))

    def _next_incarnation(self) -> int:
        path = self.config.data_dir / "incarnation"
        try:
            previous = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            previous = 0
        incarnation = max(previous + 1, 1)
        self._write_incarnation(incarnation)
        return incarnation

    def _write_incarnation(self, incarnation: int) -> None:
        path = self.config.data_dir / "incarnation"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(f"{incarnation}\n")
        os.replace(temporary, path)

    async def _cluster_view(self, join_url: str) -> dict[str, Any]:
        """A member's `GET /cluster` (with the read token, where this cluster has one)."""
        timeout = aiohttp.ClientTimeout(total=self.profile.request_timeout_s)
        try:
            headers = {"Authorization": f"Bearer {self.config.read_token}"} if self.config.read_token else None
            async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
                async with session.get(f"{join_url.rstrip('/')}/cluster") as response:
                    if response.status != 200:
                        raise JoinFailed(f"{join_url}/cluster answered {response.status}")
                    return await response.json()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as error:
            raise JoinFailed(f"cannot reach {join_url} to join: {error or type(error).__name__}") from None

    async def _discover_members(self, join_url: str) -> list[str]:
        snapshot = await self._cluster_view(join_url)
        partners = [
            m["raft_address"] for m in snapshot.get("members", []) if m.get("status") != LEFT
        ]
        partners = [p for p in partners if p != self.config.raft]
        if not partners:
            raise JoinFailed(f"{join_url} reports no members to join")
        return partners

    async def _request_join(self, join_url: str) -> None:
        # The member records this peer in the cluster state before adding it to Raft: a Raft
        # voter with no live member record would look like a departed one to the leader. The
        # body is in the cluster's format, so that it carries what that format asks of a Join
        # (`reads_format`) and a member of the previous build can still read it.
        cluster_format = (await self._cluster_view(join_url)).get("format_version", 1)
        body = c.encode(self._join_command(), cluster_format if isinstance(cluster_format, int) else 1)
        headers = {JOIN_SIGNATURE_HEADER: sign_join(self.config.secret, body), "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.profile.request_timeout_s * 2)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(f"{join_url.rstrip('/')}/cluster/join", data=body, headers=headers) as response:
                    text = await response.text()
                    if response.status != 200:
                        raise JoinFailed(f"{join_url} refused the join ({response.status}): {text}")
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise JoinFailed(f"join request to {join_url} failed: {error or type(error).__name__}") from None
        log.info("raft_membership_added", via=join_url)

    # ------------------------------------------------------------------ duties

    def _join_command(self) -> c.Join:
        config = self.config
        return c.Join(
            node_id=self.node_id,
            http_address=config.http,
            raft_address=config.raft,
            heartbeat_address=config.heartbeat,
            incarnation=self.incarnation,
            at_ms=now_ms(),
            memory_bytes=config.memory_bytes or _physical_memory_bytes(),
            accelerator_memory_bytes=config.accelerator_memory_bytes,
            storage_bytes=config.storage_budget_bytes,
            device_kind=config.device_kind,
            reads_format=c.FORMAT_VERSION,
        )

    def _membership_view(self, state: ClusterState) -> tuple[int, str] | None:
        member = state.members.get(self.node_id)
        return (member.incarnation, member.status) if member else None

    async def _keep_registered(self) -> None:
        """Announce this peer, and refute a failure verdict by rejoining with a higher incarnation."""
        assert self.raft is not None
        backoff_s = 0.05
        warned_no_leader_at = time.monotonic()
        no_leader_since: float | None = None
        rejoin_at = 0.0
        while not self._stopping:
            view = self.raft.read(self._membership_view)
            needs_join = view is None or view[0] < self.incarnation or view[1] in (FAILED, LEFT)
            if view is not None and view[1] in (FAILED, LEFT) and view[0] >= self.incarnation:
                self.incarnation = view[0] + 1
                self._write_incarnation(self.incarnation)
                if self.detection is not None:
                    self.detection.set_incarnation(self.incarnation)
                log.warning("refuting_failure", status=view[1], incarnation=self.incarnation)
            if not needs_join:
                if not self._registered.is_set():
                    self.routes_changed()  # ready now
                self._registered.set()
                self._state_changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._state_changed.wait(), 1.0)
                continue
            status = self.raft.status()
            if status.leader_address is None:
                now_s = time.monotonic()
                no_leader_since = no_leader_since or now_s
                if view is not None and view[1] == LEFT and now_s - no_leader_since > REJOIN_AFTER_S and now_s >= rejoin_at:
                    # This peer left the group (its last SIGTERM) and is back: the others no
                    # longer take it as a voter, so it asks one of them to add it again.
                    rejoin_at = now_s + REJOIN_RETRY_S
                    await self._rejoin()
                if time.monotonic() - warned_no_leader_at > 10:
                    log.warning(
                        "raft_no_leader",
                        hint="check --peers / --join and that every peer has the same cluster secret",
                        partners=status.partners,
                    )
                    warned_no_leader_at = time.monotonic()
                await asyncio.sleep(backoff_s)
                continue
            no_leader_since = None
            try:
                outcome = await self.propose(self._join_command())
                if not outcome.accepted:
                    log.error("join_rejected", reason=outcome.reason)
                    await asyncio.sleep(1.0)
                backoff_s = 0.05
            except ConsensusError as error:
                log.info("join_retry", error=str(error))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)

    async def _rejoin(self) -> None:
        """Ask the members this peer knows of (from its own journal) to add it back."""
        assert self.raft is not None
        me = self.node_id
        urls = self.raft.read(lambda state: [
            f"http://{m.http_address}" for m in sorted(state.members.values(), key=lambda m: m.node_id)
            if m.node_id != me and m.status != LEFT
        ])
        for url in urls:
            try:
                await self._request_join(url)
                log.info("rejoined_after_leaving", via=url)
                return
            except JoinFailed as error:
                log.info("rejoin_retry", via=url, error=str(error))

    async def _refresh_metrics(self) -> None:
        assert self.raft is not None
        while not self._stopping:
            status = self.raft.status()
            self.metrics.raft_term.set(status.term)
            self.metrics.raft_commit_index.set(status.commit_index)
            self.metrics.raft_is_leader.set(1 if status.is_leader else 0)
            self.metrics.raft_has_quorum.set(1 if status.has_quorum else 0)
            counts = self.raft.read(_count_members)
            for member_status in ("alive", "suspected", "failed", "left"):
                self.metrics.members.labels(status=member_status).set(counts.get(member_status, 0))
            self.metrics.epoch.set(self.raft.read(lambda s: s.epoch))
            for reason, count in frame_stats.snapshot().items():
                self.metrics.raft_frames_refused.labels(reason=reason).set(count)
            if self.detection is not None and self.detection.service is not None:
                stats = self.detection.service.stats()
                self.metrics.heartbeats_sent.set(stats.heartbeats_sent)
                self.metrics.heartbeats_accepted.set(stats.heartbeats_accepted)
                self.metrics.heartbeat_send_gap_ms_max.set(stats.send_gap_ms_max)
                for reason, count in stats.packets_rejected.items():
                    self.metrics.heartbeats_rejected.labels(reason=reason).set(count)
                self.metrics.detector_probe_rounds.set(stats.probe_rounds)
                self.metrics.detector_probe_rounds_answered.set(stats.probe_rounds_answered)
                self.metrics.detector_hints_refuted.set(stats.hints_refuted)
                self.metrics.detector_local_health.set(stats.local_health_score)
            self.routes_changed()  # a safety net: the table is sent only if it changed
            await asyncio.sleep(1.0)

    def on_served(self, slo_ms: float, latency_ms: float) -> None:
        """A request with an SLO of `slo_ms` was served here in `latency_ms`: evidence for the
        SLO judge (which judges the node, not the app)."""
        now_s = time.monotonic()
        self._served_at_s = now_s
        self.slowness.on_latency(self.node_id, latency_ms, slo_ms, now_s * 1000)

    def on_timed_out(self) -> None:
        """A request served here ran out of its deadline (or found the model host full)."""
        self._served_at_s = time.monotonic()
        self.slowness.on_timeout(self.node_id, self._served_at_s * 1000)

    def _judge_slowness(self, now_s: float) -> bool:
        """Run the judge; True when its verdict about this node changed."""
        if self.slowness.degraded() and now_s - self._served_at_s > SLO_QUIET_S:
            self.slowness.forget(self.node_id)
            self._slo_detail = f"no requests for {SLO_QUIET_S:g} s"
            return True
        changed = False
        for verdict in self.slowness.judge(now_s * 1000, is_down=lambda _: False):
            changed = True
            if isinstance(verdict, Degraded):
                self._slo_detail = (
                    f"median latency {verdict.measure:.1f} x SLO over {self.slowness.settings.window_ms / 1000:g} s"
                )
            elif isinstance(verdict, Restored):
                self._slo_detail = "latency within SLO again"
        return changed

    async def _report_slowness(self) -> None:
        """Keep the committed `slow` flag of this member equal to the SLO judge's verdict,
        judged once a second (not per request: the judge sorts its window).

        Reconciled, not fired once: a report that could not commit (no leader, a partition)
        is proposed again on the next pass, and a verdict that flipped back meanwhile is
        simply not sent."""
        assert self.raft is not None
        while not self._stopping:
            await asyncio.sleep(SLO_JUDGE_INTERVAL_S)
            self._judge_slowness(time.monotonic())
            degraded = self.node_id in self.slowness.degraded()
            committed = self.raft.read(lambda s: s.members[self.node_id].slow if self.node_id in s.members else None)
            if committed is None or committed == degraded:
                continue
            kind = "degraded" if degraded else "recovered"
            detail = self._slo_detail
            try:
                outcome = await self.propose(c.Report(self.node_id, kind, now_ms(), detail=detail[:200]))
                log.warning("slo_verdict_reported", kind=kind, detail=detail, accepted=outcome.accepted)
            except ConsensusError as error:
                log.info("slo_verdict_retry", kind=kind, error=str(error) or type(error).__name__)

    def _on_commit(self, command: c.Command | None, outcome: Outcome) -> None:
        # `command is None` with an accepted outcome: a snapshot replaced the whole state.
        name = type(command).__name__ if command is not None else ("snapshot" if outcome.accepted else "malformed")
        if not isinstance(command, c.Probe):
            self.routes_changed()
        self.metrics.commands_applied.labels(command=name, outcome="accepted" if outcome.accepted else "rejected").inc()
        replaced = command is None and outcome.accepted
        if replaced or isinstance(command, (c.Join, c.Leave, c.Suspect)):
            self._state_changed.set()
        if (replaced or isinstance(command, (c.Join, c.Leave, c.Suspect, c.Unsuspect, c.RotateWatch, c.RaiseFormat))) \
                and self.detection is not None:
            self.detection.refresh_targets()
        for hook in list(self._commit_hooks):
            hook(command, outcome)
        signal_, self._commit_signal = self._commit_signal, asyncio.Event()
        signal_.set()

    async def wait_for_commit(self, timeout_s: float) -> bool:
        """Wait until the next command is applied, or the timeout. True when one was."""
        try:
            await asyncio.wait_for(self._commit_signal.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def _on_leader_change(self, status: RaftStatus) -> None:
        self.metrics.leader_changes.inc()
        self.routes_changed()  # readiness follows the leader
        self.leader.on_leader_change()
        if self.detection is not None:
            self.detection.on_leader_change(status.leader_address is not None)
        leader = self.node_id_of(status.leader_address)
        log.info("raft_leader_changed", leader=leader, leader_address=status.leader_address, term=status.term)

    async def wait_registered(self) -> None:
        await self._registered.wait()

    def add_commit_hook(self, hook: Callable[[c.Command | None, Outcome], None]) -> None:
        self._commit_hooks.append(hook)

    # ------------------------------------------------------------------ queries and proposals

    async def propose(self, command: c.Command, timeout_s: float | None = None) -> Outcome:
        assert self.raft is not None
        name = type(command).__name__
        started = time.perf_counter()
        try:
            outcome = await self.raft.propose(command, timeout_s=timeout_s or self.profile.proposal_timeout_s)
        except ConsensusError as error:
            self.metrics.proposal_failures.labels(command=name, error=type(error).__name__).inc()
            raise
        self.metrics.proposal_seconds.labels(command=name).observe(time.perf_counter() - started)
        return outcome

    def node_id_of(self, raft_address: str | None) -> str | None:
        if raft_address is None or self.raft is None:
            return None
        if raft_address == self.config.raft:
            return self.node_id
        return self.raft.read(
            lambda s: next((m.node_id for m in s.members.values() if m.raft_address == raft_address), None)
        )

    def is_ready(self) -> tuple[bool, str]:
        if self.raft is None:
            return False, "starting"
        if self._stopping:
            return False, "leaving"
        status = self.raft.status()
        if status.leader_address is None:
            return False, "no Raft leader known"
        if unreadable := self.raft.unreadable():
            return False, unreadable
        view = self.raft.read(self._membership_view)
        if view is None or view[0] < self.incarnation or view[1] not in (ALIVE, "suspected"):
            return False, "this incarnation is not yet registered in the cluster state"
        return True, "ready"

    def snapshot(self, events_max: int = 0) -> dict[str, Any]:
        assert self.raft is not None
        status = self.raft.status()
        sightings = self.leader.sightings

        def read(state: ClusterState) -> dict[str, Any]:
            sightings.observe(state)
            data = state.to_dict(events_max=events_max)
            # Not replicated: how much longer each member is held down, timed on this peer's
            # own clock (agent/sightings.py), so peers may differ by their commit delays.
            for member in data["members"]:
                member["hold_down_left_ms"] = round(sightings.hold_down_left_ms(state, state.members[member["node_id"]]))
            return data

        data = self.raft.read(read)
        leader = None
        if status.leader_address is not None:
            leader = next(
                (m["node_id"] for m in data["members"] if m["raft_address"] == status.leader_address),
                self.node_id if status.leader_address == self.config.raft else None,
            )
        data.pop("settings", None)
        if not events_max:
            data.pop("events", None)
        return {
            "node_id": self.node_id,
            "leader": leader,
            "leader_address": status.leader_address,
            "term": status.term,
            "commit_index": status.commit_index,
            "last_applied": status.last_applied,
            "has_quorum": status.has_quorum,
            **data,
        }

    # ------------------------------------------------------------------ stop

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Leave the cluster on purpose: record it, hand over leadership, leave Raft, stop."""
        if self._stopping:
            return
        self._stopping = True
        self.routes_changed()  # not ready any more: load balancers move away
        deadline = time.monotonic() + timeout_s
        raft = self.raft
        if raft is not None and raft.status().leader_address is not None:
            try:
                await raft.propose(c.Leave(self.node_id, now_ms()), timeout_s=max(0.1, deadline - time.monotonic()))
                if raft.status().is_leader:
                    with contextlib.suppress(ConsensusError, asyncio.TimeoutError):
                        await raft.transfer_leadership(timeout_s=max(0.1, deadline - time.monotonic()))
                    while raft.status().is_leader and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)
                if not raft.status().is_leader:
                    await raft.remove_member(self.config.raft, timeout_s=max(0.1, deadline - time.monotonic()))
                log.info("peer_left")
            except (TimeoutError, ConsensusError) as error:
                log.warning("leave_incomplete", error=str(error) or type(error).__name__)
        await self.close()

    async def close(self) -> None:
        self._stopping = True
        log.info("peer_closing", step="duties")
        await self.leader.stop()
        if self.reconciler is not None:
            await self.reconciler.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        log.info("peer_closing", step="http")
        if self.workers is not None:
            await self.workers.stop()  # they finish the requests in flight first
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("peer_closing", step="heartbeats")
        if self.detection is not None:
            await self.detection.stop()
        log.info("peer_closing", step="models")
        if self.replicas is not None:
            await self.replicas.close()
        log.info("peer_closing", step="raft")
        if self.raft is not None:
            self.raft.close()
        self.gc_watch.uninstall()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _bind_http(address: str) -> socket.socket:
    """The HTTP listening socket, bound here and served by the workers (inherited)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(HTTP_BACKLOG)
    except OSError as error:
        listener.close()
        raise OSError(f"cannot bind the HTTP address {address}: {error.strerror or error}") from None
    listener.set_inheritable(True)
    return listener


def _control_address(node_id: str) -> str:
    if sys.platform.startswith("linux"):
        return f"\0redge-control-{node_id}-{os.getpid()}-{os.urandom(6).hex()}"
    return str(Path(tempfile.mkdtemp(prefix="redge-")) / "control.sock")  # a private (0700) directory


def _count_members(state: ClusterState) -> dict[str, int]:
    counts: dict[str, int] = {}
    for member in state.members.values():
        counts[member.status] = counts.get(member.status, 0) + 1
    return counts


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def take_priority(nice: int) -> None:
    """Run this process (and every thread it starts from now on) at `nice`, and its scheduling
    group too when it leads its session (a service, not a shell's job), if allowed."""
    if nice >= os.getpriority(os.PRIO_PROCESS, 0):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as error:
        log.warning("control_priority_not_taken", nice=nice, error=error.strerror or str(error),
                    hint="run as root or with CAP_SYS_NICE, or heartbeats may run late on a saturated box")
        return
    group = os.getsid(0) == os.getpid() and set_autogroup_nice(nice)
    log.info("control_priority_taken", nice=nice, scheduling_group=bool(group))


async def run_peer(config: PeerConfig) -> None:
    """Run a peer until SIGTERM or SIGINT, then leave the cluster cleanly."""
    take_priority(config.control_nice)  # before any thread starts: Linux niceness is per thread
    peer = Peer(config)
    await peer.start()
    freeze_startup_objects()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    waiter = asyncio.create_task(stop.wait())
    closed = asyncio.create_task(peer.wait_closed())
    await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("peer_stopping", signal="SIGTERM")
        await peer.leave()
    waiter.cancel()
    closed.cancel()
