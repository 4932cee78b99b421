"""Table-driven tests of the cluster state machine: each case is a script of commands and
the outcome and state it must end in."""

from __future__ import annotations

import dataclasses

import pytest

from redge.consensus import commands as c
from redge.consensus.commands import AppPlacement, Replica
from redge.consensus.state import ALIVE, FAILED, LEFT, SUSPECTED, ClusterState, Settings


def join(node: str, incarnation: int = 1, at_ms: int = 0) -> c.Join:
    number = int(node[1:])
    return c.Join(
        node_id=node,
        http_address=f"127.0.0.1:{8100 + number}",
        raft_address=f"127.0.0.1:{9100 + number}",
        heartbeat_address=f"127.0.0.1:{7100 + number}",
        incarnation=incarnation,
        at_ms=at_ms,
    )


def app(name: str = "detector", variants=("big", "small"), priority="critical", backup="warm") -> c.RegisterApp:
    return c.RegisterApp(name=name, variants=tuple(variants), priority=priority, slo_ms=150, backup=backup, at_ms=0)


def plan(epoch: int, *replicas: tuple[str, str, str, str]) -> c.CommitPlan:
    by_app: dict[str, list[Replica]] = {}
    for app_name, node, variant, role in replicas:
        by_app.setdefault(app_name, []).append(Replica(node, variant, role))
    placements = tuple(AppPlacement(a, tuple(r)) for a, r in by_app.items())
    return c.CommitPlan(epoch=epoch, placements=placements, proposer_id="n1", reason="test", at_ms=epoch)


def suspect(observer: str, target: str, at_ms: int = 10, incarnation: int = 1, reason: str = "heartbeat") -> c.Suspect:
    return c.Suspect(observer, target, incarnation, reason, at_ms)


def cluster(*nodes: str) -> list[c.Command]:
    return [join(n) for n in nodes]


def run(script: list[c.Command]) -> tuple[ClusterState, list]:
    state = ClusterState()
    outcomes = [state.apply(command) for command in script]
    return state, outcomes


CASES = [
    # name, script, expected acceptance of the last command, check on the final state
    ("join registers alive", cluster("n1"), True, lambda s: s.members["n1"].status == ALIVE),
    ("duplicate join is a no-op", cluster("n1", "n1"), True, lambda s: len(s.members) == 1),
    (
        "stale incarnation refused",
        [join("n1", 2), join("n1", 1)],
        False,
        lambda s: s.members["n1"].incarnation == 2,
    ),
    (
        "address collision refused",
        [join("n1"), dataclasses.replace(join("n1"), node_id="n2")],
        False,
        lambda s: "n2" not in s.members,
    ),
    ("invalid node id refused", [dataclasses.replace(join("n1"), node_id="bad id")], False, lambda s: not s.members),
    (
        "one suspicion of three does not confirm",
        cluster("n1", "n2", "n3") + [suspect("n1", "n3")],
        True,
        lambda s: s.members["n3"].status == SUSPECTED,
    ),
    (
        "two observers confirm in a cluster of three",
        cluster("n1", "n2", "n3") + [suspect("n1", "n3"), suspect("n2", "n3")],
        True,
        lambda s: s.members["n3"].status == FAILED and "n3" not in s.suspicions,
    ),
    (
        "the same observer twice does not confirm",
        cluster("n1", "n2", "n3") + [suspect("n1", "n3"), suspect("n1", "n3", at_ms=20)],
        True,
        lambda s: s.members["n3"].status == SUSPECTED,
    ),
    (
        "five nodes need three observers",
        cluster("n1", "n2", "n3", "n4", "n5") + [suspect("n1", "n5"), suspect("n2", "n5")],
        True,
        lambda s: s.members["n5"].status == SUSPECTED,
    ),
    (
        "five nodes confirm with three observers",
        cluster("n1", "n2", "n3", "n4", "n5") + [suspect("n1", "n5"), suspect("n2", "n5"), suspect("n3", "n5")],
        True,
        lambda s: s.members["n5"].status == FAILED,
    ),
    (
        "a failed observer does not count",
        cluster("n1", "n2", "n3", "n4", "n5")
        + [suspect("n1", "n5"), suspect("n2", "n5"), suspect("n3", "n5"), suspect("n5", "n4"), suspect("n1", "n4")],
        True,
        lambda s: s.members["n4"].status == SUSPECTED,
    ),
    ("self suspicion refused", cluster("n1", "n2") + [suspect("n1", "n1")], False, lambda s: True),
    (
        "stale incarnation suspicion refused",
        [join("n1"), join("n2", 3), suspect("n1", "n2", incarnation=2)],
        False,
        lambda s: s.members["n2"].status == ALIVE,
    ),
    (
        "withdrawn suspicion clears the node",
        cluster("n1", "n2", "n3") + [suspect("n1", "n3"), c.Unsuspect("n1", "n3", 20)],
        True,
        lambda s: s.members["n3"].status == ALIVE and not s.suspicions,
    ),
    (
        "failed node cannot rejoin with the same incarnation",
        cluster("n1", "n2", "n3") + [suspect("n1", "n3"), suspect("n2", "n3"), join("n3", 1, at_ms=50)],
        False,
        lambda s: s.members["n3"].status == FAILED,
    ),
    (
        "failed node rejoins with a higher incarnation, held down",
        cluster("n1", "n2", "n3") + [suspect("n1", "n3"), suspect("n2", "n3"), join("n3", 2, at_ms=50)],
        True,
        lambda s: s.members["n3"].status == ALIVE and s.members["n3"].hold_down_until_ms == 50 + Settings().hold_down_ms,
    ),
    (
        "a departure lowers the observers needed",
        cluster("n1", "n2", "n3", "n4") + [suspect("n1", "n4"), suspect("n2", "n4"), c.Leave("n3", 30)],
        True,
        lambda s: s.members["n4"].status == FAILED and s.members["n3"].status == LEFT,
    ),
    ("degraded is not a failure", cluster("n1", "n2") + [suspect("n1", "n2", reason="degraded")], True,
     lambda s: s.members["n2"].status == ALIVE and s.members["n2"].degraded),
    ("app registers", [app()], True, lambda s: s.apps["detector"].priority == "critical"),
    ("app with bad priority refused", [dataclasses.replace(app(), priority="urgent")], False, lambda s: not s.apps),
    ("app with no variants refused", [dataclasses.replace(app(), variants=())], False, lambda s: not s.apps),
    ("app with zero slo refused", [dataclasses.replace(app(), slo_ms=0.0)], False, lambda s: not s.apps),
    (
        "plan commits with the next epoch",
        cluster("n1", "n2") + [app(), plan(1, ("detector", "n1", "big", "primary"), ("detector", "n2", "small", "warm"))],
        True,
        lambda s: s.epoch == 1 and s.primary_of("detector") == Replica("n1", "big", "primary"),
    ),
    (
        "plan with a skipped epoch refused",
        cluster("n1") + [app(), plan(2, ("detector", "n1", "big", "primary"))],
        False,
        lambda s: s.epoch == 0,
    ),
    (
        "plan replayed is refused as stale",
        cluster("n1") + [app(), plan(1, ("detector", "n1", "big", "primary")), plan(1, ("detector", "n1", "big", "primary"))],
        False,
        lambda s: s.epoch == 1,
    ),
    (
        "two primaries refused",
        cluster("n1", "n2") + [app(), plan(1, ("detector", "n1", "big", "primary"), ("detector", "n2", "big", "primary"))],
        False,
        lambda s: s.epoch == 0,
    ),
    (
        "two replicas on one node refused",
        cluster("n1") + [app(), plan(1, ("detector", "n1", "big", "primary"), ("detector", "n1", "small", "warm"))],
        False,
        lambda s: not s.plan,
    ),
    (
        "primary on a failed node refused",
        cluster("n1", "n2", "n3") + [app(), suspect("n1", "n3"), suspect("n2", "n3"), plan(1, ("detector", "n3", "big", "primary"))],
        False,
        lambda s: not s.plan,
    ),
    (
        "unknown variant refused",
        cluster("n1") + [app(), plan(1, ("detector", "n1", "huge", "primary"))],
        False,
        lambda s: not s.plan,
    ),
    (
        "removing a placed app raises the epoch",
        cluster("n1") + [app(), plan(1, ("detector", "n1", "big", "primary")), c.RemoveApp("detector", 5)],
        True,
        lambda s: s.epoch == 2 and not s.plan and not s.apps,
    ),
    (
        "report from an unknown node refused",
        [c.Report(node_id="n9", kind="serving", at_ms=1, app="detector")],
        False,
        lambda s: not s.replica_reports,
    ),
    (
        "report records the replica state",
        cluster("n1") + [app(), c.Report(node_id="n1", kind="load_done", at_ms=1, app="detector", variant="big")],
        True,
        lambda s: s.replica_reports[("detector", "n1")] == "load_done",
    ),
]


@pytest.mark.parametrize("name,script,accepted,check", CASES, ids=[case[0] for case in CASES])
def test_state_machine_case(name, script, accepted, check):
    state, outcomes = run(script)
    assert outcomes[-1].accepted is accepted, outcomes[-1]
    assert check(state)
    if not accepted:
        assert state.events[-1].kind == "command_rejected"
        assert state.events[-1].fields["reason"] == outcomes[-1].reason


def test_confirmation_event_names_the_observers_and_first_suspicion():
    state, _ = run(cluster("n1", "n2", "n3") + [suspect("n1", "n3", at_ms=100), suspect("n2", "n3", at_ms=140)])
    confirmed = [e for e in state.events if e.kind == "failure_confirmed"]
    assert len(confirmed) == 1
    assert confirmed[0].fields["observers"] == ["n1", "n2"]
    assert confirmed[0].fields["first_suspicion_at_ms"] == 100
    assert confirmed[0].at_ms == 140


@pytest.mark.parametrize(
    "live,needed",
    [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (7, 4)],
)
def test_observers_needed(live, needed):
    state, _ = run(cluster(*[f"n{i}" for i in range(1, live + 1)]))
    assert state.observers_needed("n1") == needed


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"type": "nope"}', b'{"type": "join"}', b'{"type": "probe", "proposer_id": 1, "token": "t", "at_ms": 0}',
     b'{"type": "probe", "proposer_id": "a", "token": "t", "at_ms": 0, "extra": 1}', b"\xff\xfe"],
)
def test_malformed_command_is_recorded_not_raised(data):
    state = ClusterState()
    outcome = state.apply_encoded(data)
    assert not outcome.accepted
    assert state.rejected_count == 1
    assert state.events[-1].kind == "command_rejected"


def test_event_log_is_bounded():
    state = ClusterState(settings=Settings(events_max=10))
    for index in range(50):
        state.apply(c.Report(node_id="nobody", kind="serving", at_ms=index))
    assert len(state.events) == 10
    assert state.events[-1].seq == 50


def test_commands_round_trip_through_encoding():
    for command in [join("n1"), app(), plan(1, ("detector", "n1", "big", "primary")), suspect("n1", "n2"),
                    c.Unsuspect("n1", "n2", 3), c.Leave("n1", 4), c.RemoveApp("x", 5), c.Probe("n1", "t", 6),
                    c.Report(node_id="n1", kind="serving", at_ms=7, app="a", duration_ms=1.5)]:
        assert c.decode(c.encode(command)) == command


def test_state_round_trips_through_bytes():
    state, _ = run(
        cluster("n1", "n2", "n3")
        + [app(), plan(1, ("detector", "n1", "big", "primary"), ("detector", "n2", "small", "warm")), suspect("n1", "n3")]
    )
    copy = ClusterState.from_bytes(state.to_bytes())
    assert copy.to_dict() == state.to_dict()


def artifact(name: str, version: str = "1-onnx") -> c.ArtifactSummary:
    return c.ArtifactSummary(
        name=name, version=version, format=version.split("-")[1], size_bytes=1000, parameter_count=10,
        family="f", accuracy=0.7, profiles=(c.ArtifactProfile("cpu", 5.0, 2.0, 4000),),
    )


def test_store_reports_build_the_catalog_and_locations():
    state, outcomes = run(
        cluster("n1", "n2")
        + [
            c.StoreReport("n1", (artifact("big"), artifact("small")), 2000, 1),
            c.StoreReport("n2", (artifact("small"),), 1000, 2),
            c.StoreReport("n2", (artifact("small"),), 1000, 3),
        ]
    )
    assert [o.accepted for o in outcomes[-3:]] == [True, True, True]
    assert outcomes[-1].duplicate
    assert state.nodes_holding("small") == ["n1", "n2"]
    assert state.nodes_holding("big") == ["n1"]
    assert state.catalog[("big", "1-onnx")].profiles[0].latency_ms == 2.0
    assert ClusterState.from_bytes(state.to_bytes()).to_dict() == state.to_dict()
    assert c.decode(c.encode(c.StoreReport("n1", (artifact("big"),), 1, 1))) == c.StoreReport("n1", (artifact("big"),), 1, 1)


def test_store_report_from_a_stranger_is_refused():
    state, outcomes = run([c.StoreReport("n9", (artifact("big"),), 1, 1)])
    assert not outcomes[-1].accepted and not state.stores


@pytest.mark.parametrize("live,needed", [(9, 3), (12, 3), (20, 3)])
def test_large_clusters_need_a_majority_of_the_watchers(live, needed):
    state, _ = run(cluster(*[f"n{i}" for i in range(1, live + 1)]))
    assert state.observers_needed("n1") == needed


def test_settings_match_the_detectors_watch_sets():
    from redge.agent import watching

    settings = Settings()
    assert settings.watch_all_members_max == watching.SMALL_CLUSTER_MAX
    assert settings.watchers_per_node == watching.DEFAULT_FANOUT


def test_degraded_node_is_restored_by_the_observer():
    state, outcomes = run(cluster("n1", "n2") + [suspect("n1", "n2", reason="degraded"), c.Unsuspect("n1", "n2", 20)])
    assert outcomes[-1].accepted and not state.members["n2"].degraded


def test_survivors_of_a_failure_cannot_confirm_each_other_on_one_word():
    state, _ = run(cluster("n1", "n2", "n3") + [suspect("n1", "n3"), suspect("n2", "n3")])
    assert state.members["n3"].status == FAILED
    assert state.observers_needed("n2") == 2
    state.apply(suspect("n1", "n2", at_ms=50))
    assert state.members["n2"].status == SUSPECTED


def test_a_restarted_observer_no_longer_counts_its_old_suspicions():
    state, _ = run(cluster("n1", "n2", "n3") + [suspect("n1", "n3"), join("n1", 2, at_ms=20)])
    assert state.members["n3"].status == ALIVE and not state.suspicions
    state.apply(suspect("n2", "n3", at_ms=100_000))
    assert state.members["n3"].status == SUSPECTED  # one word is not enough


def test_a_failed_observers_suspicions_are_dropped():
    state, _ = run(cluster("n1", "n2", "n3", "n4", "n5") + [suspect("n5", "n4"), suspect("n1", "n5"), suspect("n2", "n5"), suspect("n3", "n5")])
    assert state.members["n5"].status == FAILED
    assert "n4" not in state.suspicions and state.members["n4"].status == ALIVE
