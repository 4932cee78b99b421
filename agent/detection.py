"""Failure detection in the peer: heartbeats out, verdicts into Raft as suspicions.

The heartbeat service (heartbeat.py) and the detector (detector.py) decide, locally, that a
node looks dead or slow. That is one observer's opinion. This module turns each verdict into
a replicated `Suspect` / `Unsuspect`, so that the state machine can confirm a failure only
when enough distinct observers agree. It keeps the watch list equal to the committed live
members, retries a proposal that could not commit (an election is running, or this node is
on the minority side of a partition) for as long as the verdict stands, and stops at once
when the verdict changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from redge.agent.clock import wall_ms
from redge.agent.detector_settings import DetectorSettings
from redge.agent.heartbeat import HeartbeatService
from redge.agent.verdicts import Degraded, Quiet, Recover, Restarted, Restored, Suspect, Verdict
from redge.agent.watching import monitoring_targets, watch_round
from redge.consensus import commands as c
from redge.consensus.addresses import split_address
from redge.consensus.errors import ConsensusError
from redge.consensus.state import ALIVE, LEFT, SUSPECTED, ClusterState

if TYPE_CHECKING:
    from redge.agent.metrics import PeerMetrics
    from redge.agent.ports import ClusterPort, RaftTransport

log = structlog.get_logger("redge.detection")

RETRY_S_FIRST = 0.02
RETRY_S_MAX = 1.0
STOP_TIMEOUT_S = 5.0
# Wake this long past a rotation turn, so the new round is the one read (sleep and wall clock
# are different clocks).
ROTATION_MARGIN_S = 0.01


def now_ms() -> int:
    return wall_ms()


@dataclass(frozen=True)
class DetectionConfig:
    """What detection needs of the peer's config and profile."""

    heartbeat_address: str
    secret: str
    settings: DetectorSettings
    proposal_timeout_s: float
    watch_rotation_s: float = 0.0
    incarnation: int = 0


class FailureDetection:
    """Heartbeats on a thread of their own, verdicts into proposals. It works through the
    ClusterPort (agent/ports.py), the Raft transport's hooks (RaftTransport) and the metrics,
    wired by the peer; nothing else of it."""

    def __init__(self, cluster: ClusterPort, transport: RaftTransport, metrics: PeerMetrics,
                 config: DetectionConfig) -> None:
        self.cluster = cluster
        self.transport = transport
        self.metrics = metrics
        self.config = config
        self.node_id = cluster.node_id
        self.service: HeartbeatService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._leader_changed = asyncio.Event()
        # target -> the verdict this observer currently holds about it ("down" or "slow")
        self._opinions: dict[str, str] = {}
        self._proposals: dict[str, asyncio.Task[None]] = {}
        self._rotation: asyncio.Task[None] | None = None
        # Who this peer watches, as last handed to the heartbeat thread (main loop's copy).
        self._watched: set[str] = set()
        # Raft address <-> node id of the live members, replaced whole (the heartbeat thread
        # reads them: a dict swapped in one assignment needs no lock).
        self._node_by_raft_address: dict[str, str] = {}
        self._raft_address_by_node: dict[str, str] = {}

    async def start(self) -> None:
        """Run the heartbeat service on a thread and event loop of its own.

        The peer's main loop also parses inference requests and runs Raft callbacks; a busy
        stretch there must not delay a heartbeat, or load alone would look like a failure.
        """
        config = self.config
        host, port = split_address(config.heartbeat_address)
        main_loop = asyncio.get_running_loop()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="heartbeats", daemon=True)
        self._thread.start()
        self.service = HeartbeatService(
            self.node_id,
            (host, port),
            config.secret.encode(),
            config.settings,
            on_verdict=lambda verdict: main_loop.call_soon_threadsafe(self._on_verdict, verdict),
            incarnation=config.incarnation,
            transport_open=self._transport_open,
        )
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.service.start(), self._loop))
        except OSError as error:
            await self._stop_thread()
            raise OSError(f"cannot bind the heartbeat address {config.heartbeat_address}: {error.strerror or error}") from None
        # Read at scrape time: plain floats the heartbeat thread writes, so no lock is needed.
        monitor = self.service.monitor
        self.metrics.detector_phi_max.set_function(lambda: monitor.phi_at_arrival_max)
        self.metrics.detector_self_pause_ms_max.set_function(lambda: monitor.self_pause_ms_max)
        # A dropped Raft connection is the soonest hint of a crash: handed straight to the
        # heartbeat thread, which probes the node.
        self.transport.on_partner_disconnected(self._loop, self._on_raft_disconnected)
        self.refresh_targets()
        if config.watch_rotation_s > 0:
            self._rotation = asyncio.create_task(self._rotate(config.watch_rotation_s), name="watch-rotation")

    async def _rotate(self, rotation_s: float) -> None:
        """Move to the next watch set at each turn of the wall clock (only clusters above
        8 members have a bounded one; smaller ones watch everyone whatever the round). Only
        while the cluster's format is 1: from 2 the round is committed, and a commit of
        RotateWatch refreshes the targets (so this refresh changes nothing)."""
        while True:
            now_s = wall_ms() / 1000
            await asyncio.sleep((watch_round(now_s, rotation_s) + 1) * rotation_s - now_s + ROTATION_MARGIN_S)
            try:
                self.refresh_targets()
            except Exception:  # one bad turn must not end rotation for good
                log.exception("watch_rotation_failed")

    async def stop(self) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
        for task in self._proposals.values():
            task.cancel()
        if self.service is not None and self._loop is not None:
            stopping = asyncio.run_coroutine_threadsafe(self.service.stop(), self._loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(stopping), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("heartbeat_stop_timed_out")
        await self._stop_thread()

    async def _stop_thread(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        self._loop.close()
        self._loop = None

    def _on_raft_disconnected(self, raft_address: str) -> None:  # the heartbeat thread
        node_id = self._node_by_raft_address.get(raft_address)
        if node_id is not None and self.service is not None:
            self.service.on_disconnected(node_id)

    def _transport_open(self, node_id: str) -> bool:  # the heartbeat thread
        address = self._raft_address_by_node.get(node_id)
        return address is not None and self.transport.partner_connected(address)

    def on_request_timeout(self, node_id: str) -> None:
        """A request to `node_id` timed out: evidence that it may be degraded."""
        if self.service is not None and self._loop is not None:
            service = self.service
            self._loop.call_soon_threadsafe(lambda: service.monitor.on_request_timeout(node_id, service.clock.now_ms()))

    def on_leader_change(self, leader_known: bool) -> None:
        """Pending proposals retry at once when a (new) leader appears."""
        if leader_known:
            changed, self._leader_changed = self._leader_changed, asyncio.Event()
            changed.set()

    def set_incarnation(self, incarnation: int) -> None:
        if self.service is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.service.set_incarnation, incarnation)

    def refresh_targets(self) -> None:
        """Watch the committed live members (other than this node)."""
        if self.service is None:
            return
        members, committed_round, cluster_size = self.cluster.read(_live_members_and_round)
        self._raft_address_by_node = {node_id: raft_address for node_id, _, _, raft_address in members}
        self._node_by_raft_address = {raft_address: node_id for node_id, _, _, raft_address in members}
        # From format 2 the round is committed (the leader's RotateWatch); before, every peer
        # turns by its own wall clock.
        round_number = committed_round if committed_round is not None else watch_round(
            wall_ms() / 1000, self.config.watch_rotation_s)
        watched_ids = set(monitoring_targets(self.node_id, [m[0] for m in members], round_number=round_number,
                                             cluster_size=cluster_size))
        targets = []
        book = []
        for node_id, heartbeat_address, incarnation, _ in members:
            if node_id == self.node_id:
                continue
            try:
                address = split_address(heartbeat_address)
            except ValueError:
                log.warning("bad_heartbeat_address", node=node_id, address=heartbeat_address)
                continue
            book.append((node_id, address))
            if node_id in watched_ids:
                targets.append((node_id, address, incarnation))
        if self._loop is not None:
            # Dropped targets still get heartbeats for a grace period: a watcher whose clock
            # reaches the rotation's turn later must not find this node silent meanwhile.
            linger_ms = self.service.settings.first_heartbeat_grace_ms
            self._loop.call_soon_threadsafe(self.service.set_members, book)
            self._loop.call_soon_threadsafe(self.service.set_targets, targets, linger_ms)
        self._watched = {node_id for node_id, _, _ in targets}
        for node_id in list(self._opinions):
            if node_id not in watched_ids:
                # No longer ours to watch: withdraw what we said, the monitor forgets silently.
                self._opinions.pop(node_id, None)
                if any(m[0] == node_id for m in members):
                    self._propose_until_done(node_id, None)

    # ------------------------------------------------------------------ verdicts

    def _on_verdict(self, verdict: Verdict) -> None:
        self.metrics.verdicts.labels(kind=type(verdict).__name__).inc()
        if isinstance(verdict, (Quiet, Suspect)) and verdict.node_id not in self._watched:
            # Said by the heartbeat thread just before it took a new watch set: the opinion
            # about a node no longer ours was withdrawn already, and no Recover would follow.
            return
        if isinstance(verdict, Quiet):
            self._hasten_election(verdict.node_id, "quiet")
        elif isinstance(verdict, Suspect):
            self._hold(verdict.node_id, "down", str(verdict.reason))
        elif isinstance(verdict, Degraded):
            self._hold(verdict.node_id, "slow", "degraded")
        elif isinstance(verdict, (Recover, Restarted, Restored)):
            if self._opinions.pop(verdict.node_id, None) is not None:
                self._propose_until_done(verdict.node_id, None)

    def _hold(self, node_id: str, opinion: str, reason: str) -> None:
        if self._opinions.get(node_id) == opinion:
            return
        self._opinions[node_id] = opinion
        log.info("node_suspected_locally", target=node_id, reason=reason)
        if opinion == "down":
            self._hasten_election(node_id, "suspected")
        self._propose_until_done(node_id, reason)

    def _hasten_election(self, node_id: str, why: str) -> None:
        """A hung leader keeps its TCP connections open: Raft would wait out its election
        timeout before anyone could commit a suspicion of it. If `node_id` leads, stand in
        our turn now (on `Quiet`, before the suspicion, so the new leader is there for it)."""
        address = self.cluster.read(lambda s: s.members[node_id].raft_address if node_id in s.members else None)
        if address is not None and self.transport.hasten_election(address):
            self.metrics.elections_hastened.labels(why=why).inc()
            log.info("election_hastened", suspected_leader=node_id, why=why)

    def _propose_until_done(self, node_id: str, reason: str | None) -> None:
        previous = self._proposals.pop(node_id, None)
        if previous is not None:
            previous.cancel()
        self._proposals[node_id] = asyncio.create_task(self._propose(node_id, reason))

    async def _propose(self, node_id: str, reason: str | None) -> None:
        """Commit this observer's opinion; retried for as long as it stands.

        No attempt limit: a partition can outlast any, and giving up would leave a dead node
        unconfirmed (or a withdrawn suspicion standing) once it heals. The loop ends when
        the opinion changes (this task is then cancelled) or the command commits."""
        delay_s = RETRY_S_FIRST
        # The command keeps the time the opinion was formed (`since_ms`) across retries: that
        # is when this observer detected, whatever the commit had to wait for.
        formed_at_ms = now_ms()
        while True:
            changed = self._leader_changed
            command: c.Command
            if reason is None:
                command = c.Unsuspect(self.node_id, node_id, now_ms())
            else:
                incarnation = self.cluster.read(lambda s: s.members[node_id].incarnation if node_id in s.members else 0)
                command = c.Suspect(self.node_id, node_id, incarnation, reason, now_ms(), since_ms=formed_at_ms)
            try:
                outcome = await self.cluster.propose(command, timeout_s=self.config.proposal_timeout_s)
                if not outcome.accepted:
                    log.info("suspicion_refused", target=node_id, reason=outcome.reason)
                return
            except ConsensusError as error:
                log.debug("suspicion_retry", target=node_id, error=type(error).__name__)
            # Retry as soon as a new leader is known (the usual reason a proposal failed), or
            # after the backoff. The event is replaced on every change: waiting on the one
            # current at the failure wakes only for a change that came after it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await changed.wait()
            delay_s = min(delay_s * 2, RETRY_S_MAX)

    def stats(self) -> dict[str, object]:
        if self.service is None:
            return {}
        return {"stats": self.service.stats(), "opinions": dict(self._opinions)}


def _live_members_and_round(state: ClusterState) -> tuple[list[tuple[str, str, int, str]], int | None, int]:
    """The live members, the committed watch round (None before format 2), and how many
    members have not left (what decides whether the watch is bounded)."""
    return (_live_members(state), state.watch_round if state.format_version >= 2 else None,
            sum(1 for m in state.members.values() if m.status != LEFT))


def _live_members(state: ClusterState) -> list[tuple[str, str, int, str]]:
    return [
        (m.node_id, m.heartbeat_address, m.incarnation, m.raft_address)
        for m in sorted(state.members.values(), key=lambda m: m.node_id)
        if m.status in (ALIVE, SUSPECTED)
    ]
