"""Simulated detection time and false-suspicion rate, per profile, as JSON.

Runs the real detector inside `chaos/simnet.py` (fake clock, seeded network),
so the figures are reproducible to the bit and say what the *arithmetic and
thresholds* give under the modelled network and load. They are not the
multi-process measurement: real sockets, event-loop lag and Raft commit come
with the peer wiring. Usage:

    python -m redge.chaos.bench_detection_sim --out results/bench_detection_sim.json

Measured per trial: a random node of a 5-node cluster crashes at a random
phase after warm-up; for each observer, the time from the fault to its first
suspicion, and the time until 2 (and 3) distinct observers suspect: what a
quorum of 2 (or 3, the majority of 4 that consensus/ asks in a 5-node
cluster) waits for before the Raft commit. Then long no-fault runs count suspicions
(all false by construction) per observer-hour and whether any node was ever
suspected by 2 observers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys
import time
from dataclasses import asdict

from redge.agent.detector_settings import ENTERPRISE, IOBT, DetectorSettings
from redge.agent.verdicts import Suspect
from redge.chaos.simnet import (
    ENTERPRISE_LINK,
    IOBT_LINK,
    CpuLoad,
    Crash,
    DetectionSimulation,
    LinkProfile,
    first_suspicions,
    kth_suspicion_ms,
    suspicion_intervals,
)

NODES = [f"n{i}" for i in range(5)]
# consensus/ confirms with a majority of the other live members, at least 2:
# 3 of the 4 observers in a 5-node cluster. Both are reported.
QUORUMS = (2, 3)

# The load model: exponential send lag, and Poisson stalls of the whole process.
ENTERPRISE_LOAD = CpuLoad(send_lag_ms_mean=0.5, stalls_per_s=0.2, stall_ms_min=5.0,
                          stall_ms_max=40.0)
IOBT_LOAD = CpuLoad(send_lag_ms_mean=2.0, stalls_per_s=0.2, stall_ms_min=10.0,
                    stall_ms_max=150.0)
# WiFi whose losses come in bursts (Gilbert-Elliott): ~2 % random loss plus
# bursts averaging 3 heartbeats, ~5 % loss in all. Harsher than independent loss.
IOBT_BURSTY_LINK = LinkProfile(delay_ms_min=2.5, delay_ms_max=25.0, loss_probability=0.02,
                               burst_enter_probability=0.01, burst_exit_probability=0.33)

SCENARIOS: dict[str, tuple[DetectorSettings, LinkProfile, CpuLoad]] = {
    "enterprise": (ENTERPRISE, ENTERPRISE_LINK, ENTERPRISE_LOAD),
    "iobt": (IOBT, IOBT_LINK, IOBT_LOAD),
}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    assert values
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": round(min(values), 2),
        "p50": round(percentile(values, 0.50), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values), 2),
    }


def crash_trials(name: str, host_up: bool, trials: int, seed_base: int,
                 warm_up_ms: float) -> dict:
    settings, link, load = SCENARIOS[name]
    per_observer: list[float] = []
    quorum: dict[int, list[float]] = {k: [] for k in QUORUMS}
    missed = 0
    reasons: dict[str, int] = {}
    for trial in range(trials):
        seed = seed_base + trial
        draw = random.Random(f"bench/{seed}")
        simulation = DetectionSimulation(NODES, settings, seed=seed, link=link, cpu_load=load)
        victim = draw.choice(NODES)
        fault_ms = warm_up_ms + draw.uniform(0.0, settings.heartbeat_interval_ms)
        simulation.run_until(fault_ms - 1.0)
        before = len(simulation.history)
        simulation.inject(Crash(victim, fault_ms, host_up=host_up))
        simulation.run_until(fault_ms + 5_000.0)
        after_fault = simulation.history[before:]
        first = first_suspicions(after_fault, victim, fault_ms)
        missed += len(NODES) - 1 - len(first)
        per_observer.extend(at_ms - fault_ms for at_ms in first.values())
        for k in QUORUMS:
            kth = kth_suspicion_ms(first, k)
            if kth is not None:
                quorum[k].append(kth - fault_ms)
        for observation in after_fault:
            if isinstance(observation.verdict, Suspect) and observation.verdict.node_id == victim:
                reason = str(observation.verdict.reason)
                reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "profile": name,
        "crash": "process (SIGKILL, host answers ICMP)" if host_up else "host (silent)",
        "trials": trials,
        "seeds": [seed_base, seed_base + trials - 1],
        "first_suspicion_per_observer_ms": summary(per_observer),
        "second_observer_suspicion_ms": summary(quorum[2]),
        "third_observer_suspicion_ms": summary(quorum[3]),
        "observers_that_never_suspected": missed,
        "suspicion_reasons": reasons,
    }


def no_fault_run(name: str, link: LinkProfile, load: CpuLoad, settings: DetectorSettings,
                 seeds: list[int], duration_ms: float) -> dict:
    false_suspicions = 0
    quorum_episodes = dict.fromkeys(QUORUMS, 0)
    max_concurrent = 0
    for seed in seeds:
        simulation = DetectionSimulation(NODES, settings, seed=seed, link=link, cpu_load=load)
        simulation.run_until(duration_ms)
        false_suspicions += sum(isinstance(o.verdict, Suspect) for o in simulation.history)
        for k in QUORUMS:
            episodes, peak = _quorum_episodes(simulation, duration_ms, k)
            quorum_episodes[k] += episodes
            max_concurrent = max(max_concurrent, peak)
    observer_hours = len(NODES) * len(seeds) * duration_ms / 3_600_000.0
    return {
        "scenario": name,
        "profile": settings.name,
        "link": asdict(link),
        "cpu_load": asdict(load),
        "seeds": seeds,
        "simulated_minutes_per_seed": duration_ms / 60_000.0,
        "observer_hours": round(observer_hours, 3),
        "false_suspicions": false_suspicions,
        "false_suspicions_per_observer_hour": round(false_suspicions / observer_hours, 3),
        "max_observers_suspecting_one_node_at_once": max_concurrent,
        "quorum_of_2_false_confirmations": quorum_episodes[2],
        "quorum_of_3_false_confirmations": quorum_episodes[3],
    }


def _quorum_episodes(simulation: DetectionSimulation, end_ms: float,
                     quorum: int) -> tuple[int, int]:
    """How often some node went from fewer than `quorum` observers suspecting it
    to `quorum` or more, and the peak count."""
    edges: dict[str, list[tuple[float, int]]] = {}
    for _, node_id, start_ms, stop_ms in suspicion_intervals(simulation.history, end_ms):
        edges.setdefault(node_id, []).extend([(start_ms, 1), (stop_ms, -1)])
    episodes = peak = 0
    for node_edges in edges.values():
        current = 0
        for _, delta in sorted(node_edges, key=lambda edge: (edge[0], edge[1])):
            if current < quorum <= current + delta:
                episodes += 1
            current += delta
            peak = max(peak, current)
    return episodes, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench_detection_sim.json")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--no-fault-seeds", type=int, default=3)
    parser.add_argument("--no-fault-minutes", type=float, default=10.0)
    arguments = parser.parse_args(argv)
    assert 1 <= arguments.trials <= 10_000 and 1 <= arguments.no_fault_seeds <= 100
    started = time.monotonic()

    crash = []
    for name in SCENARIOS:
        for host_up in (True, False):
            warm_up_ms = 100 * SCENARIOS[name][0].heartbeat_interval_ms
            crash.append(crash_trials(name, host_up, arguments.trials, arguments.seed, warm_up_ms))

    seeds = [arguments.seed + i for i in range(arguments.no_fault_seeds)]
    duration_ms = arguments.no_fault_minutes * 60_000.0
    no_fault = [
        no_fault_run("enterprise", ENTERPRISE_LINK, ENTERPRISE_LOAD, ENTERPRISE, seeds, duration_ms),
        no_fault_run("iobt", IOBT_LINK, IOBT_LOAD, IOBT, seeds, duration_ms),
        no_fault_run("iobt_bursty_loss", IOBT_BURSTY_LINK, IOBT_LOAD, IOBT, seeds, duration_ms),
    ]
    result = {
        "what": "simulated failure detection (chaos/simnet.py): fake clock, seeded network; "
                "no real sockets, event loop or Raft",
        "command": "python -m redge.chaos.bench_detection_sim " + " ".join(sys.argv[1:] if argv is None else argv),
        "nodes": len(NODES),
        "profiles": {name: asdict(settings) | {"nominal_suspicion_ms": round(settings.nominal_suspicion_ms, 2)}
                     for name, (settings, _, _) in SCENARIOS.items()},
        "crash": crash,
        "no_fault": no_fault,
        "wall_s": round(time.monotonic() - started, 1),
    }
    out = pathlib.Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"crash": crash, "no_fault": no_fault}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
