"""This build and the previous release, side by side on the same log: at format 1 they must
reach the same state, byte for byte, or a cluster in the middle of a rolling upgrade would
hold two truths. The previous release runs in a subprocess (tests/upgrade/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson

from redge.consensus import commands as c
from redge.consensus.state import ClusterState

NODES = [f"n{i}" for i in range(1, 6)]
APPS = ["det", "tag"]
VARIANTS = ["big", "small"]
SEQUENCES = 40
COMMANDS_PER_SEQUENCE = 60

# Applies each line's list of hex-encoded entries to a fresh state of whichever build is on
# the path; prints one line per sequence: the sha256 of the snapshot and the last outcome.
APPLY = """
import hashlib, sys, orjson
from redge.consensus.state import ClusterState
for line in sys.stdin:
    state = ClusterState()
    outcomes = [state.apply_encoded(bytes.fromhex(entry)) for entry in orjson.loads(line)]
    rejected = sum(1 for outcome in outcomes if not outcome.accepted)
    print(hashlib.sha256(state.to_bytes()).hexdigest(), rejected, flush=True)
"""


def random_command(rng: random.Random, at_ms: int, incarnations: dict[str, int]) -> c.Command:
    node, other = rng.sample(NODES, 2)
    kind = rng.randrange(10)
    if kind == 0:
        incarnations[node] = incarnations.get(node, 0) + rng.choice([0, 1, 1])
        number = NODES.index(node)
        return c.Join(node, f"h:{number}", f"r:{number}", f"b:{number}", incarnations[node], at_ms,
                      memory_bytes=rng.choice([0, 1 << 30]))
    if kind == 1:
        return c.Suspect(other, node, incarnations.get(node, 1) - rng.choice([0, 0, 1]), "timeout", at_ms,
                         since_ms=rng.choice([0, at_ms - 5]))
    if kind == 2:
        return c.Unsuspect(other, node, at_ms)
    if kind == 3:
        return c.RegisterApp(rng.choice(APPS), tuple(VARIANTS[: rng.randint(1, 2)]), rng.choice(c.PRIORITIES),
                             rng.choice([100.0, 0.0]), rng.choice(c.BACKUP_POLICIES), at_ms,
                             proposer_id=node)  # format 2 only: left out at format 1
    if kind == 4:
        return c.RemoveApp(rng.choice(APPS), at_ms, proposer_id=node)
    if kind == 5:
        placements = tuple(
            c.AppPlacement(app, tuple(c.Replica(n, rng.choice(VARIANTS), role)
                                      for n, role in zip(rng.sample(NODES, 2), ("primary", "warm"), strict=True)))
            for app in APPS if rng.random() < 0.7
        )
        return c.CommitPlan(rng.randint(1, 4), placements, node, "random", at_ms)
    if kind == 6:
        return c.Report(node, rng.choice(c.REPORT_KINDS), at_ms, app=rng.choice(APPS), variant="big", epoch=1)
    if kind == 7:
        artifact = c.ArtifactSummary("big", "1-onnx", "onnx", 100, 10, "f", accuracy=rng.choice([None, 0.7]))
        return c.StoreReport(node, (artifact,), 100, at_ms)
    if kind == 8:
        return c.Leave(node, at_ms)
    return c.Probe(node, "t", at_ms)


def sequences() -> list[list[bytes]]:
    rng = random.Random(1234)
    result = []
    for _ in range(SEQUENCES):
        incarnations: dict[str, int] = {}
        entries = [c.encode(random_command(rng, 1000 + step * 7, incarnations), 1)
                   for step in range(COMMANDS_PER_SEQUENCE)]
        # Entries both must refuse alike: an unknown type, a "v" that is no format of 2 or
        # more, and a RaiseFormat whose members are not the cluster's (the previous release
        # does not know the type; this build finds it void, and must record it the same).
        for odd in (b'{"type": "nope"}', b'{"type": "probe", "proposer_id": "n1", "token": "t", "at_ms": 1, "v": 1}',
                    b'{"type": "probe", "proposer_id": "n1", "token": "t", "at_ms": 1, "v": "2"}',
                    c.encode(c.RaiseFormat(2, "n1", 5, members=("n9@1",)), 1)):
            entries.insert(rng.randrange(len(entries)), odd)
        result.append(entries)
    return result


def run_build(pythonpath: str | None, logs: list[list[bytes]]) -> list[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    given = "".join(orjson.dumps([entry.hex() for entry in log]).decode() + "\n" for log in logs)
    done = subprocess.run([sys.executable, "-c", APPLY], input=given, capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_previous_release_and_this_build_reach_the_same_state_on_a_format_1_log(previous_release: Path):
    logs = sequences()
    before = run_build(str(previous_release), logs)
    here = []
    for log in logs:
        state = ClusterState()
        rejected = sum(1 for entry in log if not state.apply_encoded(entry).accepted)
        here.append(f"{hashlib.sha256(state.to_bytes()).hexdigest()} {rejected}")
    assert len(before) == SEQUENCES
    assert here == before
    # The logs did exercise the state machine: most commands applied, some were refused.
    assert all(0 < int(line.split()[1]) < COMMANDS_PER_SEQUENCE for line in here)


def test_the_previous_release_reads_a_snapshot_this_build_wrote_at_format_1(previous_release: Path):
    for log in sequences()[:5]:
        state = ClusterState()
        for entry in log:
            state.apply_encoded(entry)
        script = ("import sys; from redge.consensus.state import ClusterState; "
                  "sys.stdout.buffer.write(ClusterState.from_bytes(sys.stdin.buffer.read()).to_bytes())")
        env = {**os.environ, "PYTHONPATH": str(previous_release)}
        done = subprocess.run([sys.executable, "-c", script], input=state.to_bytes(), capture_output=True, env=env,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout == state.to_bytes()
