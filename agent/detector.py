"""Failure detection arithmetic: phi accrual per node, verdicts as values.

Every peer watches a few others through their heartbeats. This module turns
heartbeat arrivals (and the kernel's "port unreachable") into one observer's
opinions: `Suspect`, `Recover`, `Restarted`, and, for nodes that answer but
serve too slowly, `Degraded` / `Restored`. `Quiet` comes shortly before a
suspicion and is no opinion at all: the shell starts an early Raft election if
the quiet node leads. The shell proposes those into Raft,
where opinions from several observers become a confirmed failure. One
observer's verdict is never a confirmation: this module can afford to be
quick because the cluster asks for more than one witness.

Why phi accrual (Hayashibara et al., as in Akka and Cassandra): instead of
a fixed timeout it keeps the recent distribution of inter-arrival times and
says how unlikely the current silence is, phi = -log10(P(a heartbeat arrives
later than this)). A fixed threshold on phi adapts to each link: a jittery
WiFi link earns a wider margin than a quiet Ethernet one. Two knobs keep it
honest on real networks (from Akka): a floor on the standard deviation, so a
perfectly regular link does not make the detector hair-triggered, and an
acceptable pause added to the mean, for the occasional GC or scheduling stall.
A third comes from measuring real peers on a contended machine: stalls come in
bursts, so a node that just stalled as a sender gets a wider pause for a few
seconds (the stall memory, `DetectorSettings.stall_memory_ms`), while a quiet
node keeps the fast one.

The core is sans-IO (STYLE.md): no asyncio, time, random or socket; every
method takes `now_ms` and returns values. The same code runs under the
asyncio shell (`agent/heartbeat.py`) and in the seeded simulation
(`chaos/simnet.py`).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from redge.agent.detector_settings import DetectorSettings
from redge.agent.phi import phi, suspicion_elapsed_ms
from redge.agent.slowness import SlownessJudge, SlownessSettings
from redge.agent.verdicts import (
    Degraded,
    DegradedReason,
    Hint,
    Output,
    Probe,
    Quiet,
    Recover,
    Restarted,
    Restored,
    Suspect,
    SuspectReason,
)

# ---------------------------------------------------------------------------
# one watched node


class IntervalHistory:
    """A bounded window of inter-arrival times with O(1) mean and variance."""

    __slots__ = ("_capacity", "_samples", "_since_recompute", "_sum_ms", "_sum_squares")

    def __init__(self, capacity: int) -> None:
        assert capacity >= 2
        self._capacity = capacity
        self._samples: deque[float] = deque()
        self._sum_ms = 0.0
        self._sum_squares = 0.0
        self._since_recompute = 0

    def add(self, interval_ms: float) -> None:
        assert interval_ms >= 0.0
        if len(self._samples) == self._capacity:
            oldest = self._samples.popleft()
            self._sum_ms -= oldest
            self._sum_squares -= oldest * oldest
        self._samples.append(interval_ms)
        self._sum_ms += interval_ms
        self._sum_squares += interval_ms * interval_ms
        self._since_recompute += 1
        # Running sums drift with floating-point cancellation; recompute
        # exactly once per window so the drift stays bounded.
        if self._since_recompute >= self._capacity:
            self._sum_ms = math.fsum(self._samples)
            self._sum_squares = math.fsum(s * s for s in self._samples)
            self._since_recompute = 0

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def mean_ms(self) -> float:
        assert self._samples
        return self._sum_ms / len(self._samples)

    @property
    def std_deviation_ms(self) -> float:
        assert self._samples
        mean = self.mean_ms
        variance = self._sum_squares / len(self._samples) - mean * mean
        return math.sqrt(max(variance, 0.0))


class HeartbeatOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    RESTARTED = "restarted"  # accepted, with a higher incarnation
    DUPLICATE = "duplicate"  # sequence not above the last accepted one: duplicate or reordered
    STALE = "stale"  # lower incarnation: a packet from a previous life


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One watched node as this observer sees it, for metrics and `redge status`."""

    node_id: str
    incarnation: int
    phi: float
    suspected: SuspectReason | None
    suspected_at_ms: float | None
    last_heard_ms: float | None
    heartbeats_accepted: int
    heartbeats_lost: int
    heartbeats_duplicate: int
    heartbeats_stale: int
    restarts: int
    interval_mean_ms: float
    interval_std_deviation_ms: float


@dataclass(slots=True)
class ProbeRound:
    """One burst of probes about a node, and the suspicion it becomes if nothing answers."""

    round_id: int
    trigger: SuspectReason
    started_ms: float
    timeout_ms: float
    attempts_sent: int = 0
    # A refusal while this observer's Raft connection to the node is open: a process that
    # died would have closed it, so unanswered, this round suspects nothing on its own.
    vetoed: bool = False

    @property
    def is_hint(self) -> bool:
        return self.trigger in (SuspectReason.UNREACHABLE, SuspectReason.DISCONNECTED)

    def attempt_due_ms(self, attempts: int) -> float | None:
        """When the next direct ping goes out, or None when all have."""
        if self.attempts_sent >= attempts:
            return None
        return self.started_ms + self.attempts_sent * self.timeout_ms / attempts


class LocalHealth:
    """Lifeguard's local health multiplier, sans-IO: how much this observer doubts its own
    timing. Fed with its own loop lag; `multiplier` is 1 when healthy."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.score = 0
        self._changed_ms = 0.0
        self.lag_events = 0

    def on_lag(self, lag_ms: float, now_ms: float) -> bool:
        """Record one measurement of this observer's loop lag; True when the score changed."""
        changed = self._decay(now_ms)
        if lag_ms >= self.settings.local_health_lag_ms:
            self.lag_events += 1
            self._changed_ms = now_ms
            if self.score < self.settings.local_health_max:
                self.score += 1
                changed = True
        return changed

    def update(self, now_ms: float) -> bool:
        """Let time pass; True when the score fell."""
        return self._decay(now_ms)

    def _decay(self, now_ms: float) -> bool:
        decay_ms = self.settings.local_health_decay_ms
        changed = False
        while self.score > 0 and now_ms - self._changed_ms >= decay_ms:
            self.score -= 1
            self._changed_ms += decay_ms
            changed = True
        return changed

    def next_change_ms(self) -> float | None:
        return self._changed_ms + self.settings.local_health_decay_ms if self.score > 0 else None

    @property
    def multiplier(self) -> float:
        return 1.0 + self.score


class NodeDetector:
    """Phi accrual over one node's heartbeats, with incarnation and sequence rules.

    The reference instant for silence is the last accepted arrival; before the
    first one it is the moment watching began plus the first-heartbeat grace.
    """

    def __init__(
        self,
        node_id: str,
        incarnation: int,
        settings: DetectorSettings,
        now_ms: float,
        observer_started_ms: float | None = None,
    ):
        self.node_id = node_id
        # When the observer itself began watching anyone: its own first seconds are as
        # stall-prone as a watched node's, and its self-pause check does not catch all of it.
        self.observer_started_ms = now_ms if observer_started_ms is None else observer_started_ms
        self.settings = settings
        self.incarnation = incarnation
        self.last_sequence: int | None = None
        self.last_arrival_ms: float | None = None
        self.watch_started_ms = now_ms
        self.history = IntervalHistory(settings.window_size)
        self._skip_next_interval = False
        self._reference_cache: tuple[float, float, float] | None = None
        # The longest recent sender stall and when it was seen: the stall memory.
        self.stall_gap_ms = 0.0
        self.stall_seen_at_ms: float | None = None
        self.last_sent_ms: float | None = None
        self.suspected: SuspectReason | None = None
        self.suspected_at_ms: float | None = None
        self.quiet_reported = False  # this silence was already reported as `Quiet`
        self.probe: ProbeRound | None = None
        # The observer's local health multiplier (set by the Monitor for all its detectors).
        self.health_multiplier = 1.0
        self.rescued_at_ms: deque[float] = deque(maxlen=64)  # PHI rounds an answer ended
        self.degraded_by_probes = False
        self.hints_refuted = 0
        self.hints_vetoed = 0
        self.heartbeats_since_suspicion = 0
        self.heartbeats_accepted = 0
        self.heartbeats_lost = 0
        self.heartbeats_duplicate = 0
        self.heartbeats_stale = 0
        self.restarts = 0

    def _bootstrap(self) -> None:
        # Akka's first-heartbeat bootstrap: pretend two intervals around the
        # expected one were seen, so phi is meaningful from the second heartbeat.
        estimate = self.settings.first_heartbeat_estimate_ms
        self.history = IntervalHistory(self.settings.window_size)
        self.history.add(estimate - estimate / 4.0)
        self.history.add(estimate + estimate / 4.0)

    def on_heartbeat(
        self, incarnation: int, sequence: int, now_ms: float, sent_ms: float | None = None
    ) -> HeartbeatOutcome:
        """`sent_ms` is the sender's own clock when it sent this heartbeat (any origin, one
        clock per incarnation); with it the stall memory measures the sender's own gaps,
        which every watcher sees alike, instead of arrival gaps, which carry the network's
        and this observer's delays too."""
        self._reference_cache = None
        if incarnation < self.incarnation:
            self.heartbeats_stale += 1
            return HeartbeatOutcome.STALE
        outcome = HeartbeatOutcome.ACCEPTED
        if incarnation > self.incarnation:
            # Incarnation 0 means "not known yet" (nothing committed, nothing
            # heard): the first heartbeat introduces the node, it does not
            # announce a restart.
            if self.incarnation != 0 or self.heartbeats_accepted > 0:
                self.restarts += 1
                outcome = HeartbeatOutcome.RESTARTED
            self.incarnation = incarnation
            self.last_sequence = None
            self.last_arrival_ms = None
            self.last_sent_ms = None
        if self.last_sequence is not None and sequence <= self.last_sequence:
            self.heartbeats_duplicate += 1
            return HeartbeatOutcome.DUPLICATE
        if self.last_sequence is not None:
            self.heartbeats_lost += sequence - self.last_sequence - 1
        if self.last_arrival_ms is None:
            self._bootstrap()
        elif self._skip_next_interval:
            self._skip_next_interval = False
        elif self.suspected is None:
            # A gap that got the node suspected is a fault, not the link's
            # behaviour: learning from it would slow the next detection.
            gap_ms = max(0.0, now_ms - self.last_arrival_ms)
            self.history.add(gap_ms)
            if self.last_sequence is not None and sequence == self.last_sequence + 1:
                if sent_ms is not None and self.last_sent_ms is not None:
                    gap_ms = sent_ms - self.last_sent_ms
                self._remember_stall(gap_ms, now_ms)
        self.last_sequence = sequence
        self.last_arrival_ms = now_ms
        self.last_sent_ms = sent_ms
        self.quiet_reported = False
        self.heartbeats_accepted += 1
        return outcome

    def _remember_stall(self, gap_ms: float, now_ms: float) -> None:
        """Keep the longest loss-free gap of the stall memory (a newer one replaces an
        expired or shorter one; it is a late sender, not a lost packet)."""
        settings = self.settings
        if settings.stall_allowance_factor <= 0 or gap_ms <= 2 * settings.heartbeat_interval_ms:
            return
        expired = (
            self.stall_seen_at_ms is None or now_ms - self.stall_seen_at_ms > settings.stall_memory_ms
        )
        if expired or gap_ms >= self.stall_gap_ms:
            self.stall_gap_ms = gap_ms
            self.stall_seen_at_ms = now_ms

    def acceptable_pause_ms(self) -> float:
        """The pause added to the mean: the base one, or more while a stall is remembered
        (judged at the last arrival: the memory cannot expire during the silence it covers)."""
        settings = self.settings
        if self.last_arrival_ms is None:
            return settings.acceptable_heartbeat_pause_ms
        if self.in_startup():
            return max(settings.acceptable_heartbeat_pause_ms, settings.acceptable_heartbeat_pause_ms_max)
        return max(self._remembered_pause_ms(), self._doubting_pause_ms())

    def _remembered_pause_ms(self) -> float:
        settings = self.settings
        assert self.last_arrival_ms is not None
        if (
            self.stall_seen_at_ms is None
            or self.last_arrival_ms - self.stall_seen_at_ms > settings.stall_memory_ms
        ):
            return settings.acceptable_heartbeat_pause_ms
        return settings.stall_pause_ms(self.stall_gap_ms, self.history.mean_ms)

    def _doubting_pause_ms(self) -> float:
        """The pause while the observer doubts its own timing (local health), to the cap."""
        settings = self.settings
        wanted_ms = settings.acceptable_heartbeat_pause_ms * self.health_multiplier
        return min(wanted_ms, max(settings.acceptable_heartbeat_pause_ms, settings.acceptable_heartbeat_pause_ms_max))

    def probe_timeout_ms(self) -> float:
        """How long a probe round waits for an answer: the profile's timeout, longer while the
        observer doubts itself. Not longer for a node that stalled lately or is young: a
        round about its silence ends no sooner than the silence it is allowed anyway, and a
        hint about it is either a dropped connection (a process exit closes them all) or a
        refusal, which suspects nothing while the connection is up."""
        return self.settings.probe_timeout_ms * self.health_multiplier

    def on_alive(self, now_ms: float) -> None:
        """An authenticated answer to a probe: the node runs now. Its silence starts over,
        without an interval sample (the gap to the next heartbeat spans the silence)."""
        self._reference_cache = None
        if self.last_arrival_ms is None:
            self.watch_started_ms = max(self.watch_started_ms, now_ms - self.settings.first_heartbeat_grace_ms)
        else:
            self.last_arrival_ms = max(self.last_arrival_ms, now_ms)
            self._skip_next_interval = True
        self.quiet_reported = False

    def in_startup(self) -> bool:
        """Whether the node or this observer is younger than `startup_grace_ms`. The node's
        age is told by the sender itself: its sequence numbers start at 1 with each
        incarnation, one per interval, so every watcher agrees, including one that only
        began watching it (a rotated watch set). The observer's age counts too: a peer that
        just started is busy itself (imports, catching up, its model host starting), and
        without it a restarted peer suspected its leader and took over leadership."""
        settings = self.settings
        if settings.startup_grace_ms <= 0 or self.last_sequence is None or self.last_arrival_ms is None:
            return False
        if self.last_sequence * settings.heartbeat_interval_ms <= settings.startup_grace_ms:
            return True
        return self.last_arrival_ms - self.observer_started_ms <= settings.startup_grace_ms

    def _reference(self) -> tuple[float, float, float]:
        """(silence start, mean, std) that phi is computed from; cached
        between heartbeats because the shell asks for it on every check."""
        if self._reference_cache is None:
            self._reference_cache = self._compute_reference()
        return self._reference_cache

    def _compute_reference(self) -> tuple[float, float, float]:
        settings = self.settings
        if self.last_arrival_ms is None:
            estimate = settings.first_heartbeat_estimate_ms
            return (
                self.watch_started_ms + settings.first_heartbeat_grace_ms,
                estimate + settings.acceptable_heartbeat_pause_ms,
                max(estimate / 4.0, settings.min_std_deviation_ms),
            )
        return (
            self.last_arrival_ms,
            self.history.mean_ms + self.acceptable_pause_ms(),
            max(self.history.std_deviation_ms, settings.min_std_deviation_ms),
        )

    def phi(self, now_ms: float) -> float:
        start_ms, mean_ms, std_ms = self._reference()
        return phi(now_ms - start_ms, mean_ms, std_ms)

    def suspicion_deadline_ms(self) -> float:
        """The instant phi reaches the threshold if nothing more arrives."""
        start_ms, mean_ms, std_ms = self._reference()
        return start_ms + suspicion_elapsed_ms(self.settings.phi_threshold, mean_ms, std_ms)

    def quiet_deadline_ms(self) -> float | None:
        """When this silence is reported as `Quiet`, or None where it will not be (turned
        off, already reported, suspected, or never heard from: nothing leads unheard)."""
        if (
            self.settings.quiet_lead_ms <= 0
            or self.quiet_reported
            or self.suspected is not None
            or self.last_arrival_ms is None
        ):
            return None
        return self.suspicion_deadline_ms() - self.settings.quiet_lead_ms

    def probe_start_ms(self) -> float:
        """When a silence starts being probed: early enough that a full round fits before
        phi crosses the threshold, and no later than `Quiet`, so the answers (or their
        absence) are in when the suspicion is due and probing adds no detection time."""
        lead_ms = max(self.settings.quiet_lead_ms, self.probe_timeout_ms())
        return self.suspicion_deadline_ms() - lead_ms

    def round_deadline_ms(self) -> float | None:
        """When the running probe round ends unanswered: a hint's after its timeout; a
        silence's not before phi crosses the threshold (it may have started at `Quiet`)."""
        probe = self.probe
        if probe is None:
            return None
        end_ms = probe.started_ms + probe.timeout_ms
        if probe.is_hint:
            return end_ms
        # A microsecond past the crossing absorbs float rounding.
        return max(end_ms, self.suspicion_deadline_ms() + 0.001)

    def on_self_pause(self, pause_ms: float, now_ms: float) -> None:
        self._reference_cache = None
        if self.last_arrival_ms is None:
            self.watch_started_ms = min(now_ms, self.watch_started_ms + pause_ms)
        else:
            self.last_arrival_ms = min(now_ms, self.last_arrival_ms + pause_ms)
            self._skip_next_interval = True

    def health(self, now_ms: float) -> NodeHealth:
        has_history = self.last_arrival_ms is not None
        return NodeHealth(
            node_id=self.node_id,
            incarnation=self.incarnation,
            phi=self.phi(now_ms),
            suspected=self.suspected,
            suspected_at_ms=self.suspected_at_ms,
            last_heard_ms=self.last_arrival_ms,
            heartbeats_accepted=self.heartbeats_accepted,
            heartbeats_lost=self.heartbeats_lost,
            heartbeats_duplicate=self.heartbeats_duplicate,
            heartbeats_stale=self.heartbeats_stale,
            restarts=self.restarts,
            interval_mean_ms=self.history.mean_ms if has_history else 0.0,
            interval_std_deviation_ms=self.history.std_deviation_ms if has_history else 0.0,
        )


# ---------------------------------------------------------------------------
# many watched nodes


class Monitor:
    """One observer's detectors over the nodes it watches.

    Returns verdict *changes*: a node is suspected once, recovered once. The
    shell proposes them into Raft and logs them; the state machine counts
    distinct observers. It also returns `Probe`s for the shell to send: a hint or a
    silence becomes a suspicion only once a probe round about it went unanswered.
    """

    def __init__(
        self,
        settings: DetectorSettings,
        slowness: SlownessSettings | None = None,
        max_watched: int = 1024,
        round_base: int = 0,
    ) -> None:
        assert max_watched >= 1 and round_base >= 0
        self.settings = settings
        self.max_watched = max_watched
        self.judge = SlownessJudge(slowness)
        self.local_health = LocalHealth(settings)
        self._detectors: dict[str, NodeDetector] = {}
        # Every other member, for choosing probe helpers (the shell keeps it current).
        self._members: tuple[str, ...] = ()
        # Round ids start at `round_base` (the shell draws it at random), so an answer
        # captured in an earlier life of this observer matches no round of this one.
        self._next_round = round_base + 1
        self.started_ms: float | None = None  # the first watch: when this observer began
        self.heartbeats_unknown_sender = 0
        self.self_pauses = 0
        self.self_pause_ms_max = 0.0
        self.probes_started = 0
        self.probes_answered = 0
        self.acks_unmatched = 0
        # The highest phi a watched node reached and then answered, without being suspected:
        # how close the links came to a false suspicion (the soak reports it).
        self.phi_at_arrival_max = 0.0

    # -- watch set

    def watch(self, node_id: str, incarnation: int, now_ms: float) -> None:
        """Start watching (idempotent). A known incarnation higher than the
        one tracked means the committed state saw a restart: start afresh."""
        if self.started_ms is None:
            self.started_ms = now_ms
        detector = self._detectors.get(node_id)
        if detector is None:
            assert len(self._detectors) < self.max_watched, "watch set is full"
        elif incarnation <= detector.incarnation:
            return
        detector = NodeDetector(node_id, incarnation, self.settings, now_ms, self.started_ms)
        detector.health_multiplier = self.local_health.multiplier
        self._detectors[node_id] = detector

    def unwatch(self, node_id: str) -> None:
        self._detectors.pop(node_id, None)

    def set_watched(self, targets: Iterable[tuple[str, int]], now_ms: float) -> None:
        wanted = dict(targets)
        for node_id in [n for n in self._detectors if n not in wanted]:
            self.unwatch(node_id)
        for node_id, incarnation in wanted.items():
            self.watch(node_id, incarnation, now_ms)

    def set_members(self, member_ids: Iterable[str]) -> None:
        """The other live members, any of which can be asked to probe a node for us."""
        self._members = tuple(sorted(set(member_ids)))

    def watched(self) -> list[str]:
        return list(self._detectors)

    def is_suspected(self, node_id: str) -> bool:
        detector = self._detectors.get(node_id)
        return detector is not None and detector.suspected is not None

    # -- evidence

    def on_heartbeat(
        self, node_id: str, incarnation: int, sequence: int, now_ms: float,
        sent_ms: float | None = None,
    ) -> list[Output]:
        detector = self._detectors.get(node_id)
        if detector is None:
            self.heartbeats_unknown_sender += 1
            return []
        previous_incarnation = detector.incarnation
        phi_before = (
            detector.phi(now_ms)
            if detector.suspected is None and detector.last_arrival_ms is not None else 0.0
        )
        outcome = detector.on_heartbeat(incarnation, sequence, now_ms, sent_ms)
        if outcome is HeartbeatOutcome.ACCEPTED:
            self.phi_at_arrival_max = max(self.phi_at_arrival_max, phi_before)
        verdicts: list[Output] = []
        if outcome is HeartbeatOutcome.RESTARTED:
            detector.probe = None  # a new life answers for itself
            verdicts.append(Restarted(node_id, previous_incarnation, incarnation, now_ms))
            if detector.suspected is not None:
                # A new incarnation is alive by construction; stale packets of
                # the old one are dropped by incarnation, so no hysteresis.
                self._clear(detector)
                verdicts.append(Recover(node_id, incarnation, now_ms))
            return verdicts
        if outcome is not HeartbeatOutcome.ACCEPTED:
            return verdicts
        if detector.probe is not None and not detector.probe.is_hint:
            detector.probe = None  # the silence it was about is over
        if detector.suspected is not None:
            detector.heartbeats_since_suspicion += 1
            if detector.heartbeats_since_suspicion >= self.settings.recovery_heartbeat_count:
                self._clear(detector)
                verdicts.append(Recover(node_id, detector.incarnation, now_ms))
        elif detector.degraded_by_probes and (
            not detector.rescued_at_ms or now_ms - detector.rescued_at_ms[-1] > self.settings.degraded_window_ms
        ):
            detector.degraded_by_probes = False
            verdicts.append(Restored(node_id, now_ms))
        return verdicts

    def on_hint(self, node_id: str, hint: Hint, now_ms: float, *, transport_open: bool = False) -> list[Output]:
        """Something suggests `node_id` is gone (see `Hint`): probe it now. `transport_open`:
        this observer's Raft connection to the node is up; a process that died would have
        closed it, so a refusal then suspects nothing unless the node is also silent."""
        detector = self._detectors.get(node_id)
        if detector is None:
            return []
        if detector.suspected is not None:
            detector.heartbeats_since_suspicion = 0  # one stray packet does not undo this
            return []
        if detector.probe is not None:
            return []  # a round about it is running; it answers this hint too
        reason = SuspectReason.UNREACHABLE if hint is Hint.REFUSED else SuspectReason.DISCONNECTED
        return self._start_round(detector, reason, now_ms, vetoed=hint is Hint.REFUSED and transport_open)

    def on_ack(self, node_id: str, round_id: int, incarnation: int, now_ms: float) -> list[Output]:
        """An authenticated answer from `node_id` (direct, or relayed by a helper) to probe
        round `round_id`: it runs. An answer to no running round proves nothing (it may be
        a replay) and is only counted."""
        detector = self._detectors.get(node_id)
        probe = detector.probe if detector is not None else None
        if detector is None or probe is None or probe.round_id != round_id or incarnation < detector.incarnation:
            self.acks_unmatched += 1
            return []
        detector.probe = None
        self.probes_answered += 1
        if probe.is_hint:
            detector.hints_refuted += 1
            return []
        # Its heartbeats went quiet, yet it answers: alive, perhaps slow.
        detector.on_alive(now_ms)
        detector.rescued_at_ms.append(now_ms)
        horizon_ms = now_ms - self.settings.degraded_window_ms
        recent = sum(1 for at_ms in detector.rescued_at_ms if at_ms >= horizon_ms)
        if not detector.degraded_by_probes and recent >= self.settings.probe_rescues_degraded:
            detector.degraded_by_probes = True
            return [Degraded(node_id, DegradedReason.LATE, float(recent), now_ms)]
        return []

    def on_lag(self, lag_ms: float, now_ms: float) -> None:
        """This observer's own loop ran `lag_ms` late (measured by the shell on every wake)."""
        assert lag_ms >= 0
        if self.local_health.on_lag(lag_ms, now_ms):
            self._apply_health()

    def on_self_pause(self, pause_ms: float, now_ms: float) -> None:
        """The observer itself did not run for `pause_ms` (measured by the shell
        as scheduling lag). Silence it could not have seen is not held against
        the watched nodes; their heartbeats are still queued in the socket."""
        assert pause_ms >= 0
        self.self_pauses += 1
        self.self_pause_ms_max = max(self.self_pause_ms_max, pause_ms)
        for detector in self._detectors.values():
            detector.on_self_pause(pause_ms, now_ms)

    def on_request_timeout(self, node_id: str, now_ms: float) -> None:
        self.judge.on_timeout(node_id, now_ms)

    # -- judgment

    def tick(self, now_ms: float) -> list[Output]:
        if self.local_health.update(now_ms):
            self._apply_health()
        outputs: list[Output] = []
        threshold = self.settings.phi_threshold
        attempts = self.settings.probe_attempts
        for detector in self._detectors.values():
            if detector.suspected is not None:
                continue
            if detector.probe is None and now_ms >= detector.probe_start_ms():
                outputs += self._start_round(detector, SuspectReason.PHI, now_ms)
            quiet_ms = detector.quiet_deadline_ms()
            if quiet_ms is not None and now_ms >= quiet_ms:
                detector.quiet_reported = True
                assert detector.last_arrival_ms is not None
                outputs.append(Quiet(detector.node_id, detector.incarnation, now_ms - detector.last_arrival_ms, now_ms))
            probe = detector.probe
            if probe is None:
                continue
            due_ms = probe.attempt_due_ms(attempts)
            if due_ms is not None and now_ms >= due_ms:
                probe.attempts_sent += 1
                outputs.append(Probe(detector.node_id, probe.round_id, probe.attempts_sent - 1, (), now_ms))
            deadline_ms = detector.round_deadline_ms()
            assert deadline_ms is not None
            if now_ms < deadline_ms:
                continue
            silent = detector.phi(now_ms) >= threshold
            if not probe.is_hint and not silent:
                continue  # not past the crossing after all (rounding): the round waits on
            detector.probe = None
            if probe.is_hint and probe.vetoed and not silent:
                detector.hints_vetoed += 1
                continue
            if not probe.is_hint or probe.vetoed:
                reason = SuspectReason.PHI if detector.last_arrival_ms is not None else SuspectReason.SILENT
            else:
                reason = probe.trigger
            outputs.append(self._suspect(detector, reason, now_ms))
        outputs.extend(self.judge.judge(now_ms, self.is_suspected))
        return outputs

    def next_check_ms(self, now_ms: float) -> float:
        """When `tick` should run next if no evidence arrives first.

        Arrivals only move deadlines later, so sleeping until this instant
        never misses a suspicion; strictly after `now_ms` so a caller's loop
        always advances.
        """
        next_ms = now_ms + self.settings.max_check_interval_ms
        attempts = self.settings.probe_attempts
        health_ms = self.local_health.next_change_ms()
        if health_ms is not None:
            next_ms = min(next_ms, health_ms)
        for detector in self._detectors.values():
            if detector.suspected is not None:
                continue
            quiet_ms = detector.quiet_deadline_ms()
            if quiet_ms is not None:
                next_ms = min(next_ms, quiet_ms)
            probe = detector.probe
            if probe is None:
                next_ms = min(next_ms, detector.probe_start_ms())
                continue
            due_ms = probe.attempt_due_ms(attempts)
            if due_ms is not None:
                next_ms = min(next_ms, due_ms)
            deadline_ms = detector.round_deadline_ms()
            assert deadline_ms is not None
            next_ms = min(next_ms, deadline_ms)
        return max(next_ms, now_ms + 0.001)

    def phi(self, node_id: str, now_ms: float) -> float:
        return self._detectors[node_id].phi(now_ms)

    def probing(self, node_id: str) -> ProbeRound | None:
        detector = self._detectors.get(node_id)
        return detector.probe if detector is not None else None

    def health(self, now_ms: float) -> list[NodeHealth]:
        return [detector.health(now_ms) for detector in self._detectors.values()]

    def hints_refuted(self) -> int:
        return sum(d.hints_refuted for d in self._detectors.values())

    def _start_round(self, detector: NodeDetector, reason: SuspectReason, now_ms: float,
                     vetoed: bool = False) -> list[Output]:
        round_id = self._next_round
        self._next_round += 1
        self.probes_started += 1
        probe = ProbeRound(round_id, reason, now_ms, detector.probe_timeout_ms(), attempts_sent=1, vetoed=vetoed)
        detector.probe = probe
        return [Probe(detector.node_id, round_id, 0, self._helpers(detector.node_id, round_id), now_ms)]

    def _helpers(self, node_id: str, round_id: int) -> tuple[str, ...]:
        candidates = [m for m in self._members if m != node_id]
        count = min(self.settings.probe_helpers, len(candidates))
        if not count:
            return ()
        first = round_id % len(candidates)
        return tuple(candidates[(first + index) % len(candidates)] for index in range(count))

    def _apply_health(self) -> None:
        multiplier = self.local_health.multiplier
        for detector in self._detectors.values():
            if detector.health_multiplier != multiplier:
                detector.health_multiplier = multiplier
                detector._reference_cache = None

    def _suspect(self, detector: NodeDetector, reason: SuspectReason, now_ms: float) -> Suspect:
        detector.suspected = reason
        detector.suspected_at_ms = now_ms
        detector.heartbeats_since_suspicion = 0
        detector.probe = None
        return Suspect(detector.node_id, detector.incarnation, reason, detector.phi(now_ms), now_ms)

    def _clear(self, detector: NodeDetector) -> None:
        detector.suspected = None
        detector.suspected_at_ms = None
        detector.heartbeats_since_suspicion = 0
