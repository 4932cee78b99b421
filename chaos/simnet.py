"""A seeded, simulated network and heartbeat cluster for the failure detector.

Real clusters make detection bugs rare and unreproducible; here time is a
`FakeClock`, every delay, loss and stall is drawn from one seed, and the
whole run is an ordered event queue: no threads, no sockets, no real time.
A run with the same seed replays exactly, so a failing test prints its seed
and that seed is the bug report (TigerBeetle's VOPR, in miniature).

Two layers:

- `SimNet`: datagrams between named endpoints with per-link delay, jitter,
  loss (optionally bursty), one-way cuts and partitions. A datagram to an
  endpoint whose process is gone but whose host is up is answered with a
  refusal after one more delay (ICMP port unreachable); a crashed or hung
  host is silent.
- `DetectionSimulation`: N peers that exchange heartbeats through it and run
  the real `Monitor` from `agent/detector.py`, plus faults as data (Jepsen's
  nemeses): `Crash`, `Pause` (SIGSTOP / CPU starvation; long = hang),
  `CutLink` (one-way), `Partition`, `Heal`, `Restart`. Verdicts are recorded
  as a history; the checkers below are pure functions over it.

What is modelled and what is not: the shell's behaviours that matter for
detection are (send rhythm with scheduling lag and skipped slots after a
stall, draining queued datagrams before judging, self-pause reports);
kernel buffers are a bounded backlog. Raft is not simulated: a confirmation
is approximated by the time the k-th distinct observer suspects.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redge.agent.clock import FakeClock
from redge.agent.detector import Monitor
from redge.agent.detector_settings import DetectorSettings
from redge.agent.verdicts import Hint, Output, Probe, Recover, Restarted, Suspect, Verdict
from redge.agent.watching import monitoring_targets

# ---------------------------------------------------------------------------
# network


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One direction of a link. Delay is uniform in [delay_ms_min, delay_ms_max]
    (jitter is their difference); loss is independent per datagram, plus an
    optional Gilbert-Elliott burst state in which every datagram is lost."""

    delay_ms_min: float = 0.05
    delay_ms_max: float = 0.3
    loss_probability: float = 0.0
    burst_enter_probability: float = 0.0
    burst_exit_probability: float = 1.0

    def __post_init__(self) -> None:
        assert 0.0 <= self.delay_ms_min <= self.delay_ms_max
        assert 0.0 <= self.loss_probability <= 1.0
        assert 0.0 <= self.burst_enter_probability <= 1.0
        assert 0.0 < self.burst_exit_probability <= 1.0


# Switched Ethernet: sub-millisecond, lossless.
ENTERPRISE_LINK = LinkProfile(delay_ms_min=0.05, delay_ms_max=0.3)
# WiFi as DESIGN.md states it: 5-50 ms RTT (2.5-25 ms one way), 5 % loss.
IOBT_LINK = LinkProfile(delay_ms_min=2.5, delay_ms_max=25.0, loss_probability=0.05)


class Endpoint(Protocol):
    def on_datagram(self, source: str, payload: Any) -> None: ...

    def on_refused(self, destination: str) -> None: ...


@dataclass(slots=True)
class NetStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    blocked: int = 0
    refused: int = 0
    dropped_silently: int = 0


class SimNet:
    """Datagrams over simulated links, delivered by an ordered event queue."""

    OPEN = "open"  # process listening
    CLOSED = "closed"  # process gone, host up: the kernel refuses
    SILENT = "silent"  # host gone (or unplugged): nothing comes back

    def __init__(self, seed: int, clock: FakeClock | None = None,
                 link: LinkProfile = ENTERPRISE_LINK, max_events: int = 50_000_000) -> None:
        self.seed = seed
        self.clock = clock or FakeClock()
        self.rng = random.Random(f"simnet/{seed}")
        self.default_link = link
        self.max_events = max_events
        self.events_run = 0
        self.stats = NetStats()
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = 0
        self._endpoints: dict[str, Endpoint] = {}
        self._states: dict[str, str] = {}
        self._links: dict[tuple[str, str], LinkProfile] = {}
        self._bursting: set[tuple[str, str]] = set()
        self._blocked: set[tuple[str, str]] = set()

    # -- events

    def schedule(self, at_ms: float, callback: Callable[..., None], *args: Any) -> None:
        assert at_ms >= self.clock.now_ms(), "cannot schedule in the past"
        self._order += 1
        heapq.heappush(self._queue, (at_ms, self._order, callback, args))

    def run_until(self, until_ms: float) -> None:
        while self._queue and self._queue[0][0] <= until_ms:
            at_ms, _, callback, args = heapq.heappop(self._queue)
            self.clock.advance_to(at_ms)
            self.events_run += 1
            assert self.events_run <= self.max_events, f"event bound exceeded (seed {self.seed})"
            callback(*args)
        self.clock.advance_to(max(until_ms, self.clock.now_ms()))

    def run_for(self, duration_ms: float) -> None:
        self.run_until(self.clock.now_ms() + duration_ms)

    # -- topology

    def attach(self, address: str, endpoint: Endpoint) -> None:
        self._endpoints[address] = endpoint
        self._states[address] = self.OPEN

    def set_state(self, address: str, state: str) -> None:
        assert state in (self.OPEN, self.CLOSED, self.SILENT)
        self._states[address] = state

    def set_link(self, source: str, destination: str, link: LinkProfile) -> None:
        self._links[(source, destination)] = link

    def block(self, source: str, destination: str) -> None:
        """Cut one direction: datagrams from source to destination vanish."""
        self._blocked.add((source, destination))

    def unblock(self, source: str, destination: str) -> None:
        self._blocked.discard((source, destination))

    def partition(self, groups: Sequence[Iterable[str]]) -> None:
        membership = {a: i for i, group in enumerate(groups) for a in group}
        for a, group_a in membership.items():
            for b, group_b in membership.items():
                if group_a != group_b:
                    self._blocked.add((a, b))

    def heal(self) -> None:
        self._blocked.clear()

    # -- datagrams

    def send(self, source: str, destination: str, payload: Any) -> None:
        self.stats.sent += 1
        if (source, destination) in self._blocked:
            self.stats.blocked += 1
            return
        link = self._links.get((source, destination), self.default_link)
        if self._lost(source, destination, link):
            self.stats.lost += 1
            return
        delay_ms = self.rng.uniform(link.delay_ms_min, link.delay_ms_max)
        self.schedule(self.clock.now_ms() + delay_ms, self._arrive, source, destination, payload)

    def _lost(self, source: str, destination: str, link: LinkProfile) -> bool:
        key = (source, destination)
        if key in self._bursting:
            if self.rng.random() < link.burst_exit_probability:
                self._bursting.discard(key)
            else:
                return True
        elif link.burst_enter_probability and self.rng.random() < link.burst_enter_probability:
            self._bursting.add(key)
            return True
        return self.rng.random() < link.loss_probability

    def _arrive(self, source: str, destination: str, payload: Any) -> None:
        state = self._states.get(destination, self.SILENT)
        if state == self.OPEN:
            self.stats.delivered += 1
            self._endpoints[destination].on_datagram(source, payload)
        elif state == self.CLOSED and (destination, source) not in self._blocked:
            # ICMP port unreachable travels back over the reverse link.
            link = self._links.get((destination, source), self.default_link)
            delay_ms = self.rng.uniform(link.delay_ms_min, link.delay_ms_max)
            self.schedule(self.clock.now_ms() + delay_ms, self._refuse, source, destination)
        else:
            self.stats.dropped_silently += 1

    def _refuse(self, source: str, destination: str) -> None:
        if self._states.get(source) == self.OPEN:
            self.stats.refused += 1
            self._endpoints[source].on_refused(destination)


# ---------------------------------------------------------------------------
# faults as data


@dataclass(frozen=True, slots=True)
class Crash:
    node_id: str
    at_ms: float
    # True: the process died, the host answers ICMP port unreachable (SIGKILL).
    # False: the host died or was unplugged: silence.
    host_up: bool = True


@dataclass(frozen=True, slots=True)
class Pause:
    """The process does not run (SIGSTOP, CPU starvation); a long one is a hang."""

    node_id: str
    at_ms: float
    duration_ms: float


@dataclass(frozen=True, slots=True)
class CutLink:
    source: str
    destination: str
    at_ms: float
    until_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Partition:
    groups: tuple[tuple[str, ...], ...]
    at_ms: float


@dataclass(frozen=True, slots=True)
class Heal:
    at_ms: float


@dataclass(frozen=True, slots=True)
class Restart:
    node_id: str
    at_ms: float


@dataclass(frozen=True, slots=True)
class ForgeRefusals:
    """An attacker's ICMP "port unreachable": `count` forged refusals, `interval_ms` apart,
    to `observer` about `target` (None: every observer, every target it watches), as if
    the observer's heartbeats to it had been refused. No secret is needed to send them."""

    at_ms: float
    observer: str | None = None
    target: str | None = None
    count: int = 1
    interval_ms: float = 100.0


@dataclass(frozen=True, slots=True)
class MuteHeartbeats:
    """The node stops sending heartbeats for `duration_ms` but still answers probes (a
    stuck send path, or heartbeats lost while probes get through): slow, never failed."""

    node_id: str
    at_ms: float
    duration_ms: float


Fault = Crash | Pause | CutLink | Partition | Heal | Restart | ForgeRefusals | MuteHeartbeats


@dataclass(frozen=True, slots=True)
class CpuLoad:
    """Scheduling noise on every node: each send runs late by an exponential
    lag, and the process stalls now and then (Poisson), as under CPU load."""

    send_lag_ms_mean: float = 0.0
    stalls_per_s: float = 0.0
    stall_ms_min: float = 0.0
    stall_ms_max: float = 0.0


@dataclass(frozen=True, slots=True)
class Observation:
    """One verdict as recorded by the simulation: who said what, when."""

    at_ms: float
    observer: str
    verdict: Verdict


# ---------------------------------------------------------------------------
# peers


@dataclass(frozen=True, slots=True)
class _Beat:
    node_id: str
    incarnation: int
    sequence: int


@dataclass(frozen=True, slots=True)
class _Ping:
    sender: str
    nonce: int


@dataclass(frozen=True, slots=True)
class _Ack:
    sender: str
    nonce: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class _PingRequest:
    sender: str
    subject: str
    nonce: int


@dataclass(frozen=True, slots=True)
class _AckRelay:
    subject: str
    nonce: int
    incarnation: int


# After a restart, the others' Raft connections to the node are up again this much later.
RECONNECT_MS = 50.0


_BACKLOG_MAX = 512  # a paused process's socket buffer, in datagrams


class SimPeer:
    """A peer's heartbeat shell, simulated: same rhythm and order as heartbeat.py."""

    def __init__(self, simulation: DetectionSimulation, node_id: str, incarnation: int) -> None:
        self.simulation = simulation
        self.node_id = node_id
        self.incarnation = incarnation
        self.settings = simulation.settings
        self.monitor = self._new_monitor()
        self.sequence = 0
        self.targets: list[str] = []
        self.muted_until_ms = 0.0
        self.send_lag_ms = 0.0
        self.relays: dict[int, tuple[str, str, int]] = {}  # my nonce -> (requester, subject, its nonce)
        self._relay_nonce = 0
        self.crashed = False
        self.paused_until_ms: float | None = None
        self.paused_since_ms = 0.0
        self.backlog: list[tuple[str, Any]] = []
        self.backlog_dropped = 0
        self._check_at_ms: float | None = None
        self._life = 0  # events of a previous life are ignored after a restart
        self.round = 0  # the watch set's rotation round this peer is in
        self.lingering: dict[str, float] = {}  # dropped targets still sent to, until

    @property
    def net(self) -> SimNet:
        return self.simulation.net

    def _new_monitor(self) -> Monitor:
        monitor = Monitor(self.settings, round_base=self.simulation.rng.randrange(1 << 40))
        monitor.set_members(n for n in self.simulation.node_ids if n != self.node_id)
        return monitor

    def now_ms(self) -> float:
        return self.net.clock.now_ms()

    def start(self, targets: Iterable[tuple[str, int]], phase_ms: float) -> None:
        now_ms = self.now_ms()
        self.targets = [node_id for node_id, _ in targets]
        self.monitor.set_watched(((n, i) for n, i in targets), now_ms)
        self.net.schedule(now_ms + phase_ms, self._send, now_ms + phase_ms, self._life)
        self._schedule_check()

    def retarget(self, targets: Iterable[tuple[str, int]], linger_ms: float = 0.0) -> None:
        """A new watch set (a rotation), as the shell's `set_targets`: new targets are watched
        from now, dropped ones forgotten but still sent heartbeats for `linger_ms`, kept ones
        keep their history."""
        if self.crashed:
            return
        chosen = list(targets)
        now_ms = self.now_ms()
        kept = {node_id for node_id, _ in chosen}
        if linger_ms > 0:
            self.lingering.update({n: now_ms + linger_ms for n in self.targets if n not in kept})
        self.targets = [node_id for node_id, _ in chosen]
        self.monitor.set_watched(chosen, now_ms)
        self._schedule_check()

    # -- sending: fixed rhythm, lag from CPU load, skipped slots after a stall

    def _send(self, slot_ms: float, life: int) -> None:
        if life != self._life or self.crashed:
            return
        if self.paused_until_ms is not None:
            self.net.schedule(self.paused_until_ms, self._send, slot_ms, life)
            return
        now_ms = self.now_ms()
        self.sequence += 1
        beat = _Beat(self.node_id, self.incarnation, self.sequence)
        if self.lingering:
            self.lingering = {n: until for n, until in self.lingering.items() if until > now_ms and n not in self.targets}
        if now_ms >= self.muted_until_ms:
            for target in [*self.targets, *self.lingering]:
                self.net.send(self.node_id, target, beat)
        self.monitor.on_lag(self.send_lag_ms, now_ms)
        interval_ms = self.settings.heartbeat_interval_ms
        next_slot_ms = slot_ms + interval_ms
        if next_slot_ms <= now_ms:
            next_slot_ms += (int((now_ms - next_slot_ms) / interval_ms) + 1) * interval_ms
        self.send_lag_ms = self.simulation.send_lag_ms()  # how late the next send will run
        self.net.schedule(next_slot_ms + self.send_lag_ms, self._send, next_slot_ms, life)

    # -- receiving

    def on_datagram(self, source: str, payload: Any) -> None:
        if self.crashed:
            return
        if self.paused_until_ms is not None:
            if len(self.backlog) < _BACKLOG_MAX:
                self.backlog.append((source, payload))
            else:
                self.backlog_dropped += 1
            return
        now_ms = self.now_ms()
        match payload:
            case _Beat():
                if payload.node_id in self.targets:
                    self._record(self.monitor.on_heartbeat(payload.node_id, payload.incarnation, payload.sequence, now_ms))
            case _Ping():
                self.net.send(self.node_id, source, _Ack(self.node_id, payload.nonce, self.incarnation))
            case _PingRequest():
                self._relay_nonce += 1
                self.relays[self._relay_nonce] = (payload.sender, payload.subject, payload.nonce)
                self.net.send(self.node_id, payload.subject, _Ping(self.node_id, self._relay_nonce))
            case _Ack():
                relay = self.relays.pop(payload.nonce, None)
                if relay is None:
                    self._record(self.monitor.on_ack(payload.sender, payload.nonce, payload.incarnation, now_ms))
                elif relay[1] == payload.sender:
                    self.net.send(self.node_id, relay[0], _AckRelay(payload.sender, relay[2], payload.incarnation))
            case _AckRelay():
                self._record(self.monitor.on_ack(payload.subject, payload.nonce, payload.incarnation, now_ms))

    def on_refused(self, destination: str) -> None:
        if self.crashed or self.paused_until_ms is not None:
            return
        transport_open = (self.node_id, destination) not in self.simulation.connections_down
        self._record(self.monitor.on_hint(destination, Hint.REFUSED, self.now_ms(), transport_open=transport_open))

    def on_disconnected(self, destination: str) -> None:
        """Our Raft connection to `destination` dropped (its process died)."""
        if self.crashed:
            return
        if self.paused_until_ms is not None:
            self.backlog.append((destination, Hint.DISCONNECTED))
            return
        self._record(self.monitor.on_hint(destination, Hint.DISCONNECTED, self.now_ms()))

    # -- judging: sleep until the next possible suspicion, like the shell

    def _schedule_check(self) -> None:
        now_ms = self.now_ms()
        at_ms = self.monitor.next_check_ms(now_ms)
        if self._check_at_ms is not None and self._check_at_ms <= at_ms:
            return
        self._check_at_ms = at_ms
        self.net.schedule(at_ms, self._check, self._life)

    def _check(self, life: int) -> None:
        if life != self._life or self.crashed:
            return
        if self.paused_until_ms is not None:
            return  # resumed by _resume, which checks
        if self._check_at_ms is not None and self._check_at_ms > self.now_ms():
            return  # a stale wake-up; a later one is pending
        self._check_at_ms = None
        self._record(self.monitor.tick(self.now_ms()))
        if self._check_at_ms is None:
            self._schedule_check()

    # -- faults

    def pause(self, duration_ms: float) -> None:
        if self.crashed:
            return
        now_ms = self.now_ms()
        until_ms = now_ms + duration_ms
        if self.paused_until_ms is None:
            self.paused_since_ms = now_ms
        elif until_ms <= self.paused_until_ms:
            return
        self.paused_until_ms = until_ms
        self.net.schedule(until_ms, self._resume, until_ms, self._life)

    def _resume(self, until_ms: float, life: int) -> None:
        if life != self._life or self.crashed or self.paused_until_ms != until_ms:
            return
        self.paused_until_ms = None
        now_ms = self.now_ms()
        backlog, self.backlog = self.backlog, []
        for source, payload in backlog:  # the shell drains the socket first
            if payload is Hint.DISCONNECTED:
                self.on_disconnected(source)
            else:
                self.on_datagram(source, payload)
        pause_ms = now_ms - self.paused_since_ms
        self.monitor.on_lag(pause_ms, now_ms)
        if pause_ms > self.settings.self_pause_threshold_ms:
            self.monitor.on_self_pause(pause_ms, now_ms)
        self._check_at_ms = None
        self._check(life)

    def crash(self) -> None:
        self.crashed = True
        self._life += 1

    def restart(self, incarnation: int, targets: Iterable[tuple[str, int]]) -> None:
        self._life += 1
        self.crashed = False
        self.paused_until_ms = None
        self.backlog = []
        self.lingering = {}
        self.incarnation = incarnation
        self.sequence = 0
        self.relays = {}
        self.muted_until_ms = 0.0
        self.monitor = self._new_monitor()
        self._check_at_ms = None
        self.start(targets, phase_ms=0.0)

    def _record(self, outputs: list[Output]) -> None:
        if not outputs:
            return  # an accepted heartbeat only moves deadlines later: no new check needed
        now_ms = self.now_ms()
        for output in outputs:
            if isinstance(output, Probe):
                self.simulation.probes_sent += 1
                self.net.send(self.node_id, output.node_id, _Ping(self.node_id, output.round_id))
                for helper in output.helpers:
                    self.net.send(self.node_id, helper, _PingRequest(self.node_id, output.node_id, output.round_id))
            else:
                self.simulation.history.append(Observation(now_ms, self.node_id, output))
        self._schedule_check()


# ---------------------------------------------------------------------------
# the cluster


@dataclass(slots=True, repr=False)
class DetectionSimulation:
    """N peers watching each other through a SimNet, with faults as data."""

    node_ids: Sequence[str]
    settings: DetectorSettings
    seed: int
    link: LinkProfile = ENTERPRISE_LINK
    cpu_load: CpuLoad = field(default_factory=CpuLoad)
    fanout: int = 4
    # Watch-set rotation (the peer's `watch_rotation_s`): every peer moves to the next round
    # at each multiple of `rotation_ms` by its own clock, `clock_offsets_ms[node]` off the
    # true time, plus up to `rotation_skew_ms` more; dropped targets get heartbeats for
    # `rotation_linger_ms` more.
    rotation_ms: float = 0.0
    rotation_skew_ms: float = 5.0
    rotation_linger_ms: float = 1_000.0  # the peer's: first_heartbeat_grace_ms
    clock_offsets_ms: dict[str, float] = field(default_factory=dict)
    net: SimNet = field(init=False)
    peers: dict[str, SimPeer] = field(init=False)
    history: list[Observation] = field(init=False)
    faults: list[Fault] = field(init=False)
    rng: random.Random = field(init=False)
    # (observer, target) pairs whose Raft connection is down (the target's process died).
    connections_down: set[tuple[str, str]] = field(init=False)
    probes_sent: int = field(init=False)

    def __post_init__(self) -> None:
        assert len(set(self.node_ids)) == len(self.node_ids) >= 2
        self.net = SimNet(self.seed, link=self.link)
        self.rng = random.Random(f"simulation/{self.seed}")
        self.history = []
        self.faults = []
        self.peers = {}
        self.connections_down = set()
        self.probes_sent = 0
        for node_id in self.node_ids:
            peer = SimPeer(self, node_id, incarnation=1)
            self.peers[node_id] = peer
            self.net.attach(node_id, peer)
        interval_ms = self.settings.heartbeat_interval_ms
        for node_id, peer in self.peers.items():
            peer.start(self._targets(node_id), phase_ms=self.rng.uniform(0.0, interval_ms))
        if self.cpu_load.stalls_per_s > 0:
            for node_id in self.node_ids:
                self._schedule_stall(node_id)
        if self.rotation_ms > 0:
            for node_id in self.node_ids:
                self._schedule_rotation(node_id, 1)

    def __repr__(self) -> str:
        # Short on purpose: assertion messages show it, and the seed must be visible.
        return (f"DetectionSimulation(seed={self.seed}, profile={self.settings.name}, "
                f"nodes={len(self.node_ids)}, now_ms={self.now_ms():.1f}, faults={self.faults})")

    def now_ms(self) -> float:
        return self.net.clock.now_ms()

    def _targets(self, node_id: str) -> list[tuple[str, int]]:
        chosen = monitoring_targets(
            node_id, self.node_ids, seed=self.seed, round_number=self.peers[node_id].round, fanout=self.fanout
        )
        return [(target, self.peers[target].incarnation) for target in chosen]

    def _schedule_rotation(self, node_id: str, round_number: int) -> None:
        offset_ms = self.clock_offsets_ms.get(node_id, 0.0)
        at_ms = round_number * self.rotation_ms - offset_ms + self.rng.uniform(0.0, self.rotation_skew_ms)
        self.net.schedule(at_ms, self._rotate, node_id, round_number)

    def _rotate(self, node_id: str, round_number: int) -> None:
        peer = self.peers[node_id]
        peer.round = round_number
        peer.retarget(self._targets(node_id), linger_ms=self.rotation_linger_ms)
        self._schedule_rotation(node_id, round_number + 1)

    def send_lag_ms(self) -> float:
        mean = self.cpu_load.send_lag_ms_mean
        return self.rng.expovariate(1.0 / mean) if mean > 0 else 0.0

    def _schedule_stall(self, node_id: str) -> None:
        gap_ms = self.rng.expovariate(self.cpu_load.stalls_per_s) * 1000.0
        self.net.schedule(self.now_ms() + gap_ms, self._stall, node_id)

    def _stall(self, node_id: str) -> None:
        duration_ms = self.rng.uniform(self.cpu_load.stall_ms_min, self.cpu_load.stall_ms_max)
        self.peers[node_id].pause(duration_ms)
        self._schedule_stall(node_id)

    # -- faults

    def inject(self, fault: Fault) -> None:
        self.faults.append(fault)
        self.net.schedule(max(fault.at_ms, self.now_ms()), self._apply, fault)

    def _apply(self, fault: Fault) -> None:
        match fault:
            case Crash(node_id=node_id, host_up=host_up):
                self.peers[node_id].crash()
                self.net.set_state(node_id, SimNet.CLOSED if host_up else SimNet.SILENT)
                if host_up:
                    self._disconnect(node_id)
            case Pause(node_id=node_id, duration_ms=duration_ms):
                self.peers[node_id].pause(duration_ms)
            case CutLink(source=source, destination=destination, until_ms=until_ms):
                self.net.block(source, destination)
                if until_ms is not None:
                    self.net.schedule(until_ms, self.net.unblock, source, destination)
            case Partition(groups=groups):
                self.net.partition(groups)
            case Heal():
                self.net.heal()
            case Restart(node_id=node_id):
                peer = self.peers[node_id]
                if not peer.crashed:
                    self._disconnect(node_id)  # the old process exits: its connections close
                self.net.set_state(node_id, SimNet.OPEN)
                peer.restart(peer.incarnation + 1, self._targets(node_id))
                self.net.schedule(self.now_ms() + RECONNECT_MS, self._reconnect, node_id)
            case ForgeRefusals(observer=observer, target=target, count=count, interval_ms=interval_ms):
                for index in range(count):
                    self.net.schedule(self.now_ms() + index * interval_ms, self._forge_refusal, observer, target)
            case MuteHeartbeats(node_id=node_id, duration_ms=duration_ms):
                self.peers[node_id].muted_until_ms = self.now_ms() + duration_ms

    def _disconnect(self, node_id: str) -> None:
        """The process of `node_id` died with its host up: every peer's Raft connection to it
        closes (a FIN, one link delay away)."""
        for observer in self.node_ids:
            if observer == node_id:
                continue
            self.connections_down.add((observer, node_id))
            link = self.net._links.get((node_id, observer), self.net.default_link)
            delay_ms = self.rng.uniform(link.delay_ms_min, link.delay_ms_max)
            self.net.schedule(self.now_ms() + delay_ms, self.peers[observer].on_disconnected, node_id)

    def _reconnect(self, node_id: str) -> None:
        self.connections_down = {pair for pair in self.connections_down if pair[1] != node_id}

    def _forge_refusal(self, observer: str | None, target: str | None) -> None:
        observers = [observer] if observer is not None else list(self.node_ids)
        for name in observers:
            peer = self.peers[name]
            for victim in [target] if target is not None else list(peer.targets):
                if victim != name:
                    peer.on_refused(victim)

    def run_until(self, until_ms: float) -> None:
        self.net.run_until(until_ms)

    def run_for(self, duration_ms: float) -> None:
        self.net.run_for(duration_ms)

    def watchers_of(self, node_id: str) -> list[str]:
        return [n for n, p in self.peers.items() if node_id in p.targets]


# ---------------------------------------------------------------------------
# checkers: pure functions over a history


def first_suspicions(history: Iterable[Observation], node_id: str,
                     since_ms: float) -> dict[str, float]:
    """Observer -> time of its first suspicion of `node_id` at or after `since_ms`."""
    first: dict[str, float] = {}
    for observation in history:
        verdict = observation.verdict
        if (isinstance(verdict, Suspect) and verdict.node_id == node_id
                and observation.at_ms >= since_ms and observation.observer not in first):
            first[observation.observer] = observation.at_ms
    return first


def suspicion_intervals(history: Iterable[Observation],
                        end_ms: float) -> list[tuple[str, str, float, float]]:
    """(observer, node, start_ms, end_ms) for every suspicion, closed by the
    observer's Recover/Restarted or by `end_ms`."""
    open_since: dict[tuple[str, str], float] = {}
    intervals: list[tuple[str, str, float, float]] = []
    for observation in history:
        verdict = observation.verdict
        if isinstance(verdict, Suspect):
            open_since.setdefault((observation.observer, verdict.node_id), observation.at_ms)
        elif isinstance(verdict, Recover | Restarted):
            key = (observation.observer, verdict.node_id)
            if key in open_since:
                intervals.append((*key, open_since.pop(key), observation.at_ms))
    intervals.extend((o, n, start, end_ms) for (o, n), start in open_since.items())
    return intervals


def max_concurrent_suspicions(history: Iterable[Observation], end_ms: float) -> dict[str, int]:
    """Node -> the largest number of distinct observers suspecting it at once.
    A count of 2 or more is what a quorum-of-2 confirmation would act on."""
    edges: dict[str, list[tuple[float, int]]] = {}
    for _, node_id, start_ms, stop_ms in suspicion_intervals(history, end_ms):
        edges.setdefault(node_id, []).extend([(start_ms, 1), (stop_ms, -1)])
    result: dict[str, int] = {}
    for node_id, node_edges in edges.items():
        current = peak = 0
        for _, delta in sorted(node_edges, key=lambda edge: (edge[0], edge[1])):
            current += delta
            peak = max(peak, current)
        result[node_id] = peak
    return result


def kth_suspicion_ms(first: dict[str, float], k: int) -> float | None:
    """When the k-th distinct observer suspected, or None if fewer did."""
    times = sorted(first.values())
    return times[k - 1] if len(times) >= k else None
