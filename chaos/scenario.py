"""Scenarios as TOML files: a cluster, its apps, a load, a fault schedule and what must hold.

A scenario is data, like etcd-raft's testdata scripts: one file says everything a run needs,
so a failure report can name the file and seed and anyone can run it again. `load_scenario`
checks the whole file and raises `ScenarioError` listing every problem with its key, before
any process starts. The file format, with every key:

    name = "crash"                # required
    description = "..."
    seed = 7                      # every random choice comes from random.Random(seed)
    profile = "enterprise"        # or "iobt"
    peers = 3                     # 1..9
    mode = "loopback"             # or "netns" (root; partitions, loss, delay, bandwidth)
    duration_s = 15               # load runs this long; faults are placed on this clock
    settle_s = 10                 # after the load, time allowed for healed peers to be ready
    source = "test-family"        # optional: the peers' --source (a model repository path or
                                  # URL); "test-family" writes the small MLP family of
                                  # redge.runtime.testing (mlp-large, mlp-medium, mlp-small)

    [[apps]]                      # registered before the load, as POST /cluster/apps
    name = "detector"
    variants = ["resnet50", "resnet18"]
    priority = "critical"
    slo_ms = 150
    backup = "warm"

    [load]                        # chaos/load.py LoadSpec
    kind = "probe"                # or "infer" / "client" (then app = "detector"), or "write"
    clients = 2
    rate_per_s = 0                # per client; 0 = closed loop as fast as it goes
    timeout_s = 2.0

    [[loads]]                     # more loads beside it, each a LoadSpec (e.g. writes)
    kind = "write"
    clients = 2
    rate_per_s = 5

    [[faults]]                    # chaos/faults.py; kind plus that fault's fields
    at_s = 4                      # when, from the start of the load
    duration_s = 5                # heal after this long; omit to heal at the end
    kind = "crash"
    node = "follower"             # a node id, or leader / follower / random / primary:APP

    [expect]                      # chaos/checker.py Expectations
    lost_requests_max = 0

A `random-cascade` fault (`count`, `kinds`, `window_s`, `duration_s`) is expanded here, from
the seed, into a `Cascade` of that many faults of those kinds on random nodes, so the same
seed always gives the same schedule; `random` node selectors are resolved here too. The
hostile faults of chaos/hostile.py (`icmp-sweep`, `raft-flood`, `http-fuzz`,
`oversized-bodies`) take the same `at_s` / `duration_s` and their own fields.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from redge.agent import profile as profile_registry
from redge.chaos.checker import Expectations
from redge.chaos.faults import FAULT_KINDS as PROCESS_FAULT_KINDS
from redge.chaos.faults import Cascade, Fault, Partition
from redge.chaos.hostile import HOSTILE_FAULT_KINDS
from redge.chaos.load import LoadSpec

FAULT_KINDS: dict[str, type[Fault]] = {**PROCESS_FAULT_KINDS, **HOSTILE_FAULT_KINDS}

SCENARIO_DIRECTORY = Path(__file__).parent / "scenarios"
PROFILES = tuple(sorted(profile_registry.PROFILES))
MODES = ("loopback", "netns")
PEERS_MAX = 9
DURATION_S_MAX = 600.0
FAULTS_MAX = 64
TOP_KEYS = {"name", "description", "seed", "profile", "peers", "mode", "duration_s", "settle_s", "source",
            "apps", "load", "loads", "faults", "expect"}
APP_KEYS = {"name", "variants", "priority", "slo_ms", "backup", "request_rate_per_s"}
RANDOM_CASCADE_KINDS = ("crash", "hang", "restart", "partition", "slow-node", "packet-loss", "delay")
RANDOM_CASCADE_COUNT_MAX = 100


class ScenarioError(ValueError):
    """A scenario file that cannot be run, with every problem found in it."""


@dataclass(frozen=True)
class ScheduledFault:
    at_s: float
    fault: Fault
    duration_s: float | None = None  # None: healed when the load ends


@dataclass
class Scenario:
    name: str
    seed: int = 0
    description: str = ""
    profile: str = "enterprise"
    peers: int = 3
    mode: str = "loopback"
    duration_s: float = 15.0
    settle_s: float = 15.0
    source: str = ""  # a model repository for the peers' --source, or "test-family"
    apps: list[dict[str, Any]] = field(default_factory=list)
    load: LoadSpec = field(default_factory=LoadSpec)
    extra_loads: list[LoadSpec] = field(default_factory=list)
    schedule: list[ScheduledFault] = field(default_factory=list)
    expect: Expectations = field(default_factory=Expectations)
    path: Path | None = None

    def node_ids(self) -> list[str]:
        return [f"n{index + 1}" for index in range(self.peers)]

    def unavailable_reason(self) -> str | None:
        """Why this scenario cannot run on this machine (for a clean skip), or None."""
        if self.mode == "netns":
            from redge.chaos.netns import netns_unavailable_reason

            reason = netns_unavailable_reason()
            if reason:
                return reason
        for step in self.schedule:
            reason = step.fault.unavailable_reason(self.mode)
            if reason:
                return reason
        return None

    def timeline(self) -> list[tuple[float, Fault, float | None]]:
        """The schedule with every cascade flattened, ordered by time."""
        steps: list[tuple[float, Fault, float | None]] = []
        for step in self.schedule:
            if isinstance(step.fault, Cascade):
                steps += step.fault.flatten(step.at_s)
            else:
                steps.append((step.at_s, step.fault, step.duration_s))
        return sorted(steps, key=lambda s: s[0])


def load_scenario(path: Path | str) -> Scenario:
    path = Path(path)
    if not path.exists() and not path.suffix and (SCENARIO_DIRECTORY / f"{path}.toml").exists():
        path = SCENARIO_DIRECTORY / f"{path}.toml"  # a bare name means a shipped scenario
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ScenarioError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path}: not valid TOML: {error}") from None
    scenario = parse_scenario(data, source=str(path))
    scenario.path = path
    return scenario


def load_scenario_with_seed(path: Path | str, seed: int) -> Scenario:
    """The scenario at `path` as if its file said `seed = SEED` (random choices drawn again)."""
    scenario = load_scenario(path)
    assert scenario.path is not None
    data = tomllib.loads(scenario.path.read_text())
    data["seed"] = seed
    reseeded = parse_scenario(data, source=str(scenario.path))
    reseeded.path = scenario.path
    return reseeded


def parse_scenario(data: dict[str, Any], source: str = "scenario") -> Scenario:
    problems: list[str] = []

    def want(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = data.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            problems.append(f"{key} must be {_type_name(kind)}, not {value!r}")
            return default
        return value

    problems += [f"unknown key {key!r}" for key in sorted(set(data) - TOP_KEYS)]
    name = want("name", str, "")
    if not name:
        problems.append("name is required")
    seed = want("seed", int, 0)
    profile = want("profile", str, "enterprise")
    if profile not in PROFILES:
        problems.append(f"profile must be one of {', '.join(PROFILES)}")
    peers = want("peers", int, 3)
    if not 1 <= peers <= PEERS_MAX:
        problems.append(f"peers must be 1..{PEERS_MAX}")
        peers = 3
    mode = want("mode", str, "loopback")
    if mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}")
    duration_s = float(want("duration_s", (int, float), 15.0))
    if not 0 < duration_s <= DURATION_S_MAX:
        problems.append(f"duration_s must be in (0, {DURATION_S_MAX:.0f}]")
    settle_s = float(want("settle_s", (int, float), 15.0))
    if not 0 <= settle_s <= DURATION_S_MAX:
        problems.append(f"settle_s must be in [0, {DURATION_S_MAX:.0f}]")
    source = want("source", str, "")
    apps = want("apps", list, [])
    for index, app in enumerate(apps):
        if not isinstance(app, dict):
            problems.append(f"apps[{index}] must be a table")
            continue
        problems += [f"apps[{index}]: unknown key {key!r}" for key in sorted(set(app) - APP_KEYS)]
        if not isinstance(app.get("name"), str) or not isinstance(app.get("variants"), list):
            problems.append(f"apps[{index}] needs a name and a list of variants")
    load = _parse_load(want("load", dict, {}), problems)
    extra_loads = []
    for index, raw_load in enumerate(want("loads", list, [])):
        if not isinstance(raw_load, dict):
            problems.append(f"loads[{index}] must be a table")
            continue
        extra_loads.append(_parse_load(raw_load, problems))
    node_ids = [f"n{index + 1}" for index in range(peers)]
    rng = random.Random(seed)
    schedule = []
    raw_faults = want("faults", list, [])
    if len(raw_faults) > FAULTS_MAX:
        problems.append(f"at most {FAULTS_MAX} faults")
    for index, raw in enumerate(raw_faults[:FAULTS_MAX]):
        step = _parse_step(raw, f"faults[{index}]", node_ids, rng, duration_s, problems)
        if step is not None:
            schedule.append(step)
    expect = _parse_dataclass(Expectations, want("expect", dict, {}), "expect", problems)
    if problems:
        raise ScenarioError(f"{source}: " + "; ".join(problems))
    return Scenario(
        name=name, seed=seed, description=str(data.get("description", "")), profile=profile, peers=peers,
        mode=mode, duration_s=duration_s, settle_s=settle_s, source=source, apps=apps, load=load,
        extra_loads=extra_loads, schedule=schedule, expect=expect or Expectations(),
    )


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse_load(raw: dict[str, Any], problems: list[str]) -> LoadSpec:
    allowed = {f.name for f in fields(LoadSpec)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        problems.append(f"load: unknown keys {', '.join(map(repr, unknown))}")
        return LoadSpec()
    values = dict(raw)
    if "input_shape" in values:
        values["input_shape"] = tuple(values["input_shape"])
    try:
        return LoadSpec(**values)
    except (TypeError, ValueError) as error:
        problems.append(f"load: {error}")
        return LoadSpec()


def _parse_dataclass(cls: type, raw: dict[str, Any], where: str, problems: list[str]) -> Any:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        problems.append(f"{where}: unknown keys {', '.join(map(repr, unknown))}")
        return None
    try:
        return cls(**raw)
    except (TypeError, ValueError) as error:
        problems.append(f"{where}: {error}")
        return None


def _resolve_random(value: Any, node_ids: list[str], rng: random.Random) -> Any:
    if value == "random":
        return rng.choice(node_ids)
    if isinstance(value, list):
        return tuple(_resolve_random(v, node_ids, rng) for v in value)
    return value


def _parse_fault(raw: dict[str, Any], where: str, node_ids: list[str], rng: random.Random,
                 problems: list[str]) -> Fault | None:
    kind = raw.get("kind")
    values = {k: v for k, v in raw.items() if k not in ("kind", "at_s", "duration_s", "offset_s")}
    if kind == "random-cascade":
        return _random_cascade(values, where, node_ids, rng, problems)
    cls = FAULT_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        problems.append(f"{where}: kind must be one of {', '.join([*FAULT_KINDS, 'random-cascade'])}, not {kind!r}")
        return None
    if cls is Cascade:
        steps = []
        for index, sub in enumerate(values.pop("steps", [])):
            sub_where = f"{where}.steps[{index}]"
            if not isinstance(sub, dict):
                problems.append(f"{sub_where} must be a table")
                continue
            fault = _parse_fault(sub, sub_where, node_ids, rng, problems)
            if fault is not None:
                steps.append((float(sub.get("offset_s", 0.0)), fault, _optional_float(sub.get("duration_s"))))
        values["steps"] = tuple(steps)
    for key in ("node", "nodes"):
        if key in values:
            values[key] = _resolve_random(values[key], node_ids, rng)
            named = values[key] if isinstance(values[key], tuple) else (values[key],)
            bad = [n for n in named if n not in node_ids and n not in ("leader", "follower")
                   and not str(n).startswith("primary:")]
            if bad:
                problems.append(f"{where}: unknown node(s) {', '.join(map(str, bad))}; nodes are {', '.join(node_ids)}")
    if "groups" in values:
        if not isinstance(values["groups"], list) or not all(isinstance(g, list) for g in values["groups"]):
            problems.append(f"{where}: groups must be a list of lists of node ids")
            return None
        values["groups"] = tuple(tuple(_resolve_random(n, node_ids, rng) for n in group) for group in values["groups"])
        named = [n for group in values["groups"] for n in group]
        bad = [n for n in named if n not in node_ids and n not in ("leader", "follower", "rest")]
        if bad or len(values["groups"]) < 2:
            problems.append(f"{where}: a partition needs at least two groups of known nodes (or rest)")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        problems.append(f"{where} ({kind}): {error}")
        return None


def _random_cascade(values: dict[str, Any], where: str, node_ids: list[str], rng: random.Random,
                    problems: list[str]) -> Cascade | None:
    count = values.get("count", 3)
    kinds = values.get("kinds", ["crash", "hang"])
    window_s = float(values.get("window_s", 10.0))
    step_s = float(values.get("step_duration_s", 3.0))
    if not isinstance(count, int) or not 1 <= count <= RANDOM_CASCADE_COUNT_MAX:
        problems.append(f"{where}: count must be 1..{RANDOM_CASCADE_COUNT_MAX}")
        return None
    if not isinstance(kinds, list) or not kinds or any(k not in RANDOM_CASCADE_KINDS for k in kinds):
        problems.append(f"{where}: kinds must be a non-empty list from {', '.join(RANDOM_CASCADE_KINDS)}")
        return None
    if window_s <= 0 or step_s <= 0:
        problems.append(f"{where}: window_s and step_duration_s must be > 0")
        return None
    # Never take down a majority: at most (peers - 1) // 2 distinct nodes are touched.
    victims = rng.sample(node_ids, max(1, (len(node_ids) - 1) // 2))
    steps = []
    for _ in range(count):
        offset_s = round(rng.uniform(0, window_s), 3)
        kind = rng.choice(kinds)
        node = rng.choice(victims)
        fault: Fault
        if kind == "partition":
            fault = Partition(groups=((node,), ("rest",)))  # the node alone on one side
        elif kind in ("packet-loss", "delay"):
            fault = FAULT_KINDS[kind]((node,))
        else:
            fault = FAULT_KINDS[kind](node)
        steps.append((offset_s, fault, step_s))
    # One fault object is active once: identical (kind, node) steps may not overlap.
    steps.sort(key=lambda s: s[0])
    kept: list[tuple[float, Fault, float | None]] = []
    for offset_s, fault, duration_s in steps:
        if all(f != fault or o + (d or 0) < offset_s for o, f, d in kept):
            kept.append((offset_s, fault, duration_s))
    return Cascade(tuple(kept))


def _parse_step(raw: Any, where: str, node_ids: list[str], rng: random.Random, duration_s: float,
                problems: list[str]) -> ScheduledFault | None:
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a table")
        return None
    at_s = raw.get("at_s")
    if not isinstance(at_s, (int, float)) or not 0 <= at_s < duration_s:
        problems.append(f"{where}: at_s must be a number in [0, duration_s)")
        return None
    fault = _parse_fault(raw, where, node_ids, rng, problems)
    if fault is None:
        return None
    return ScheduledFault(float(at_s), fault, _optional_float(raw.get("duration_s")))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
