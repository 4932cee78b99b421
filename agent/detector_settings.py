"""The failure detector's settings for a kind of network, and the two measured ones
(`ENTERPRISE`, `IOBT`) that the built-in profiles (agent/profile.py) hold. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from redge.agent.phi import suspicion_elapsed_ms

# ---------------------------------------------------------------------------
# settings and profiles


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """Timings of one kind of network (DESIGN.md: profiles).

    The silence that triggers a suspicion on a regular link is about
    `mean + acceptable_heartbeat_pause_ms + k * max(std, min_std_deviation_ms)`
    where k (~5.2 for phi 8) comes from `threshold_deviations`.
    """

    name: str
    heartbeat_interval_ms: float
    phi_threshold: float
    window_size: int
    min_std_deviation_ms: float
    acceptable_heartbeat_pause_ms: float
    first_heartbeat_estimate_ms: float
    # A watched node never heard from is suspected only after this much more
    # silence: it may still be starting, or may not yet know it should send to us.
    first_heartbeat_grace_ms: float
    # Accepted heartbeats needed to clear a suspicion: one stray packet sent
    # before a crash must not undo an "unreachable" suspicion.
    recovery_heartbeat_count: int
    # A gap in the observer's own schedule above this is its own stall
    # (GC, CPU starvation, SIGSTOP): the shell reports it and the silence it
    # caused is not held against the watched nodes.
    self_pause_threshold_ms: float
    # Upper bound on the shell's sleep between detector checks.
    max_check_interval_ms: float
    # Stall memory (after Lifeguard's local health awareness, turned to the watched side): a
    # node whose heartbeats recently came late without loss (one sequence step, a long gap
    # between the sender's own send times where the heartbeat carries them) was stalled as
    # a sender, and a node that just stalled tends to stall again (loading a
    # model, CPU contention). For `stall_memory_ms` after such a gap, silence shorter than
    # `stall_allowance_factor` x that gap is not suspected: the acceptable pause grows to
    # cover it, up to `acceptable_heartbeat_pause_ms_max`. A node without recent stalls keeps
    # the base pause, and so the fast detection; a factor of 0 turns the memory off.
    stall_memory_ms: float = 0.0
    stall_allowance_factor: float = 0.0
    acceptable_heartbeat_pause_ms_max: float = 0.0
    # A node's first moments (of an incarnation, told by its sequence numbers) and the
    # observer's own are the most stall-prone: imports, Raft catch-up, the model host
    # starting beside it. While either is this young the pause is the cap, whatever was
    # remembered (`NodeDetector.in_startup`); 0 turns it off.
    startup_grace_ms: float = 0.0
    # This long before a node would be suspected, its silence is reported as `Quiet`: not a
    # suspicion, but a reason to start a Raft election early when that node is the leader.
    # An election is cheap and safe, a confirmation is neither; a hung leader's confirmation
    # needs a new leader first, so beginning the election before the suspicion takes the
    # election off the detection's critical path. 0 turns it off.
    quiet_lead_ms: float = 0.0
    # Probes (after SWIM): a hint (the kernel refused a heartbeat, the Raft connection to the
    # node dropped) or a silence that crossed the threshold is checked with authenticated
    # probes before it becomes a suspicion: `probe_attempts` direct pings spread over
    # `probe_timeout_ms`, and the first one also asks `probe_helpers` other members to ping
    # the node for us (ping-req). Any authenticated answer, direct or relayed, in time
    # refutes the hint; none makes the suspicion. A refusal can be forged by anyone who can
    # send an ICMP packet; an answer cannot be forged without the cluster secret.
    probe_timeout_ms: float = 10.0
    probe_attempts: int = 3
    probe_helpers: int = 2
    # Silence rescued by probes this many times within `degraded_window_ms` (heartbeats late
    # or lost, answers still coming) makes the node `Degraded`: slow, never failed.
    probe_rescues_degraded: int = 2
    degraded_window_ms: float = 10_000.0
    # Local health (Lifeguard): each time this observer's own loop runs `local_health_lag_ms`
    # or more late, its score rises by one (to `local_health_max`); it falls by one every
    # `local_health_decay_ms` without such lag. While it is above 0 the observer trusts its
    # own timing less: probe timeouts and the acceptable pause grow by (1 + score), the pause
    # up to its cap. A stalled observer waits longer before it accuses anyone.
    local_health_lag_ms: float = 20.0
    local_health_max: int = 4
    local_health_decay_ms: float = 1_000.0

    def __post_init__(self) -> None:
        if not self.heartbeat_interval_ms > 0:
            raise ValueError("heartbeat_interval_ms must be positive")
        if not self.phi_threshold > 0:
            raise ValueError("phi_threshold must be positive")
        if not 2 <= self.window_size <= 100_000:
            raise ValueError("window_size must be in [2, 100000]")
        if not self.min_std_deviation_ms > 0:
            raise ValueError("min_std_deviation_ms must be positive")
        if self.acceptable_heartbeat_pause_ms < 0:
            raise ValueError("acceptable_heartbeat_pause_ms must not be negative")
        if not self.first_heartbeat_estimate_ms > 0:
            raise ValueError("first_heartbeat_estimate_ms must be positive")
        if self.first_heartbeat_grace_ms < 0:
            raise ValueError("first_heartbeat_grace_ms must not be negative")
        if not 1 <= self.recovery_heartbeat_count <= 1000:
            raise ValueError("recovery_heartbeat_count must be in [1, 1000]")
        if not self.self_pause_threshold_ms > 0:
            raise ValueError("self_pause_threshold_ms must be positive")
        if not self.max_check_interval_ms > 0:
            raise ValueError("max_check_interval_ms must be positive")
        if not 0 <= self.stall_memory_ms <= 3_600_000:
            raise ValueError("stall_memory_ms must be in [0, 3600000]")
        if not 0 <= self.stall_allowance_factor <= 10:
            raise ValueError("stall_allowance_factor must be in [0, 10]")
        if not 0 <= self.startup_grace_ms <= 3_600_000:
            raise ValueError("startup_grace_ms must be in [0, 3600000]")
        if not 0 <= self.quiet_lead_ms < self.nominal_suspicion_ms:
            raise ValueError("quiet_lead_ms must be in [0, the nominal suspicion time)")
        if not 0 < self.probe_timeout_ms <= 10_000:
            raise ValueError("probe_timeout_ms must be in (0, 10000]")
        if not 1 <= self.probe_attempts <= 16 or not 0 <= self.probe_helpers <= 8:
            raise ValueError("probe_attempts must be 1..16 and probe_helpers 0..8")
        if not 1 <= self.probe_rescues_degraded <= 1000 or not self.degraded_window_ms > 0:
            raise ValueError("probe_rescues_degraded must be 1..1000 and degraded_window_ms positive")
        if not self.local_health_lag_ms > 0 or not 0 <= self.local_health_max <= 16 or not self.local_health_decay_ms > 0:
            raise ValueError("local health needs local_health_lag_ms > 0, local_health_max 0..16, local_health_decay_ms > 0")
        if (self.stall_allowance_factor > 0 or self.startup_grace_ms > 0) and not (
            self.acceptable_heartbeat_pause_ms_max >= self.acceptable_heartbeat_pause_ms
        ):
            raise ValueError("acceptable_heartbeat_pause_ms_max must be >= acceptable_heartbeat_pause_ms")

    def stall_pause_ms(self, gap_ms: float, interval_mean_ms: float) -> float:
        """The acceptable pause while a sender stall of `gap_ms` is remembered: enough that
        silence up to factor x gap stays unsuspected (mean + pause >= factor x gap), never
        below the base pause nor above the cap."""
        if self.stall_allowance_factor <= 0:
            return self.acceptable_heartbeat_pause_ms
        wanted_ms = self.stall_allowance_factor * gap_ms - interval_mean_ms
        return min(self.acceptable_heartbeat_pause_ms_max, max(self.acceptable_heartbeat_pause_ms, wanted_ms))

    @property
    def nominal_suspicion_ms(self) -> float:
        """Silence (since the last heartbeat) that is suspected on a steady, loss-free link."""
        return suspicion_elapsed_ms(
            self.phi_threshold,
            self.heartbeat_interval_ms + self.acceptable_heartbeat_pause_ms,
            self.min_std_deviation_ms,
        )


# Servers on switched Ethernet: sub-millisecond RTT, no loss. Suspects about
# 96 ms after the last heartbeat; a SIGKILL'd peer is usually caught sooner
# through ECONNREFUSED on the next heartbeat (<= one interval).
ENTERPRISE = DetectorSettings(
    name="enterprise",
    heartbeat_interval_ms=20.0,
    phi_threshold=8.0,
    window_size=200,
    min_std_deviation_ms=5.0,
    acceptable_heartbeat_pause_ms=50.0,
    first_heartbeat_estimate_ms=20.0,
    first_heartbeat_grace_ms=1_000.0,
    recovery_heartbeat_count=2,
    self_pause_threshold_ms=40.0,
    max_check_interval_ms=20.0,
    # Measured on the shared 2-core VM (docs/detection.md): peers stall as senders in bursts
    # of 60-90 ms gaps with single gaps past 100 ms while model hosts start, and up to
    # ~190 ms in their first seconds; with the base pause alone a 100 ms stall is confirmed
    # by both watchers. After a 70 ms stall, silence up to ~105 ms (+ 5.2 std) is tolerated
    # for 5 s; in a node's first 5 s, and never beyond, 150 ms of pause (suspicion after
    # ~196 ms of silence). A longer grace slowed the detection of a hang that came soon
    # after a rejoin (a new incarnation) to ~185 ms.
    stall_memory_ms=5_000.0,
    stall_allowance_factor=1.5,
    acceptable_heartbeat_pause_ms_max=150.0,
    startup_grace_ms=5_000.0,
    # A hastened election takes ~10-15 ms here (a turn, a vote, the new leader's first
    # commit): started this long before the suspicion, it is over when the suspicion comes.
    quiet_lead_ms=20.0,
    # An idle peer answers a probe on loopback or a LAN in well under a millisecond; a busy
    # one in a few. Three pings 3.3 ms apart, and two helpers asked at once.
    probe_timeout_ms=10.0,
    local_health_lag_ms=20.0,
)

# Boards on WiFi: 5-50 ms RTT, 1-5 % loss. Suspects after ~400 ms of silence:
# about seven heartbeats lost in a row, which at 5 % independent loss happens
# once in ~10^9 heartbeats, and it tolerates sender stalls up to ~250 ms.
IOBT = DetectorSettings(
    name="iobt",
    heartbeat_interval_ms=50.0,
    phi_threshold=8.0,
    window_size=200,
    min_std_deviation_ms=20.0,
    acceptable_heartbeat_pause_ms=250.0,
    first_heartbeat_estimate_ms=50.0,
    first_heartbeat_grace_ms=2_000.0,
    recovery_heartbeat_count=2,
    self_pause_threshold_ms=100.0,
    max_check_interval_ms=50.0,
    stall_memory_ms=5_000.0,
    stall_allowance_factor=1.5,
    acceptable_heartbeat_pause_ms_max=400.0,
    startup_grace_ms=5_000.0,
    quiet_lead_ms=100.0,  # a turn of 10 ms and votes over 20 +- 15 ms links
    # Three pings over 150 ms: three round trips of up to 50 ms on WiFi, a lost one or two.
    probe_timeout_ms=150.0,
    local_health_lag_ms=50.0,
)
