"""Seeded simulations of heartbeats through a lossy, partitionable network.

Each run is fully determined by its seed; every assertion message carries the
simulation (seed included) so a failure can be replayed exactly.
"""

import pytest

from redge.agent.detector_settings import ENTERPRISE, IOBT
from redge.agent.verdicts import Degraded, DegradedReason, Quiet, Recover, Restarted, Restored, Suspect, SuspectReason
from redge.chaos.simnet import (
    ENTERPRISE_LINK,
    IOBT_LINK,
    CpuLoad,
    Crash,
    CutLink,
    DetectionSimulation,
    ForgeRefusals,
    Heal,
    LinkProfile,
    MuteHeartbeats,
    Partition,
    Pause,
    Restart,
    SimNet,
    first_suspicions,
    kth_suspicion_ms,
    max_concurrent_suspicions,
    suspicion_intervals,
)

NODES = ["n0", "n1", "n2", "n3", "n4"]
WARM_UP_MS = 6_000.0  # past the profiles' start-up grace (5 s): the steady state
SEEDS = [0, 1, 2, 3, 4]


def suspicions(simulation: DetectionSimulation) -> list[tuple[str, str]]:
    return [(o.observer, o.verdict.node_id) for o in simulation.history
            if isinstance(o.verdict, Suspect)]


@pytest.mark.parametrize("seed", SEEDS)
def test_quiet_network_no_suspicion_and_replays_exactly(seed):
    runs = []
    for _ in range(2):
        simulation = DetectionSimulation(NODES, IOBT, seed=seed, link=IOBT_LINK)
        simulation.run_until(20_000.0)
        runs.append((simulation.history, simulation.net.stats, simulation.net.events_run))
    assert runs[0] == runs[1], f"not deterministic: {simulation}"
    assert runs[0][0] == [], f"{simulation}: {runs[0][0][:5]}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("settings", "link", "bound_ms"), [
    # silence: nominal suspicion after the last heartbeat, plus delay jitter
    (ENTERPRISE, ENTERPRISE_LINK, ENTERPRISE.nominal_suspicion_ms + 1.0),
    (IOBT, IOBT_LINK, 550.0),
], ids=["enterprise", "iobt"])
def test_host_crash_every_watcher_suspects_within_bound(seed, settings, link, bound_ms):
    simulation = DetectionSimulation(NODES, settings, seed=seed, link=link)
    simulation.run_until(WARM_UP_MS)
    fault_ms = WARM_UP_MS + 7.3
    simulation.inject(Crash("n2", fault_ms, host_up=False))
    simulation.run_until(fault_ms + 2_000.0)
    first = first_suspicions(simulation.history, "n2", 0.0)
    assert sorted(first) == ["n0", "n1", "n3", "n4"], simulation
    for observer, at_ms in first.items():
        assert 0.0 < at_ms - fault_ms <= bound_ms, f"{simulation}: {observer} at {at_ms - fault_ms} ms"
    reasons = {o.verdict.reason for o in simulation.history if isinstance(o.verdict, Suspect)}
    assert reasons == {SuspectReason.PHI}, simulation
    assert set(suspicions(simulation)) == {(o, "n2") for o in first}, simulation
    # Every watcher said "quiet" first, `quiet_lead_ms` before its suspicion (the shell's
    # cue for an early election when the quiet node leads Raft).
    quiet = {o.observer: o.at_ms for o in simulation.history if isinstance(o.verdict, Quiet) and o.at_ms >= fault_ms}
    assert sorted(quiet) == sorted(first), simulation
    for observer, at_ms in quiet.items():
        assert first[observer] - at_ms == pytest.approx(settings.quiet_lead_ms, abs=0.01), simulation


@pytest.mark.parametrize("seed", SEEDS)
def test_process_crash_is_suspected_one_probe_round_after_its_connections_drop(seed):
    """A dead process's host closes its Raft connections at once: every watcher probes it,
    nobody answers, and one probe timeout later every watcher suspects it."""
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed, link=ENTERPRISE_LINK)
    simulation.run_until(WARM_UP_MS)
    fault_ms = WARM_UP_MS + 3.1
    simulation.inject(Crash("n1", fault_ms, host_up=True))
    simulation.run_until(fault_ms + 500.0)
    first = first_suspicions(simulation.history, "n1", 0.0)
    assert len(first) == 4, simulation
    bound_ms = ENTERPRISE.probe_timeout_ms + 2 * ENTERPRISE_LINK.delay_ms_max
    assert max(first.values()) - fault_ms <= bound_ms, simulation
    assert kth_suspicion_ms(first, 2) - fault_ms <= bound_ms, simulation
    reasons = {o.verdict.reason for o in simulation.history if isinstance(o.verdict, Suspect)}
    assert reasons <= {SuspectReason.DISCONNECTED, SuspectReason.UNREACHABLE} and reasons, simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_hang_is_suspected_and_recovered_after_resume(seed):
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(Pause("n3", WARM_UP_MS, duration_ms=2_000.0))
    simulation.run_until(WARM_UP_MS + 1_000.0)
    first = first_suspicions(simulation.history, "n3", 0.0)
    assert len(first) == 4 and max(first.values()) - WARM_UP_MS <= 130.0, simulation
    simulation.run_until(WARM_UP_MS + 3_000.0)
    recovered = {o.observer for o in simulation.history
                 if isinstance(o.verdict, Recover) and o.verdict.node_id == "n3"}
    assert recovered == set(first), simulation
    # the hung node does not blame the others for its own silence
    assert all(observer != "n3" for observer, _ in suspicions(simulation)), simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("settings", [ENTERPRISE, IOBT], ids=lambda s: s.name)
def test_one_way_link_suspects_nobody_the_cut_observer_hears_through_helpers(seed, settings):
    """n1's packets no longer reach n0 (n0 -> n1 still works). n0's probes of n1 go
    unanswered directly, but the other members ping n1 for it and relay the answers: n1 is
    alive, so it is never suspected; n0 only finds it `Degraded` (late), and `Restored`
    once the link heals."""
    link = ENTERPRISE_LINK if settings is ENTERPRISE else IOBT_LINK
    simulation = DetectionSimulation(NODES, settings, seed=seed, link=link)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(CutLink("n1", "n0", WARM_UP_MS, until_ms=WARM_UP_MS + 3_000.0))
    simulation.run_until(WARM_UP_MS + 3_000.0 + settings.degraded_window_ms + 1_000.0)
    assert suspicions(simulation) == [], simulation
    judged = [(o.observer, o.verdict.node_id, type(o.verdict).__name__) for o in simulation.history
              if isinstance(o.verdict, Degraded | Restored)]
    assert judged == [("n0", "n1", "Degraded"), ("n0", "n1", "Restored")], simulation
    assert simulation.peers["n0"].monitor.probes_answered >= ENTERPRISE.probe_rescues_degraded, simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_partition_each_side_suspects_the_other_then_heals(seed):
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(Partition((("n0", "n1"), ("n2", "n3", "n4")), WARM_UP_MS))
    simulation.inject(Heal(WARM_UP_MS + 2_000.0))
    simulation.run_until(WARM_UP_MS + 4_000.0)
    minority, majority = {"n0", "n1"}, {"n2", "n3", "n4"}
    expected = {(a, b) for a in minority for b in majority} | {(b, a) for a in minority for b in majority}
    assert set(suspicions(simulation)) == expected, simulation
    still_open = [i for i in suspicion_intervals(simulation.history, simulation.now_ms())
                  if i[3] == simulation.now_ms()]
    assert still_open == [], f"{simulation}: not recovered after heal: {still_open}"


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_restart_is_announced_with_the_new_incarnation(seed):
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(Crash("n4", WARM_UP_MS))
    simulation.inject(Restart("n4", WARM_UP_MS + 500.0))
    simulation.run_until(WARM_UP_MS + 1_500.0)
    restarted = {o.observer for o in simulation.history if isinstance(o.verdict, Restarted)}
    recovered = {(o.observer, o.verdict.incarnation) for o in simulation.history
                 if isinstance(o.verdict, Recover)}
    assert restarted == {"n0", "n1", "n2", "n3"}, simulation
    assert recovered == {(o, 2) for o in restarted}, simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_large_cluster_crash_is_seen_by_exactly_its_watchers(seed):
    nodes = [f"n{i:02d}" for i in range(20)]
    simulation = DetectionSimulation(nodes, ENTERPRISE, seed=seed, fanout=4)
    simulation.run_until(2_000.0)
    victim = "n07"
    watchers = simulation.watchers_of(victim)
    assert len(watchers) == 4, simulation
    simulation.inject(Crash(victim, 2_000.0, host_up=False))
    simulation.run_until(2_500.0)
    assert sorted(first_suspicions(simulation.history, victim, 0.0)) == sorted(watchers), simulation
    assert {n for _, n in suspicions(simulation)} == {victim}, simulation


# Peers' clocks disagree: n07 is 300 ms ahead (it turns early), n12 250 ms behind.
CLOCK_OFFSETS_MS = {"n07": 300.0, "n12": -250.0}


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_rotating_watch_sets_suspect_nobody_and_still_catch_a_crash_right_after_a_turn(seed):
    """20 peers whose watch sets move every 2 s by clocks up to 300 ms apart: the watchers
    change, yet no live node is suspected (a node keeps sending to the watchers it dropped
    for a second, and a new watcher of a long-running node is no reason for slack nor for
    alarm), and a crash right after a turn is suspected by every watcher of that round,
    within the steady-state bound."""
    nodes = [f"n{i:02d}" for i in range(20)]
    simulation = DetectionSimulation(
        nodes, ENTERPRISE, seed=seed, fanout=4, rotation_ms=2_000.0, clock_offsets_ms=CLOCK_OFFSETS_MS
    )
    simulation.run_until(WARM_UP_MS + 4_400.0)  # three turns after the start-up, all peers past the last
    assert suspicions(simulation) == [], simulation
    victim = "n07"
    watchers = simulation.watchers_of(victim)
    assert len(watchers) == 4, simulation
    assert {p.round for p in simulation.peers.values()} == {5}, simulation
    fault_ms = simulation.now_ms()
    simulation.inject(Crash(victim, fault_ms, host_up=False))
    simulation.run_until(fault_ms + 500.0)
    first = first_suspicions(simulation.history, victim, fault_ms)
    assert sorted(first) == sorted(watchers), simulation
    assert max(first.values()) - fault_ms <= ENTERPRISE.nominal_suspicion_ms + 30.0, simulation
    assert {n for _, n in suspicions(simulation)} == {victim}, simulation


def test_without_the_linger_only_probes_keep_a_clock_ahead_unsuspected_at_the_turn():
    """Why dropped targets still get heartbeats: n07 turns 300 ms early and goes silent for
    its old watchers before they turn themselves. Without the linger only their probes,
    which n07 answers, keep them from suspecting it."""
    nodes = [f"n{i:02d}" for i in range(20)]
    simulation = DetectionSimulation(
        nodes, ENTERPRISE, seed=0, fanout=4, rotation_ms=2_000.0, clock_offsets_ms=CLOCK_OFFSETS_MS,
        rotation_linger_ms=0.0,
    )
    simulation.run_until(WARM_UP_MS + 4_400.0)
    assert suspicions(simulation) == [], simulation
    rescued = sum(peer.monitor.probes_answered for peer in simulation.peers.values())
    assert rescued > 0, simulation


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_stalled_observer_does_not_blame_others(seed):
    """A 300 ms stall of n0 (GC, CPU) makes others suspect n0, as they should,
    but n0 must not suspect anyone for silence it caused itself."""
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(Pause("n0", WARM_UP_MS, duration_ms=300.0))
    simulation.run_until(WARM_UP_MS + 2_000.0)
    assert all(observer != "n0" for observer, _ in suspicions(simulation)), simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_host_wide_stall_suspects_nobody(seed):
    """Every process on the machine stalls at once for 300 ms (CPU starvation,
    VM steal): nobody heard anybody, and nobody may blame anybody for it."""
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    for node in NODES:
        simulation.inject(Pause(node, WARM_UP_MS, duration_ms=300.0))
    simulation.run_until(WARM_UP_MS + 2_000.0)
    assert suspicions(simulation) == [], simulation
    assert all(p.monitor.self_pauses == 1 for p in simulation.peers.values()), simulation


def test_bursty_loss_on_one_link():
    net = SimNet(seed=9, link=LinkProfile(loss_probability=0.0, burst_enter_probability=0.5,
                                          burst_exit_probability=0.5))
    received = []

    class Sink:
        def on_datagram(self, source, payload):
            received.append(payload)

        def on_refused(self, destination):
            raise AssertionError("unexpected")

    net.attach("a", Sink())
    net.attach("b", Sink())
    for i in range(1_000):
        net.send("a", "b", i)
    net.run_for(10.0)
    assert 200 < len(received) < 800 and net.stats.lost == 1_000 - len(received)


@pytest.mark.parametrize("seed", [11])
def test_ten_minutes_of_iobt_weather_no_quorum_of_false_suspicions(seed):
    """10 simulated minutes, 5 % loss, 2.5-25 ms one-way delay, scheduling lag
    and stalls (CPU load), no fault: no node is ever suspected by two observers
    at once, i.e. no confirmation with a quorum of 2."""
    simulation = DetectionSimulation(
        NODES, IOBT, seed=seed, link=IOBT_LINK,
        cpu_load=CpuLoad(send_lag_ms_mean=2.0, stalls_per_s=0.2, stall_ms_min=10.0,
                         stall_ms_max=150.0),
    )
    duration_ms = 600_000.0
    simulation.run_until(duration_ms)
    false_suspicions = len(suspicions(simulation))
    observer_hours = len(NODES) * duration_ms / 3_600_000.0
    print(f"{simulation}: {false_suspicions} false suspicions, "
          f"{false_suspicions / observer_hours:.2f} per observer-hour, lost {simulation.net.stats.lost}")
    concurrent = max_concurrent_suspicions(simulation.history, duration_ms)
    assert max(concurrent.values(), default=0) < 2, f"{simulation}: {concurrent}"
    assert simulation.net.stats.lost > 0.04 * simulation.net.stats.sent, simulation


# ---------------------------------------------------------------------------
# evidence that cannot be forged


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("settings", [ENTERPRISE, IOBT], ids=lambda s: s.name)
def test_forged_refusals_never_make_a_suspicion(seed, settings):
    """An attacker sends every observer a forged "port unreachable" about every node it
    watches, 20 times a second for 10 s: each is a hint, the live node answers the probes,
    and nothing is suspected."""
    link = ENTERPRISE_LINK if settings is ENTERPRISE else IOBT_LINK
    simulation = DetectionSimulation(NODES, settings, seed=seed, link=link)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(ForgeRefusals(WARM_UP_MS, count=200, interval_ms=50.0))
    simulation.run_until(WARM_UP_MS + 11_000.0)
    assert suspicions(simulation) == [], simulation
    refuted = sum(d.hints_refuted for peer in simulation.peers.values() for d in peer.monitor._detectors.values())
    assert refuted >= len(NODES) * (len(NODES) - 1) * 50, simulation


@pytest.mark.parametrize("seed", SEEDS)
def test_forged_refusals_while_nodes_stall_confirm_nobody(seed):
    """The same attack while every node stalls now and then (CPU load: 2 stalls a second of
    5-40 ms each): a probe round that meets a stalled node goes unanswered, but a refusal
    while the observer's Raft connection to the node is up suspects nothing alone, so no
    node is ever suspected by two observers at once (what a confirmation would need)."""
    load = CpuLoad(send_lag_ms_mean=1.0, stalls_per_s=2.0, stall_ms_min=5.0, stall_ms_max=40.0)
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed, cpu_load=load)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(ForgeRefusals(WARM_UP_MS, count=400, interval_ms=25.0))
    simulation.run_until(WARM_UP_MS + 11_000.0)
    peaks = max_concurrent_suspicions(simulation.history, simulation.now_ms())
    assert max(peaks.values(), default=0) <= 1, f"{simulation}: {peaks}"
    vetoed = sum(d.hints_vetoed for peer in simulation.peers.values() for d in peer.monitor._detectors.values())
    refuted = sum(d.hints_refuted for peer in simulation.peers.values() for d in peer.monitor._detectors.values())
    assert refuted > 0 and vetoed > 0, simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_a_refusal_about_a_node_whose_connection_dropped_is_believed_once_unanswered(seed):
    """The other side of the veto: after a crash the connections are down, so the refusals
    that follow (true ones, from the dead node's host) suspect it."""
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(Crash("n4", WARM_UP_MS, host_up=True))
    simulation.run_until(WARM_UP_MS + 300.0)
    assert set(first_suspicions(simulation.history, "n4", 0.0)) == {"n0", "n1", "n2", "n3"}, simulation
    vetoed = sum(peer.monitor._detectors["n4"].hints_vetoed for name, peer in simulation.peers.items() if name != "n4")
    assert vetoed == 0, simulation


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_a_node_that_stops_sending_heartbeats_but_answers_probes_is_degraded_never_failed(seed):
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    simulation.inject(MuteHeartbeats("n2", WARM_UP_MS, duration_ms=3_000.0))
    simulation.run_until(WARM_UP_MS + 3_000.0 + ENTERPRISE.degraded_window_ms + 1_000.0)
    assert suspicions(simulation) == [], simulation
    degraded = {o.observer for o in simulation.history if isinstance(o.verdict, Degraded) and o.verdict.node_id == "n2"}
    restored = {o.observer for o in simulation.history if isinstance(o.verdict, Restored) and o.verdict.node_id == "n2"}
    assert degraded == restored == {"n0", "n1", "n3", "n4"}, simulation
    assert {o.verdict.reason for o in simulation.history if isinstance(o.verdict, Degraded)} == {DegradedReason.LATE}


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_a_stalled_observer_doubts_itself_for_a_while(seed):
    """After its own 100 ms stall an observer's local health score rises: its probe rounds
    last longer and its tolerated pause grows, then both decay back."""
    simulation = DetectionSimulation(NODES, ENTERPRISE, seed=seed)
    simulation.run_until(WARM_UP_MS)
    monitor = simulation.peers["n0"].monitor
    assert monitor.local_health.score == 0
    simulation.inject(Pause("n0", WARM_UP_MS, duration_ms=100.0))
    simulation.run_until(WARM_UP_MS + 150.0)
    assert monitor.local_health.score >= 1, simulation
    detector = monitor._detectors["n1"]
    assert detector.probe_timeout_ms() >= 2 * ENTERPRISE.probe_timeout_ms
    simulation.run_until(WARM_UP_MS + 150.0 + (ENTERPRISE.local_health_max + 1) * ENTERPRISE.local_health_decay_ms)
    assert monitor.local_health.score == 0 and detector.probe_timeout_ms() == ENTERPRISE.probe_timeout_ms
