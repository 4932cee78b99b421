"""The detector core: heartbeat rules, verdict changes, slowness, who watches whom."""

import ast
import dataclasses
import pathlib

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import redge.agent.detector as detector_module
from redge.agent.clock import FakeClock
from redge.agent.detector import HeartbeatOutcome, IntervalHistory, Monitor, NodeDetector
from redge.agent.detector_settings import ENTERPRISE as ENTERPRISE_PROFILE
from redge.agent.detector_settings import IOBT
from redge.agent.phi import phi
from redge.agent.slowness import SlownessJudge, SlownessSettings
from redge.agent.verdicts import (
    Degraded,
    DegradedReason,
    Hint,
    Probe,
    Quiet,
    Recover,
    Restarted,
    Restored,
    Suspect,
    SuspectReason,
)
from redge.agent.watching import monitoring_targets

# Past a node's start-up: these tests feed a few seconds of heartbeats and judge the steady
# state; the start-up grace has tests of its own.
ENTERPRISE = dataclasses.replace(ENTERPRISE_PROFILE, startup_grace_ms=0.0)
INTERVAL_MS = ENTERPRISE.heartbeat_interval_ms


def steady(monitor: Monitor, node_id: str, count: int, start_ms: float = 0.0,
           incarnation: int = 1, first_sequence: int = 1) -> float:
    """Feed `count` on-time heartbeats; returns the last arrival time."""
    at_ms = start_ms
    for i in range(count):
        at_ms = start_ms + i * INTERVAL_MS
        assert monitor.on_heartbeat(node_id, incarnation, first_sequence + i, at_ms) == []
    return at_ms


CORE = ("detector", "phi", "detector_settings", "verdicts", "slowness", "watching")


@pytest.mark.parametrize("name", CORE)
def test_core_imports_no_io(name):
    path = pathlib.Path(detector_module.__file__).with_name(f"{name}.py")
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "time", "random", "socket", "structlog", "threading"}


def test_fake_clock_moves_only_forward():
    clock = FakeClock(5.0)
    assert clock.advance(2.5) == 7.5
    assert clock.advance_to(10.0) == 10.0
    with pytest.raises(AssertionError):
        clock.advance_to(9.0)


def test_interval_history_is_bounded_and_exact():
    history = IntervalHistory(capacity=4)
    for value in [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]:
        history.add(value)
    assert len(history) == 4
    assert history.mean_ms == pytest.approx(45.0)
    assert history.std_deviation_ms == pytest.approx(11.1803, abs=1e-4)


def test_steady_heartbeats_never_suspected_and_silence_is():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 200)
    assert monitor.tick(last_ms + INTERVAL_MS) == []
    assert monitor.next_check_ms(last_ms + 1.0) == last_ms + 1.0 + ENTERPRISE.max_check_interval_ms
    quiet_ms = monitor.next_check_ms(last_ms + 60.0)
    assert quiet_ms - last_ms == pytest.approx(ENTERPRISE.nominal_suspicion_ms - ENTERPRISE.quiet_lead_ms, abs=0.1)
    assert monitor.tick(quiet_ms - 0.1) == []
    # The silence is probed from `Quiet` on (a round's worth before the suspicion is due).
    outputs = monitor.tick(quiet_ms)
    assert outputs == [Probe("b", outputs[0].round_id, 0, (), quiet_ms), Quiet("b", 1, quiet_ms - last_ms, quiet_ms)]
    deadline_ms = last_ms + ENTERPRISE.nominal_suspicion_ms
    assert verdicts(monitor.tick(deadline_ms - 0.1)) == []
    [(kind, suspected_ms)] = checks_until(monitor, deadline_ms - 0.1, deadline_ms + 10.0)
    assert kind == "Suspect" and suspected_ms == pytest.approx(deadline_ms, abs=0.1)
    assert monitor.phi("b", suspected_ms) >= ENTERPRISE.phi_threshold
    assert monitor.tick(deadline_ms + 1000.0) == []  # changes only, not repeats


def verdicts(outputs: list) -> list:
    """The verdicts among a monitor's outputs (without the probes it asks the shell to send)."""
    return [output for output in outputs if not isinstance(output, Probe)]


def checks_until(monitor: Monitor, from_ms: float, until_ms: float) -> list[tuple[str, float]]:
    """Run `tick` when `next_check_ms` says, as the shell does: (verdict kind, at) pairs.
    Probes go unanswered (the node is silent)."""
    seen = []
    at_ms = from_ms
    while at_ms < until_ms:
        seen += [(type(v).__name__, v.at_ms) for v in verdicts(monitor.tick(at_ms))]
        at_ms = monitor.next_check_ms(at_ms)
    return seen


def test_quiet_comes_once_per_silence_lead_ms_before_the_suspicion():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 200)
    seen = checks_until(monitor, last_ms, last_ms + 300.0)
    assert [kind for kind, _ in seen] == ["Quiet", "Suspect"]
    (_, quiet_ms), (_, suspect_ms) = seen
    assert suspect_ms - quiet_ms == pytest.approx(ENTERPRISE.quiet_lead_ms, abs=0.01)
    assert suspect_ms - last_ms == pytest.approx(ENTERPRISE.nominal_suspicion_ms, abs=0.1)


def test_a_heartbeat_after_quiet_ends_that_silence_and_the_next_one_is_reported_again():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 200)
    [(kind, quiet_ms)] = checks_until(monitor, last_ms, last_ms + ENTERPRISE.nominal_suspicion_ms - 1.0)
    assert kind == "Quiet"
    assert monitor.on_heartbeat("b", 1, 201, quiet_ms + 1.0) == []  # late, not suspected
    seen = checks_until(monitor, quiet_ms + 1.0, quiet_ms + 400.0)
    assert [kind for kind, _ in seen] == ["Quiet", "Suspect"]


def test_a_check_past_both_deadlines_probes_then_suspects_one_probe_timeout_later():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 200)
    late_ms = last_ms + ENTERPRISE.nominal_suspicion_ms + 50.0
    assert [type(v) for v in monitor.tick(late_ms)] == [Probe, Quiet]
    seen = checks_until(monitor, late_ms, late_ms + 100.0)
    assert [kind for kind, _ in seen] == ["Suspect"]
    assert seen[0][1] - late_ms == pytest.approx(ENTERPRISE.probe_timeout_ms, abs=0.01)


def test_no_quiet_for_a_node_never_heard_nor_with_the_lead_off():
    unheard = Monitor(ENTERPRISE)
    unheard.watch("b", 0, 0.0)
    late_ms = ENTERPRISE.first_heartbeat_grace_ms + 500.0
    assert [type(v) for v in unheard.tick(late_ms)] == [Probe]
    assert [kind for kind, _ in checks_until(unheard, late_ms, late_ms + 100.0)] == ["Suspect"]
    off = Monitor(dataclasses.replace(ENTERPRISE, quiet_lead_ms=0.0))
    off.watch("b", 1, 0.0)
    last_ms = steady(off, "b", 200)
    assert [kind for kind, _ in checks_until(off, last_ms, last_ms + 300.0)] == ["Suspect"]


@pytest.mark.parametrize("lead_ms", [-1.0, ENTERPRISE.nominal_suspicion_ms, 1e9])
def test_quiet_lead_must_come_before_the_suspicion(lead_ms):
    with pytest.raises(ValueError, match="quiet_lead_ms"):
        dataclasses.replace(ENTERPRISE, quiet_lead_ms=lead_ms)


def test_first_heartbeat_bootstraps_from_expected_interval():
    node = NodeDetector("b", 0, ENTERPRISE, now_ms=0.0)
    assert node.on_heartbeat(1, 1, 100.0) is HeartbeatOutcome.ACCEPTED
    assert node.history.mean_ms == pytest.approx(INTERVAL_MS)
    assert node.history.std_deviation_ms == pytest.approx(INTERVAL_MS / 4.0)


def test_never_heard_node_is_suspected_silent_after_grace():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 0, 0.0)
    assert monitor.tick(ENTERPRISE.first_heartbeat_grace_ms) == []
    seen = [v for v in verdicts(monitor.tick(ENTERPRISE.first_heartbeat_grace_ms + 200.0))]
    seen += verdicts(monitor.tick(ENTERPRISE.first_heartbeat_grace_ms + 200.0 + ENTERPRISE.probe_timeout_ms))
    assert [v.reason for v in seen] == [SuspectReason.SILENT]


def test_sequence_duplicates_ignored_and_gaps_counted_as_loss():
    node = NodeDetector("b", 1, ENTERPRISE, now_ms=0.0)
    assert node.on_heartbeat(1, 1, 0.0) is HeartbeatOutcome.ACCEPTED
    assert node.on_heartbeat(1, 2, 20.0) is HeartbeatOutcome.ACCEPTED
    assert node.on_heartbeat(1, 2, 21.0) is HeartbeatOutcome.DUPLICATE
    assert node.on_heartbeat(1, 5, 80.0) is HeartbeatOutcome.ACCEPTED
    assert node.on_heartbeat(1, 4, 81.0) is HeartbeatOutcome.DUPLICATE  # reordered
    assert (node.heartbeats_lost, node.heartbeats_duplicate) == (2, 2)
    assert node.last_arrival_ms == 80.0


def test_higher_incarnation_resets_history_lower_is_stale():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    steady(monitor, "b", 50)
    assert monitor.on_heartbeat("b", 2, 1, 2000.0) == [Restarted("b", 1, 2, 2000.0)]
    node_health = monitor.health(2000.0)[0]
    assert (node_health.incarnation, node_health.restarts) == (2, 1)
    assert monitor.on_heartbeat("b", 1, 99, 2001.0) == []
    assert monitor.health(2001.0)[0].heartbeats_stale == 1
    # sequence numbering starts over with the new incarnation
    assert monitor.on_heartbeat("b", 2, 2, 2020.0) == []


def suspect_by_hint(monitor: Monitor, node_id: str, hint: Hint, at_ms: float) -> list:
    """Give a hint, let its probe round go unanswered: the verdicts of its end."""
    [probe] = monitor.on_hint(node_id, hint, at_ms)
    assert isinstance(probe, Probe) and probe.attempt == 0
    return verdicts(monitor.tick(at_ms + ENTERPRISE.probe_timeout_ms))


def test_restart_after_suspicion_recovers_at_once():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 20)
    [suspect] = suspect_by_hint(monitor, "b", Hint.REFUSED, last_ms + 5.0)
    assert suspect.reason is SuspectReason.UNREACHABLE
    outputs = monitor.on_heartbeat("b", 2, 1, last_ms + 500.0)
    assert outputs == [Restarted("b", 1, 2, last_ms + 500.0), Recover("b", 2, last_ms + 500.0)]


@pytest.mark.parametrize(("hint", "reason"), [(Hint.REFUSED, SuspectReason.UNREACHABLE),
                                              (Hint.DISCONNECTED, SuspectReason.DISCONNECTED)])
def test_an_unanswered_hint_suspects_one_probe_timeout_later_and_recovery_needs_fresh_heartbeats(hint, reason):
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 20)
    [probe] = monitor.on_hint("b", hint, last_ms + 1.0)
    assert monitor.on_hint("b", hint, last_ms + 2.0) == []  # one round at a time
    assert verdicts(monitor.tick(last_ms + 1.0 + ENTERPRISE.probe_timeout_ms - 0.01)) == []
    [suspect] = verdicts(monitor.tick(last_ms + 1.0 + ENTERPRISE.probe_timeout_ms))
    assert (suspect.node_id, suspect.reason) == ("b", reason)
    # one straggler sent before the crash does not undo the suspicion
    assert monitor.on_heartbeat("b", 1, 21, last_ms + 13.0) == []
    assert monitor.on_heartbeat("b", 1, 22, last_ms + 30.0) == [Recover("b", 1, last_ms + 30.0)]
    assert monitor.on_hint("nobody", hint, 0.0) == []


def test_suspected_gap_is_not_learned():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 100)
    assert any(kind == "Suspect" for kind, _ in checks_until(monitor, last_ms, last_ms + 5000.0))
    monitor.on_heartbeat("b", 1, 101, last_ms + 5000.0)
    monitor.on_heartbeat("b", 1, 102, last_ms + 5020.0)
    assert monitor.health(last_ms + 5020.0)[0].interval_mean_ms == pytest.approx(INTERVAL_MS)


def test_self_pause_is_not_held_against_watched_nodes():
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 100)
    resumed_ms = last_ms + 300.0  # the observer itself stalled for ~300 ms
    monitor.on_self_pause(290.0, resumed_ms)
    assert monitor.tick(resumed_ms) == []
    # the pause excuses its own length, not more: silence afterwards is judged
    assert monitor.tick(resumed_ms + 200.0)


@pytest.mark.parametrize(
    ("late_gap_ms", "suspected"),
    [
        (INTERVAL_MS, False),  # on time: phi stays near zero
        (60.0, False),  # late, still answered below the threshold
        (90.0, False),
        (5000.0, True),  # a real silence: suspected, so not "close to a false suspicion"
    ],
)
def test_phi_at_arrival_max_is_the_highest_phi_answered_without_suspicion(late_gap_ms, suspected):
    monitor = Monitor(ENTERPRISE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 100)
    expected = monitor.phi("b", last_ms + INTERVAL_MS)  # the steady gaps before the late one
    arrival_ms = last_ms + late_gap_ms
    if not suspected:
        expected = max(expected, monitor.phi("b", arrival_ms))
    assert any(kind == "Suspect" for kind, _ in checks_until(monitor, last_ms, arrival_ms)) is suspected
    monitor.on_heartbeat("b", 1, 101, arrival_ms)
    assert monitor.phi_at_arrival_max == pytest.approx(expected, abs=0.05)
    assert monitor.phi_at_arrival_max < ENTERPRISE.phi_threshold


def test_unknown_sender_is_counted_not_watched():
    monitor = Monitor(ENTERPRISE)
    assert monitor.on_heartbeat("stranger", 1, 1, 0.0) == []
    assert monitor.heartbeats_unknown_sender == 1 and monitor.watched() == []


def test_set_watched_adds_and_removes():
    monitor = Monitor(ENTERPRISE)
    monitor.set_watched([("a", 0), ("b", 0)], 0.0)
    monitor.set_watched([("b", 0), ("c", 3)], 10.0)
    assert sorted(monitor.watched()) == ["b", "c"]
    assert monitor.health(10.0)[1].incarnation == 3


def test_watch_set_is_bounded():
    monitor = Monitor(ENTERPRISE, max_watched=2)
    monitor.watch("a", 0, 0.0)
    monitor.watch("b", 0, 0.0)
    with pytest.raises(AssertionError):
        monitor.watch("c", 0, 0.0)


# -- properties


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    intervals=st.lists(st.floats(0.0, 500.0), min_size=0, max_size=60),
    first_ms=st.floats(0.0, 5000.0),
    second_ms=st.floats(0.0, 5000.0),
    profile=st.sampled_from([ENTERPRISE, IOBT]),
)
def test_phi_is_monotone_in_silence(intervals, first_ms, second_ms, profile):
    node = NodeDetector("b", 1, profile, now_ms=0.0)
    at_ms = 0.0
    for sequence, interval in enumerate(intervals, start=1):
        at_ms += interval
        node.on_heartbeat(1, sequence, at_ms)
    earlier, later = sorted((first_ms, second_ms))
    assert node.phi(at_ms + earlier) <= node.phi(at_ms + later)


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    elapsed=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2),
    mean_ms=st.floats(0.0, 1e4),
    std_ms=st.floats(1e-3, 1e4),
)
def test_phi_function_is_monotone_and_finite(elapsed, mean_ms, std_ms):
    earlier, later = sorted(elapsed)
    low, high = phi(earlier, mean_ms, std_ms), phi(later, mean_ms, std_ms)
    assert 0.0 <= low <= high < float("inf")


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    profile=st.sampled_from([ENTERPRISE, IOBT]),
    jitters=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=300),
    check_fraction=st.floats(0.0, 1.0),
)
def test_no_suspicion_while_heartbeats_arrive_with_jitter_below_the_floor(
    profile, jitters, check_fraction
):
    """Inter-arrival within interval +/- min_std_deviation_ms never gets a node suspected,
    checked at any instant up to the next arrival."""
    monitor = Monitor(profile)
    monitor.watch("b", 1, 0.0)
    at_ms = 0.0
    monitor.on_heartbeat("b", 1, 1, at_ms)
    for sequence, jitter in enumerate(jitters, start=2):
        gap_ms = profile.heartbeat_interval_ms + jitter * profile.min_std_deviation_ms
        assert monitor.tick(at_ms + check_fraction * gap_ms) == []
        assert monitor.tick(at_ms + gap_ms) == []
        at_ms += gap_ms
        assert monitor.on_heartbeat("b", 1, sequence, at_ms) == []


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=40),
    profile=st.sampled_from([ENTERPRISE, IOBT]),
)
def test_next_check_never_misses_a_suspicion(gaps, profile):
    """Sleeping until next_check_ms suspects no later than polling would."""
    monitor = Monitor(profile)
    monitor.watch("b", 1, 0.0)
    at_ms = 0.0
    for sequence, gap in enumerate(gaps, start=1):
        at_ms += gap
        monitor.on_heartbeat("b", 1, sequence, at_ms)
    check_ms = monitor.next_check_ms(at_ms)
    assert check_ms > at_ms
    if not monitor.is_suspected("b"):
        before = monitor.phi("b", check_ms - 0.01)
        after_tick = monitor.tick(check_ms)
        if before >= profile.phi_threshold + 1e-6:
            pytest.fail(f"phi {before} crossed the threshold before the scheduled check")
        assert after_tick == [] or isinstance(after_tick[0], Suspect)


# -- slowness

SLOWNESS = SlownessSettings(window_ms=1000.0, latency_factor=2.0, restore_factor=1.5,
                            min_samples=3, timeout_count_min=2)


def test_slow_node_is_degraded_then_restored():
    judge = SlownessJudge(SLOWNESS)
    for i in range(5):
        judge.on_latency("b", 250.0, 100.0, i * 10.0)
    verdicts = judge.judge(50.0, lambda node: False)
    assert verdicts == [Degraded("b", DegradedReason.SLOW, 2.5, 50.0)]
    assert judge.judge(60.0, lambda node: False) == []
    for i in range(5):  # the slow samples leave the window, fast ones replace them
        judge.on_latency("b", 120.0, 100.0, 1100.0 + i)
    assert judge.judge(1105.0, lambda node: False) == [Restored("b", 1105.0)]


def test_latency_between_restore_and_degrade_factors_keeps_the_state():
    judge = SlownessJudge(SLOWNESS)
    for i in range(5):
        judge.on_latency("b", 300.0, 100.0, float(i))
    assert judge.judge(5.0, lambda node: False)
    for i in range(5):
        judge.on_latency("b", 180.0, 100.0, 2000.0 + i)
    assert judge.judge(2005.0, lambda node: False) == []


def test_timeouts_while_heartbeats_arrive_degrade_but_a_crash_is_not_slowness():
    judge = SlownessJudge(SLOWNESS)
    judge.on_timeout("b", 0.0)
    judge.on_timeout("b", 10.0)
    judge.on_timeout("c", 0.0)
    judge.on_timeout("c", 10.0)
    verdicts = judge.judge(20.0, lambda node: node == "c")
    assert verdicts == [Degraded("b", DegradedReason.TIMEOUTS, 2.0, 20.0)]


def test_monitor_reports_degraded_separately_from_suspected():
    monitor = Monitor(ENTERPRISE, SLOWNESS)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 10)
    for _ in range(3):
        monitor.judge.on_latency("b", 500.0, 100.0, last_ms)
    assert [type(v) for v in monitor.tick(last_ms + 1.0)] == [Degraded]


def test_judge_is_bounded_in_nodes():
    judge = SlownessJudge(SlownessSettings(max_nodes=1))
    judge.on_timeout("a", 0.0)
    judge.on_timeout("b", 0.0)
    assert judge.dropped_nodes == 1


# -- who watches whom


def members(count: int) -> list[str]:
    return [f"n{i:02d}" for i in range(count)]


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_small_clusters_watch_everyone(count):
    nodes = members(count)
    for node in nodes:
        assert sorted(monitoring_targets(node, nodes)) == sorted(set(nodes) - {node})


@pytest.mark.parametrize(("count", "fanout", "round_number"), [(9, 4, 0), (20, 4, 3), (50, 6, 7), (101, 3, 1)])
def test_large_clusters_watch_symmetrically_with_fanout_watchers(count, fanout, round_number):
    nodes = members(count)
    targets = {n: monitoring_targets(n, nodes, seed=42, round_number=round_number, fanout=fanout)
               for n in nodes}
    expected = fanout + fanout % 2
    for node, chosen in targets.items():
        assert len(set(chosen)) == len(chosen) == expected and node not in chosen
        for target in chosen:
            assert node in targets[target], "watching must be mutual"


def test_rotation_changes_who_watches_whom_deterministically():
    nodes = members(30)
    first = monitoring_targets("n05", nodes, seed=1, round_number=0)
    assert first == monitoring_targets("n05", list(reversed(nodes)), seed=1, round_number=0)
    rounds = {tuple(sorted(monitoring_targets("n05", nodes, seed=1, round_number=r)))
              for r in range(10)}
    assert len(rounds) > 5


# ---------------------------------------------------------------------- stall memory

NO_STALL_MEMORY = dataclasses.replace(ENTERPRISE, stall_allowance_factor=0.0)


def after_gap(settings, gap_ms: float, sequence_step: int, since_gap_ms: float) -> tuple[Monitor, float]:
    """A steady node, one late heartbeat `gap_ms` after the previous one (`sequence_step`
    sequence numbers on), then steady again for `since_gap_ms`; returns (monitor, last arrival)."""
    monitor = Monitor(settings)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", 100)
    late_ms = last_ms + gap_ms
    monitor.on_heartbeat("b", 1, 100 + sequence_step, late_ms)
    count = int(since_gap_ms // INTERVAL_MS)
    last_ms = steady(monitor, "b", count, start_ms=late_ms + INTERVAL_MS, first_sequence=101 + sequence_step)
    return monitor, last_ms if count else late_ms


@pytest.mark.parametrize(
    ("gap_ms", "sequence_step", "since_gap_ms", "silence_ms", "suspected"),
    [
        (20.0, 1, 1000.0, 100.0, True),  # no stall: the base pause, ~96 ms
        (70.0, 1, 1000.0, 100.0, False),  # a 70 ms sender stall: silence up to ~1.5 x 70 + 5.2 std is tolerated
        (70.0, 1, 1000.0, 140.0, True),  # ...but not much longer
        (70.0, 3, 1000.0, 100.0, True),  # the same gap from two lost packets is the link, not a stall
        (70.0, 1, 6_000.0, 100.0, True),  # remembered for 5 s only
    ],
)
def test_a_recent_sender_stall_widens_the_tolerated_silence(gap_ms, sequence_step, since_gap_ms, silence_ms,
                                                            suspected):
    monitor, last_ms = after_gap(ENTERPRISE, gap_ms, sequence_step, since_gap_ms)
    assert (monitor.phi("b", last_ms + silence_ms) >= ENTERPRISE.phi_threshold) is suspected
    assert any(kind == "Suspect" for kind, _ in checks_until(monitor, last_ms, last_ms + silence_ms)) is suspected


@pytest.mark.parametrize(
    ("gaps_ms", "pause_ms"),
    [
        ([20.0] * 10, 50.0),
        ([20.0, 70.0, 20.0], 85.0),  # 1.5 x 70 - mean (~20)
        ([20.0, 60.0, 20.0, 50.0], 69.0),  # the longest remembered stall counts
        ([20.0, 400.0, 20.0], 150.0),  # capped
    ],
)
def test_the_acceptable_pause_follows_the_longest_remembered_stall(gaps_ms, pause_ms):
    node = NodeDetector("b", 1, ENTERPRISE, 0.0)
    at_ms = 0.0
    node.on_heartbeat(1, 1, at_ms)
    for sequence, gap_ms in enumerate([INTERVAL_MS] * 50 + gaps_ms, start=2):
        at_ms += gap_ms
        node.on_heartbeat(1, sequence, at_ms)
    assert node.acceptable_pause_ms() == pytest.approx(pause_ms, abs=pause_ms * 0.1)


@pytest.mark.parametrize(
    ("arrival_gap_ms", "sent_gap_ms", "pause_ms"),
    [
        (70.0, 70.0, 85.0),  # the sender itself sent 70 ms late: a stall
        (70.0, 20.0, 50.0),  # sent on time, arrived late (the network, or this observer): not the sender's
        (20.0, 70.0, 85.0),  # a late send that the network made up for is still a stall
    ],
)
def test_the_stall_memory_reads_the_senders_own_send_times(arrival_gap_ms, sent_gap_ms, pause_ms):
    node = NodeDetector("b", 1, ENTERPRISE, 0.0)
    at_ms = sent_ms = 0.0
    for sequence in range(1, 52):
        node.on_heartbeat(1, sequence, at_ms, sent_ms=sent_ms + 7.0)  # the sender's clock has its own origin
        at_ms += INTERVAL_MS
        sent_ms += INTERVAL_MS
    node.on_heartbeat(1, 52, at_ms - INTERVAL_MS + arrival_gap_ms, sent_ms=sent_ms - INTERVAL_MS + sent_gap_ms + 7.0)
    assert node.acceptable_pause_ms() == pytest.approx(pause_ms, abs=pause_ms * 0.1)


def test_without_stall_memory_the_base_pause_applies():
    monitor, last_ms = after_gap(NO_STALL_MEMORY, 70.0, 1, 1000.0)
    assert monitor.tick(last_ms + 100.0)


@hypothesis_settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.floats(min_value=5.0, max_value=300.0), min_size=1, max_size=60),
       probe_ms=st.floats(min_value=0.0, max_value=400.0))
def test_stall_memory_never_suspects_sooner(gaps, probe_ms):
    with_memory, without = Monitor(ENTERPRISE), Monitor(NO_STALL_MEMORY)
    at_ms = 0.0
    for monitor in (with_memory, without):
        monitor.watch("b", 1, 0.0)
    for sequence, gap_ms in enumerate(gaps, start=1):
        at_ms += gap_ms
        for monitor in (with_memory, without):
            monitor.on_heartbeat("b", 1, sequence, at_ms)
    assert with_memory.phi("b", at_ms + probe_ms) <= without.phi("b", at_ms + probe_ms) + 1e-9
    assert with_memory.next_check_ms(at_ms) >= without.next_check_ms(at_ms) - 1e-9 or (
        with_memory.next_check_ms(at_ms) == at_ms + ENTERPRISE.max_check_interval_ms
    )


@pytest.mark.parametrize(
    ("factor", "gap_ms", "mean_ms", "pause_ms"),
    [
        (0.0, 500.0, 20.0, 50.0),
        (1.5, 40.0, 20.0, 50.0),  # 1.5 x 40 - 20 = 40 < base
        (1.5, 70.0, 20.0, 85.0),
        (1.5, 400.0, 20.0, 150.0),  # capped
    ],
)
def test_stall_pause_arithmetic(factor, gap_ms, mean_ms, pause_ms):
    settings = dataclasses.replace(ENTERPRISE, stall_allowance_factor=factor)
    assert settings.stall_pause_ms(gap_ms, mean_ms) == pytest.approx(pause_ms)


@pytest.mark.parametrize(
    ("since_first_ms", "silence_ms", "suspected"),
    [
        (2_000.0, 150.0, False),  # a node's first seconds: up to ~196 ms of silence is its start-up
        (2_000.0, 200.0, True),
        (6_000.0, 100.0, True),  # after 5 s the base pause again
    ],
)
def test_a_node_starting_up_gets_the_widest_pause(since_first_ms, silence_ms, suspected):
    monitor = Monitor(ENTERPRISE_PROFILE)
    monitor.watch("b", 1, 0.0)
    last_ms = steady(monitor, "b", int(since_first_ms // INTERVAL_MS) + 1)
    assert (monitor.phi("b", last_ms + silence_ms) >= ENTERPRISE_PROFILE.phi_threshold) is suspected


@pytest.mark.parametrize(
    ("observer_age_ms", "incarnation", "first_sequence", "silence_ms", "suspected"),
    [
        # An observer up for a minute starts watching a node running for 10 minutes (a
        # rotated watch set): neither is starting, the base pause holds.
        (60_000.0, 1, 30_001, 100.0, True),
        # The same node as a new incarnation, sequences from 1 again: it is starting.
        (60_000.0, 2, 1, 150.0, False),
        (60_000.0, 2, 1, 200.0, True),
        # A node running for 10 minutes, watched by an observer that itself just started.
        (0.0, 1, 30_001, 150.0, False),
        (0.0, 1, 30_001, 200.0, True),
    ],
)
def test_startup_is_the_senders_or_the_observers_age_not_how_long_this_watch_is(
    observer_age_ms, incarnation, first_sequence, silence_ms, suspected
):
    monitor = Monitor(ENTERPRISE_PROFILE)
    monitor.watch("a", 1, 0.0)  # the observer starts
    monitor.watch("b", incarnation, observer_age_ms)
    last_ms = steady(monitor, "b", 50, start_ms=observer_age_ms, incarnation=incarnation,
                     first_sequence=first_sequence)
    assert (monitor.phi("b", last_ms + silence_ms) >= ENTERPRISE_PROFILE.phi_threshold) is suspected


# (live members, members that have not left) -> watchers of each node, by the one rule
WATCH_TABLE = [
    (3, 3, 2), (8, 8, 7), (9, 9, 4), (20, 20, 4),
    (8, 9, 4),   # one of nine failed: still a bounded watch, over the eight alive
    (5, 9, 4),   # four failed: the ring of five watches everyone
    (4, 9, 3),
    (8, 12, 4),
]


@pytest.mark.parametrize(("live", "members", "watchers"), WATCH_TABLE)
def test_the_detector_watches_as_many_as_the_state_machine_counts_on(live, members, watchers):
    """One watcher rule (consensus/watch.py) for the detector (who watches whom) and the state
    machine (how many observers confirm): each live node is watched by exactly the number of
    live nodes the confirmation is a majority of."""
    from redge.consensus import commands as c
    from redge.consensus.state import ClusterState

    nodes = [f"n{i:02d}" for i in range(members)]
    alive = nodes[:live]
    by_node = {node: set(monitoring_targets(node, alive, seed=3, cluster_size=members)) for node in alive}
    state = ClusterState()
    for index, node in enumerate(nodes):
        state.apply(c.Join(node, f"h:{index}", f"r:{index}", f"b:{index}", 1, 1))
    for node in nodes[live:]:
        state.members[node].status = "failed"
    for target in alive:
        watched_by = {node for node, targets in by_node.items() if target in targets}
        assert len(watched_by) == watchers == min(live - 1, watchers), (target, watched_by)
        assert state.observers_needed(target) == max(watchers // 2 + 1, min(2, members - 1))
