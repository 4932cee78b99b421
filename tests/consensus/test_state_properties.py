"""Property tests of the cluster state machine: random command sequences keep its invariants,
and applying the same log twice gives the same state (determinism)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from redge.consensus import commands as c
from redge.consensus.state import FAILED, LEFT, ClusterState

NODES = [f"n{i}" for i in range(1, 6)]
APPS = ["detector", "tracker", "classifier"]
VARIANTS = ["big", "medium", "small"]

nodes = st.sampled_from(NODES)
apps = st.sampled_from(APPS)


class ClusterStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = ClusterState()
        self.log: list[c.Command] = []
        self.clock_ms = 0
        self.incarnations: dict[str, int] = {}
        self.last_epoch = 0
        # epoch -> plan at commit time, to check each committed plan against the members then
        self.committed_plans: list[tuple[int, dict, dict]] = []

    def apply(self, command: c.Command) -> None:
        self.clock_ms += 7
        self.log.append(command)
        epoch_before = self.state.epoch
        outcome = self.state.apply(command)
        if isinstance(command, c.CommitPlan) and outcome.accepted:
            statuses = {node: member.status for node, member in self.state.members.items()}
            self.committed_plans.append((self.state.epoch, dict(self.state.plan), statuses))
        assert self.state.epoch >= epoch_before

    @rule(node=nodes, bump=st.booleans())
    def join(self, node, bump):
        incarnation = self.incarnations.get(node, 0) + (1 if bump or node not in self.incarnations else 0)
        self.incarnations[node] = incarnation
        number = int(node[1:])
        self.apply(
            c.Join(node, f"h:{number}", f"r:{number}", f"b:{number}", incarnation, self.clock_ms)
        )

    @rule(node=nodes)
    def leave(self, node):
        self.apply(c.Leave(node, self.clock_ms))

    @rule(observer=nodes, suspected=nodes, stale=st.booleans())
    def suspect(self, observer, suspected, stale):
        incarnation = self.incarnations.get(suspected, 1) - (1 if stale else 0)
        self.apply(c.Suspect(observer, suspected, incarnation, "heartbeat", self.clock_ms))

    @rule(observer=nodes, suspected=nodes)
    def unsuspect(self, observer, suspected):
        self.apply(c.Unsuspect(observer, suspected, self.clock_ms))

    @rule(name=apps, count=st.integers(1, 3), priority=st.sampled_from(c.PRIORITIES))
    def register(self, name, count, priority):
        self.apply(c.RegisterApp(name, tuple(VARIANTS[:count]), priority, 100.0, "warm", self.clock_ms))

    @rule(name=apps)
    def remove(self, name):
        self.apply(c.RemoveApp(name, self.clock_ms))

    @rule(
        data=st.data(),
        epoch_offset=st.sampled_from([1, 1, 1, 0, 2]),
    )
    def commit_plan(self, data, epoch_offset):
        placements = []
        for app_name in data.draw(st.lists(apps, unique=True, max_size=3)):
            replicas = data.draw(
                st.lists(
                    st.tuples(nodes, st.sampled_from(VARIANTS), st.sampled_from(c.ROLES)), max_size=3
                )
            )
            placements.append(c.AppPlacement(app_name, tuple(c.Replica(*r) for r in replicas)))
        self.apply(c.CommitPlan(self.state.epoch + epoch_offset, tuple(placements), "n1", "random", self.clock_ms))

    @invariant()
    def one_primary_per_app(self):
        for replicas in self.state.plan.values():
            assert sum(1 for r in replicas if r.role == "primary") <= 1
            assert len({r.node_id for r in replicas}) == len(replicas)

    @invariant()
    def epochs_never_go_back(self):
        assert self.state.epoch >= self.last_epoch
        self.last_epoch = self.state.epoch

    @invariant()
    def committed_plans_hold_no_primary_on_failed_members(self):
        for _, plan, statuses in self.committed_plans[-1:]:
            for replicas in plan.values():
                for replica in replicas:
                    assert statuses.get(replica.node_id) not in (FAILED, LEFT, None)

    @invariant()
    def suspicions_only_of_live_members(self):
        for target in self.state.suspicions:
            assert self.state.members[target].status not in (FAILED, LEFT)

    @invariant()
    def plan_only_names_registered_apps(self):
        assert set(self.state.plan) <= set(self.state.apps)

    def teardown(self):
        # Determinism: replaying the same log on a fresh state gives the same state.
        replay = ClusterState()
        for command in self.log:
            replay.apply(c.decode(c.encode(command)))
        assert replay.to_dict() == self.state.to_dict()


ClusterStateMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestClusterState = ClusterStateMachine.TestCase
