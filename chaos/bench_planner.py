"""Benchmark of the placement planner: decision time, optimality gap, and the
accuracy a cluster gives up when nodes fail.

Decision time is one of the paper's metrics (the time from a confirmed
failure to a committed plan); the planner's share of it must stay small even
at 100 nodes and 500 apps. The optimality gap is measured against the exact
MILP solver with the one shared objective. Run:

    python -m redge.chaos.bench_planner --out results/bench_planner.json

Figures are distributions over repeated runs on a shared, noisy machine, so
p50 and p99 are reported side by side, with the machine's load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import pathlib
import platform
import random
import statistics
import sys
import time

import orjson

from redge.placement.capacity import violations
from redge.placement.objective import objective, served_accuracy
from redge.placement.planner import plan_for
from redge.placement.problem import DEFAULT_SETTINGS, Health, Problem, Settings
from redge.placement.solver import solve
from redge.placement.testbed import random_problem, testbed_problem

SIZES = ((5, 27), (10, 50), (25, 125), (50, 250), (100, 500))
UNBOUNDED = Settings(loads_per_plan_max=None, prefetches_per_plan_max=None)
SETTLE_PLANS_MAX = 64
WARMUP_CALLS = 3


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else float("nan"),
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


def cluster(
    node_count: int, app_count: int, seed: int, settings: Settings = DEFAULT_SETTINGS
) -> Problem:
    if (node_count, app_count) == (5, 27):
        return testbed_problem(settings)
    return random_problem(
        random.Random(seed), node_count, app_count, memory_pressure=0.8, settings=settings
    )


def settle(problem: Problem) -> tuple[Problem, int]:
    """Plan until a plan is complete (the load bound spreads work over
    several epochs); returns the problem with that plan carried out."""
    for plans in range(1, SETTLE_PLANS_MAX + 1):
        result = plan_for(problem)
        assert not violations(problem, result.plan)
        problem = problem.advanced(result.plan)
        if result.complete:
            return problem, plans
    raise AssertionError("did not settle")


def timed(problem: Problem, repeats: int) -> dict[str, dict[str, float]]:
    """Wall-clock and CPU time of `plan_for`. On a shared machine the wall
    clock includes waiting for a core; the process's CPU time does not."""
    wall_ms = []
    cpu_ms = []
    for _ in range(WARMUP_CALLS):  # a leader's process is warm: caches, allocator, GC generations
        plan_for(problem)
    for _ in range(repeats):
        start_wall = time.perf_counter()
        start_cpu = time.process_time()
        plan_for(problem)
        cpu_ms.append((time.process_time() - start_cpu) * 1000.0)
        wall_ms.append((time.perf_counter() - start_wall) * 1000.0)
    return {"wall_ms": summary(wall_ms), "cpu_ms": summary(cpu_ms)}


def with_failed(problem: Problem, node_ids: tuple[str, ...]) -> Problem:
    nodes = tuple(
        dataclasses.replace(n, health=Health.FAILED) if n.node_id in node_ids else n
        for n in problem.nodes
    )
    return dataclasses.replace(problem, nodes=nodes, restore_allowed=False)


def bench_time(repeats: int) -> list[dict]:
    rows = []
    for node_count, app_count in SIZES:
        initial = cluster(node_count, app_count, seed=1, settings=UNBOUNDED)
        bounded = dataclasses.replace(initial, settings=Settings())
        settled, _ = settle(bounded)
        busiest = max(
            settled.nodes,
            key=lambda n: (
                sum(r.node_id == n.node_id for r in settled.current.replicas),
                n.node_id,
            ),
        )
        failed = with_failed(settled, (busiest.node_id,))
        first = plan_for(failed)
        rows.append(
            {
                "nodes": node_count,
                "apps": app_count,
                "initial_unbounded": timed(initial, repeats),
                "initial_bounded": timed(bounded, repeats),
                "at_rest": timed(settled, repeats),
                "one_node_failed": timed(failed, repeats),
                "one_node_failed_actions": len(first.actions),
            }
        )
        print(
            f"time {node_count}x{app_count}: "
            f"{rows[-1]['one_node_failed']['wall_ms']['p50']:.1f} ms p50 after one failure",
            file=sys.stderr,
        )
    return rows


def small_instance(seed: int) -> Problem:
    rng = random.Random(seed)
    return random_problem(
        rng,
        rng.randint(2, 4),
        rng.randint(3, 7),
        memory_pressure=0.6 + rng.random(),
        settings=UNBOUNDED,
        variants_max=3,
    )


def bench_gap(instances: int) -> dict:
    normalised = []
    relative = []
    solver_ms = []
    planner_ms = []
    optimal = 0
    for seed in range(instances):
        problem = small_instance(seed)
        start = time.perf_counter()
        heuristic = objective(problem, plan_for(problem).plan)
        planner_ms.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        exact = solve(problem, time_limit_s=60.0)
        solver_ms.append((time.perf_counter() - start) * 1000.0)
        optimal += exact.optimal
        best = sum(
            problem.settings.weight(a.priority) * a.variants[0].accuracy for a in problem.apps
        )
        normalised.append((exact.objective - heuristic) / best)
        if exact.objective > 0:
            relative.append((exact.objective - heuristic) / exact.objective)
    return {
        "instances": instances,
        "generator": "testbed.random_problem, 2-4 nodes, 3-7 apps, 2-3 variants, memory pressure 0.6-1.6",
        "solved_to_optimality": optimal,
        "gap_normalised": summary(normalised),
        "gap_relative_to_exact": summary(relative),
        "instances_with_zero_gap": sum(g <= 1e-9 for g in normalised),
        "solver_ms": summary(solver_ms),
        "planner_ms": summary(planner_ms),
    }


def bench_failures(pairs_max: int) -> list[dict]:
    rows = []
    for node_count, app_count in ((5, 27), (25, 125), (100, 500)):
        settled, _ = settle(cluster(node_count, app_count, seed=2))
        before = served_accuracy(settled, settled.current)
        unserved_before = sum(settled.current.primary_of(a.name) is None for a in settled.apps)
        node_ids = [n.node_id for n in settled.nodes]
        rng = random.Random(3)
        singles = [(n,) for n in node_ids]
        doubles = list(itertools.combinations(node_ids, 2))
        if len(doubles) > pairs_max:
            doubles = rng.sample(doubles, pairs_max)
        for label, cases in (("single", singles), ("double", doubles)):
            first_loss = []
            settled_loss = []
            plans_needed = []
            shed = []
            critical_unserved = []
            for lost in cases:
                hurt = with_failed(settled, lost)
                first = plan_for(hurt)
                first_loss.append(1.0 - served_accuracy(hurt, first.plan) / before)
                recovered, plans = settle(hurt)
                plans_needed.append(plans)
                settled_loss.append(1.0 - served_accuracy(recovered, recovered.current) / before)
                unserved = [
                    a for a in recovered.apps if recovered.current.primary_of(a.name) is None
                ]
                shed.append(len(unserved))
                critical_unserved.append(sum(a.priority.label == "critical" for a in unserved))
            rows.append(
                {
                    "nodes": node_count,
                    "apps": app_count,
                    "failure": label,
                    "cases": len(cases),
                    "apps_unserved_before": unserved_before,
                    "accuracy_lost_after_first_plan": summary(first_loss),
                    "accuracy_lost_when_settled": summary(settled_loss),
                    "plans_to_settle": summary([float(p) for p in plans_needed]),
                    "apps_unserved": summary([float(s) for s in shed]),
                    "critical_apps_unserved": summary([float(c) for c in critical_unserved]),
                }
            )
            print(f"failures {node_count}x{app_count} {label}: {len(cases)} cases", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_planner.json")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--gap-instances", type=int, default=200)
    parser.add_argument("--pairs-max", type=int, default=40)
    parser.add_argument(
        "--only-time", action="store_true", help="skip the gap and failure sections"
    )
    options = parser.parse_args(argv)
    started = time.time()
    report = {
        "command": "python -m redge.chaos.bench_planner "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": dataclasses.asdict(Settings()),
        "planner_time": bench_time(options.repeats),
        "optimality_gap": None if options.only_time else bench_gap(options.gap_instances),
        "failures": None if options.only_time else bench_failures(options.pairs_max),
    }
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["wall_s"] = time.time() - started
    out = pathlib.Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
