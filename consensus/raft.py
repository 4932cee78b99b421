"""The one adapter between asyncio and pysyncobj (with consensus/shim.py, which holds every
access to pysyncobj's internals).

pysyncobj runs Raft on its own tick thread and applies committed entries there. This module
keeps that thread free: the replicated entry point decodes and applies a command to the pure
`ClusterState` under a short lock, and hands results to the event loop with
`call_soon_threadsafe`, never waiting on it. asyncio code awaits `propose()` with a deadline.
Commits are sent at once rather than batched (pysyncobj's batching costs ~100 ms a commit),
election timeouts come from the profile, the journal and state dumps live in the data
directory so a restarted peer gets its state back, and the cluster secret always encrypts
Raft traffic: pysyncobj speaks pickle, so an open Raft port would run anyone's code. The
shim's frame guard refuses, on their length header, frames that no peer with the secret would
send, so garbage on a Raft port costs its reader nothing.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from redge.consensus import commands, shim
from redge.consensus.addresses import split_address
from redge.consensus.errors import (
    MembershipChangeRefused,
    NoLeader,
    NoQuorum,
    NotLeader,
    ProposalTimeout,
)
from redge.consensus.state import ClusterState, Outcome, Settings
from redge.consensus.timing import RaftTiming

T = TypeVar("T")

log = structlog.get_logger("redge.raft")
raft_clock_s = shim.raft_clock_s

STATE_REPLACED = "state replaced from a snapshot"
# How many events' local apply times a peer remembers (the event log itself is bounded too).
APPLIED_TIMES_MAX = 8192
# The tick thread is woken this long after an election deadline: pysyncobj's clock
# (CLOCK_MONOTONIC_RAW) and the event loop's must not make it look a hair early.
WAKE_MARGIN_S = 0.0003

CommitListener = Callable[[commands.Command | None, Outcome], None]
LeaderListener = Callable[["RaftStatus"], None]


@dataclass(frozen=True)
class RaftStatus:
    self_address: str
    leader_address: str | None
    term: int
    commit_index: int
    last_applied: int
    is_leader: bool
    has_quorum: bool
    partners: dict[str, bool]  # raft address -> connected


def fast_election_delay_s(
    timing: RaftTiming, self_address: str, voters: list[str], leader_address: str, draw: float
) -> float:
    """When this follower should stand for election once its leader is gone: by its rank
    among the other voters (sorted addresses, the leader left out), plus `draw` (0..1) of
    the jitter. Every follower computes the same order without talking to the others."""
    candidates = sorted({address for address in voters if address != leader_address} | {self_address})
    rank = candidates.index(self_address)
    return timing.fast_election_first_s + rank * timing.fast_election_step_s + draw * timing.fast_election_jitter_s


def should_stand_early(
    leader_address: str | None,
    last_leader_address: str | None,
    gone_address: str,
    *,
    is_leader: bool,
    election_running: bool,
) -> bool:
    """Whether losing `gone_address` (its connection dropped, or our detector suspects it)
    should bring this node's election turn forward: when it is the leader we follow, or,
    while no leader is known, the last one we followed. The second case matters: a
    candidate that asked for our vote makes pysyncobj forget the leader, and if we refused
    it (its log was behind ours), we must still take our own turn instead of waiting out
    Raft's full election timeout. `election_running` (we stand ourselves, or voted for a
    candidate in this term) leaves that election alone: moving our deadline would start a
    new term and throw away the votes still on their way. The caller counts an election
    as running only while it is young (a turn's step): an older one has split its vote or
    lost its candidate, and taking our turn again settles it in turn order."""
    if is_leader:
        return False
    if leader_address is not None:
        return leader_address == gone_address
    return last_leader_address == gone_address and not election_running


class _StateMachine(SyncObjConsumer):
    """Holds the ClusterState inside pysyncobj. Runs on pysyncobj's tick thread."""

    def __init__(
        self,
        settings: Settings,
        on_applied: Callable[[commands.Command | None, Outcome], None],
        wall_ms: Callable[[], float],
    ) -> None:
        super().__init__()
        self.wall_ms = wall_ms
        self.lock = threading.Lock()
        self.on_applied = on_applied
        self.state = ClusterState(settings=settings)
        # Event seq -> wall ms when this peer applied the entry that recorded it. Not part
        # of the replicated state (every replica applies at its own moment): it is what
        # "committed at" means for metrics such as decision time, seen from this peer.
        self.applied_ms: dict[int, float] = {}
        # False while this peer replays its journal or catches up at start: those entries
        # were committed long before they are applied here, so their apply time means nothing.
        self.live = False
        # Why the last snapshot could not be read ("" when it could): see `_deserialize`.
        self.unreadable = ""

    @replicated
    def apply_command(self, data: bytes) -> dict[str, Any]:
        # Never raise here: pysyncobj would retry the entry forever.
        if self.unreadable:
            # Entries after a snapshot this build could not read would land on the wrong
            # state: apply nothing until a readable snapshot replaces it.
            return {"accepted": False, "reason": self.unreadable, "duplicate": False}
        with self.lock:
            seq_before = self.state.event_seq
            command, outcome = self.state.apply_entry(data)
            self._stamp(seq_before)
        _call_listener(self.on_applied, command, outcome)
        return {"accepted": outcome.accepted, "reason": outcome.reason, "duplicate": outcome.duplicate}

    def _stamp(self, seq_before: int) -> None:
        """Remember when this peer applied the events the last entry recorded (lock held)."""
        if self.state.event_seq == seq_before or not self.live:
            return
        now_ms = self.wall_ms()
        for seq in range(seq_before + 1, self.state.event_seq + 1):
            self.applied_ms[seq] = now_ms
        while len(self.applied_ms) > APPLIED_TIMES_MAX:
            del self.applied_ms[next(iter(self.applied_ms))]

    # pysyncobj dumps consumers with pickle; keep what it pickles plain bytes we control.
    def _serialize(self) -> dict[str, bytes]:
        with self.lock:
            return {"state": self.state.to_bytes()}

    def _deserialize(self, data: dict[str, bytes]) -> None:
        try:
            state = ClusterState.from_bytes(data["state"])
        except Exception as error:  # noqa: BLE001 - never raise into pysyncobj's thread
            # Keep what this replica had: it is behind, not wrong, and the peer reports itself
            # not ready with the reason (a build older than the cluster's format, or a bug).
            self.unreadable = f"the cluster state from a snapshot cannot be read by this build: {error!r}"
            log.error("snapshot_unreadable", error=repr(error))
            return
        with self.lock:
            self.state = state
            self.unreadable = ""
            self.applied_ms = {}  # when the replaced events were applied is not known here
        # The whole state changed at once (a snapshot from the leader, or the dump at start):
        # listeners are told with `command=None` and an accepted outcome.
        _call_listener(self.on_applied, None, Outcome(True, STATE_REPLACED))


class FrameStats:
    """What the frame guard (consensus/shim.py) refused, by reason: written on pysyncobj's
    tick threads, read anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


frame_stats = FrameStats()


def _format_version(state: ClusterState) -> int:
    return state.format_version


def _call_listener(listener: Callable[..., None], *args: Any) -> None:
    """Run a callback on the tick thread; a bug in it is logged, never raised into pysyncobj
    (which would apply the entry again, forever)."""
    try:
        listener(*args)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("raft_callback_failed", callback=getattr(listener, "__qualname__", repr(listener)))


_FAIL_ERRORS = {
    FAIL_REASON.QUEUE_FULL: lambda: NoQuorum("the proposal queue is full"),
    FAIL_REASON.MISSING_LEADER: lambda: NoLeader("no Raft leader is known"),
    FAIL_REASON.DISCARDED: lambda: NoQuorum("the entry was discarded by a new leader; retry"),
    FAIL_REASON.NOT_LEADER: lambda: NotLeader("the node that took the proposal is no longer leader"),
    FAIL_REASON.LEADER_CHANGED: lambda: NoLeader("the leader changed while proposing"),
    FAIL_REASON.REQUEST_DENIED: lambda: MembershipChangeRefused("Raft denied the request"),
}


def check_bindable(address: str) -> None:
    """Fail early with a clear message when the Raft address is taken or unresolvable."""
    host, port = split_address(address)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as error:
        raise OSError(f"cannot bind the Raft address {address}: {error.strerror or error}") from None
    finally:
        probe.close()


class RaftNode:
    """One member of the Raft group, seen from asyncio."""

    def __init__(
        self,
        *,
        self_address: str,
        partner_addresses: list[str],
        secret: str,
        timing: RaftTiming,
        data_dir: Path | None,
        settings: Settings | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000,
    ) -> None:
        assert secret, "Raft traffic is always encrypted: a secret is required"
        self.self_address = self_address
        self._loop = loop or asyncio.get_running_loop()
        self._commit_listeners: list[CommitListener] = []
        self._leader_listeners: list[LeaderListener] = []
        self._disconnect_listeners: list[tuple[asyncio.AbstractEventLoop, Callable[[str], None]]] = []
        self._machine = _StateMachine(settings or Settings(), self._on_applied_thread, wall_ms)
        self._last_leader: tuple[str | None, int] | None = None
        # The last leader this node followed, kept while no leader is known (tick thread writes).
        self._last_leader_address: str | None = None
        # When this node first saw its current term (pysyncobj's clock; tick thread writes).
        self._term_seen_at_s = 0.0
        self._timing = timing
        # Calls into pysyncobj internals that are not thread-safe run on its tick thread.
        self._tick_calls: deque[Callable[[], None]] = deque()
        self._closed = False
        # Incoming connections that have not authenticated yet: id -> first seen (tick thread).
        self._unauthenticated_since_s: dict[int, float] = {}
        journal = dump = None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            journal = str(data_dir / "raft.journal")
            dump = str(data_dir / "raft.dump")
        check_bindable(self_address)
        conf = SyncObjConf(
            password=secret,
            appendEntriesUseBatch=False,
            dynamicMembershipChange=True,
            journalFile=journal,
            fullDumpFile=dump,
            useFork=False,
            maxBindRetries=1,
            logCompactionMinEntries=5000,
            logCompactionMinTime=300,
            onReady=self._on_ready_thread,
            **timing.to_conf_kwargs(),
        )
        partners = [a for a in partner_addresses if a != self_address]
        shim.install_frame_guard(frame_stats.count)
        self._sync = SyncObj(self_address, partners, conf=conf, consumers=[self._machine])
        self._sync.waitBinded()
        shim.widen_backlog(shim.transport_of(self._sync))
        self._sync.addOnTickCallback(self._on_tick_thread)
        self._install_fast_election()

    def _install_fast_election(self) -> None:
        """Start an election soon after the leader's connection drops, not a full timeout later.

        When a leader's process dies its host closes the TCP connection at once; waiting out
        the election timeout after that only adds downtime. pysyncobj has no hook for this, so
        the transport's disconnect callback is wrapped (this module is the one place that
        knows pysyncobj's internals). Starting an election early is always safe in Raft; the
        turns (`fast_election_delay_s`) keep followers that saw the same drop from splitting
        the vote. A hung leader keeps its connections open: our failure detector catches it
        (`hasten_election`), or Raft's own timeout does.
        """
        transport = shim.transport_of(self._sync)
        original = transport._onNodeDisconnectedCallback

        def on_disconnected(node: Any) -> None:  # tick thread
            if original is not None:
                original(node)
            gone = getattr(node, "address", None)
            if gone is None:
                return
            if self._should_stand_early(gone):
                self._elect_soon(gone)
            if not self._closed:
                for loop, listener in self._disconnect_listeners:
                    _call_soon(loop, listener, gone)

        transport.setOnNodeDisconnectedCallback(on_disconnected)

    # ------------------------------------------------------------------ tick thread side

    def _on_ready_thread(self) -> None:
        """pysyncobj caught up with the leader's commit index for the first time (replay done)."""
        self._machine.live = True

    def _on_applied_thread(self, command: commands.Command | None, outcome: Outcome) -> None:
        if self._commit_listeners and not self._closed:
            _call_soon(self._loop, self._deliver_commit, command, outcome)

    def _on_tick_thread(self) -> None:
        while self._tick_calls:
            _call_listener(self._tick_calls.popleft())
        shim.expire_unauthenticated(shim.transport_of(self._sync), raft_clock_s(), self._unauthenticated_since_s)
        leader_address = self._leader_address()
        if leader_address is not None:
            self._last_leader_address = leader_address
        key = (leader_address, self._sync.raftCurrentTerm)
        if self._last_leader is None or key[1] != self._last_leader[1]:
            self._term_seen_at_s = raft_clock_s()
        if key != self._last_leader and not self._closed:
            self._last_leader = key
            _call_soon(self._loop, self._deliver_leader)

    # ------------------------------------------------------------------ loop side

    def _deliver_commit(self, command: commands.Command | None, outcome: Outcome) -> None:
        for listener in list(self._commit_listeners):
            listener(command, outcome)

    def _deliver_leader(self) -> None:
        status = self.status()
        for listener in list(self._leader_listeners):
            listener(status)

    def on_commit(self, listener: CommitListener) -> None:
        """Call `listener(command, outcome)` on the event loop after each applied entry."""
        self._commit_listeners.append(listener)

    def on_leader_change(self, listener: LeaderListener) -> None:
        self._leader_listeners.append(listener)

    def on_partner_disconnected(self, loop: asyncio.AbstractEventLoop, listener: Callable[[str], None]) -> None:
        """Call `listener(raft_address)` on `loop` when the TCP connection to a partner drops:
        a process whose host lives closes its connections as it dies, so this is the soonest
        sign of a crash. A hint, not evidence: connections also drop for harmless reasons."""
        self._disconnect_listeners.append((loop, listener))

    async def propose(self, command: commands.Command, *, timeout_s: float) -> Outcome:
        """Commit `command` and return the state machine's outcome.

        Raises ProposalTimeout when the deadline passes (the command may still commit),
        NoLeader / NoQuorum / NotLeader when pysyncobj reports a failure.
        """
        # The committed format, read without the apply lock: one int, only ever raised.
        data = commands.encode(command, self._machine.state.format_version)
        future: asyncio.Future[Outcome] = self._loop.create_future()

        def settle(result: Any, error: int) -> None:  # tick thread
            _call_soon(self._loop, _settle_future, future, result, error)

        self._machine.apply_command(data, callback=settle)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise ProposalTimeout(
                f"no commit within {timeout_s * 1000:.0f} ms for {type(command).__name__}; the outcome is unknown"
            ) from None

    async def _membership(self, operation: Callable[..., None], address: str, timeout_s: float) -> None:
        future: asyncio.Future[Outcome] = self._loop.create_future()

        def settle(result: Any, error: int) -> None:  # tick thread
            _call_soon(self._loop, _settle_future, future, {"accepted": True}, error)

        operation(address, callback=settle)
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise ProposalTimeout(f"membership change for {address} not committed in {timeout_s}s") from None

    async def add_member(self, address: str, *, timeout_s: float) -> None:
        """Add a Raft member (one change at a time; Raft refuses a second while one is open)."""
        split_address(address)
        await self._membership(self._sync.addNodeToCluster, address, timeout_s)

    async def remove_member(self, address: str, *, timeout_s: float) -> None:
        await self._membership(self._sync.removeNodeFromCluster, address, timeout_s)

    def hasten_election(self, suspected_address: str) -> bool:
        """Start an election soon if `suspected_address` is our leader: our failure detector,
        with its 20 ms heartbeats, saw the leader hang long before Raft's election timeout
        would. Safe in Raft at any time; the turns keep followers from splitting the vote.
        Returns whether an election was scheduled."""
        if not self._should_stand_early(suspected_address):
            return False
        self._tick_calls.append(lambda: self._elect_soon(suspected_address))
        self._wake_tick_thread()
        return True

    def _should_stand_early(self, gone_address: str) -> bool:
        # pysyncobj's state: 0 follower, 1 candidate, 2 leader; a vote granted in the current
        # term is kept in votedForNodeId (reset when a higher term is seen).
        candidate = shim.is_candidate(self._sync)
        voted = shim.voted_this_term(self._sync)
        young = raft_clock_s() - self._term_seen_at_s < self._timing.fast_election_step_s
        return should_stand_early(
            self._leader_address(),
            self._last_leader_address,
            gone_address,
            is_leader=self._sync._isLeader(),
            election_running=(candidate or voted) and young,
        )

    def _leader_address(self) -> str | None:
        leader = self._sync._getLeader()
        return leader.address if leader is not None else None

    def _wake_tick_thread(self) -> None:
        """End pysyncobj's poll now rather than at its next tick (up to a tick period away):
        pysyncobj's own wake-up pipe, which it uses for new commands. Thread-safe."""
        shim.wake_tick_thread(self._sync)

    def _elect_soon(self, leader_address: str) -> None:
        """Bring this follower's election deadline forward to its turn (tick thread).

        pysyncobj looks at the deadline once per tick; the event loop wakes the tick thread
        at the deadline itself so the turn is not a tick period late."""
        voters = [node.address for node in self._sync.otherNodes]
        delay_s = fast_election_delay_s(self._timing, self.self_address, voters, leader_address, random.random())
        # pysyncobj keeps time with CLOCK_MONOTONIC_RAW, not time.monotonic().
        deadline = raft_clock_s() + delay_s
        shim.bring_election_forward(self._sync, deadline)
        if not self._closed:
            _call_soon(self._loop, self._loop.call_later, delay_s + WAKE_MARGIN_S, self._wake_tick_thread)

    async def transfer_leadership(self, *, timeout_s: float) -> None:
        future: asyncio.Future[Outcome] = self._loop.create_future()

        def settle(result: Any, error: int) -> None:  # tick thread
            _call_soon(self._loop, _settle_future, future, {"accepted": True}, error)

        self._tick_calls.append(lambda: self._sync.transferLeadership(callback=settle))
        await asyncio.wait_for(future, timeout_s)

    def read(self, reader: Callable[[ClusterState], T]) -> T:
        """Run `reader` on the current state under the apply lock. Keep it short."""
        with self._machine.lock:
            return reader(self._machine.state)

    def unreadable(self) -> str:
        """Why this replica cannot follow the cluster's state ("" when it can): a snapshot it
        could not read, or a committed format newer than this build reads."""
        if self._machine.unreadable:
            return self._machine.unreadable
        version = self.read(_format_version)
        if version > commands.FORMAT_VERSION:
            return (f"the cluster's command format is {version} and this build reads up to "
                    f"{commands.FORMAT_VERSION}: upgrade this peer")
        return ""

    def applied_times(self, seqs: list[int]) -> dict[int, float]:
        """When this peer applied the entries that recorded these events (seq -> wall ms),
        for those it still remembers."""
        with self._machine.lock:
            known = self._machine.applied_ms
            return {seq: known[seq] for seq in seqs if seq in known}

    def partner_connected(self, address: str) -> bool:
        """Whether this node's TCP connection to the partner at `address` is up. Cheap, and
        safe from any thread (a read of pysyncobj's connection set)."""
        for node in list(self._sync.otherNodes):
            if node.address == address:
                return bool(self._sync.isNodeConnected(node))
        return False

    def status(self) -> RaftStatus:
        leader = self._sync._getLeader()
        partners = {}
        for node in self._sync.otherNodes:
            partners[node.address] = self._sync.isNodeConnected(node)
        has_quorum = self._sync.hasQuorum
        # pysyncobj keeps its last leader while it is connected to nobody (it will not even
        # start an election then), so a node cut off from the majority would still name a
        # dead leader. Without a quorum there is no leader this node can reach.
        return RaftStatus(
            self_address=self.self_address,
            leader_address=leader.address if leader is not None and has_quorum else None,
            term=self._sync.raftCurrentTerm,
            commit_index=self._sync.raftCommitIndex,
            last_applied=self._sync.raftLastApplied,
            is_leader=self._sync._isLeader(),
            has_quorum=has_quorum,
            partners=partners,
        )

    def close(self) -> None:
        """Stop Raft and wait for the tick thread, which flushes and closes the journal."""
        if self._closed:
            return
        self._closed = True
        self._sync.destroy_synchronous()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hand a call to the event loop from pysyncobj's tick thread; never raise there.

    pysyncobj runs these callbacks while applying an entry, before it counts the entry as
    applied: an exception would make it apply the entry again. A closed loop (shutdown, a
    test's teardown) just means nobody is listening any more."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _settle_future(future: asyncio.Future[Outcome], result: Any, error: int) -> None:
    if future.done():
        return
    if error == FAIL_REASON.SUCCESS:
        if isinstance(result, dict):
            future.set_result(Outcome(result.get("accepted", False), result.get("reason", ""), result.get("duplicate", False)))
        else:
            future.set_result(Outcome(True))
        return
    make_error = _FAIL_ERRORS.get(error, lambda: NoQuorum(f"pysyncobj failure {error}"))
    future.set_exception(make_error())
