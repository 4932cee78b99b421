"""Scenario files: the shipped ones parse, bad ones are refused with a clear reason, seeds decide."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.chaos.faults import Cascade, Crash, Hang, KillLeader, Partition
from redge.chaos.scenario import SCENARIO_DIRECTORY, ScenarioError, load_scenario, parse_scenario

MINIMAL = {"name": "t", "duration_s": 10}


@pytest.mark.parametrize("path", sorted(SCENARIO_DIRECTORY.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_parses(path):
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.schedule, "a chaos scenario without faults is a benchmark"
    for at_s, _, duration_s in scenario.timeline():
        assert 0 <= at_s < scenario.duration_s
        assert duration_s is None or at_s + duration_s <= scenario.duration_s


def test_a_bare_name_means_a_shipped_scenario():
    assert load_scenario("crash").path == SCENARIO_DIRECTORY / "crash.toml"


def test_shipped_schedules():
    assert load_scenario("crash").timeline() == [(3.0, Crash("follower"), 5.0)]
    assert load_scenario("leader-kill").timeline() == [(3.0, KillLeader(), 6.0)]
    assert load_scenario("hang").timeline() == [(3.0, Hang("follower"), 6.0)]
    partition = load_scenario("partition")
    assert partition.mode == "netns"
    assert partition.timeline() == [(3.0, Partition((("leader",), ("rest",))), 6.0)]
    assert [type(f) for _, f, _ in load_scenario("cascade").timeline()] == [Crash, Hang]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": ""}, "name is required"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"peers": 0}, "peers must be 1..9"),
        ({"peers": "three"}, "peers must be an integer"),
        ({"profile": "wifi"}, "profile must be one of enterprise, iobt"),
        ({"mode": "docker"}, "mode must be one of loopback, netns"),
        ({"duration_s": -1}, "duration_s must be in"),
        ({"load": {"kind": "flood"}}, "load kind must be one of probe, infer"),
        ({"load": {"kind": "infer"}}, "infer load needs an app"),
        ({"load": {"clients": 0}}, "clients must be 1..256"),
        ({"load": {"threads": 3}}, "load: unknown keys 'threads'"),
        ({"faults": [{"at_s": 1, "kind": "meteor"}]}, "faults[0]: kind must be one of"),
        ({"faults": [{"at_s": 99, "kind": "crash"}]}, "faults[0]: at_s must be a number in [0, duration_s)"),
        ({"faults": [{"at_s": 1, "kind": "crash", "node": "n7"}]}, "faults[0]: unknown node(s) n7"),
        ({"faults": [{"at_s": 1, "kind": "crash", "nodes": ["n1"]}]}, "faults[0] (crash): "),
        ({"faults": [{"at_s": 1, "kind": "packet-loss", "nodes": ["n1"], "percent": 0}]}, "percent must be 1..100"),
        ({"faults": [{"at_s": 1, "kind": "partition", "groups": [["n1"]]}]}, "at least two groups"),
        ({"faults": [{"at_s": 1, "kind": "delay", "nodes": ["n1"], "ms": 5, "jitter_ms": 9}]}, "jitter_ms <= ms"),
        ({"faults": [{"at_s": 1, "kind": "random-cascade", "kinds": ["meteor"]}]}, "kinds must be a non-empty list"),
        ({"expect": {"lost": 1}}, "expect: unknown keys 'lost'"),
        ({"apps": [{"name": "a"}]}, "apps[0] needs a name and a list of variants"),
    ],
)
def test_bad_scenarios_are_refused_with_the_reason(changes, message):
    with pytest.raises(ScenarioError) as error:
        parse_scenario({**MINIMAL, **changes})
    assert message in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ScenarioError) as error:
        parse_scenario({"peers": 0, "profile": "wifi"})
    assert all(part in str(error.value) for part in ("name is required", "peers", "profile"))


def test_a_file_that_is_not_toml_says_so(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(path)


def test_loopback_cannot_partition():
    scenario = parse_scenario({**MINIMAL, "faults": [{"at_s": 1, "kind": "partition", "groups": [["n1"], ["rest"]]}]})
    assert "netns" in scenario.unavailable_reason()


def random_schedule(seed: int) -> list:
    return parse_scenario({**MINIMAL, "seed": seed, "peers": 5, "faults": [
        {"at_s": 1, "kind": "random-cascade", "count": 4, "kinds": ["crash", "hang"], "window_s": 5},
        {"at_s": 2, "kind": "crash", "node": "random"},
    ]}).timeline()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32))
def test_the_same_seed_gives_the_same_schedule(seed):
    schedule = random_schedule(seed)
    assert schedule == random_schedule(seed)
    cascade = parse_scenario({**MINIMAL, "seed": seed, "peers": 5, "faults": [
        {"at_s": 1, "kind": "random-cascade", "count": 6, "kinds": ["crash", "hang"]}]}).schedule[0].fault
    assert isinstance(cascade, Cascade)
    assert len({fault.node for _, fault, _ in cascade.steps}) <= 2, "a random cascade touches a minority only"


def test_different_seeds_give_different_schedules():
    assert len({repr(random_schedule(seed)) for seed in range(20)}) > 10


def test_a_seed_override_redraws_the_random_choices():
    from redge.chaos.scenario import load_scenario_with_seed

    shipped = load_scenario("random-cascade")
    assert load_scenario_with_seed("random-cascade", shipped.seed).timeline() == shipped.timeline()
    redrawn = {repr(load_scenario_with_seed("random-cascade", seed).timeline()) for seed in range(10)}
    assert len(redrawn) > 5
