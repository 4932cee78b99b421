"""A hypothesis state machine over a cluster's life: nodes fail, are
suspected, come back in hold-down, apps leave, the restore hold-down toggles,
and the leader plans and carries out each plan. The planner's invariants
must hold after every plan, not just on fresh clusters."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from redge.placement.capacity import violations
from redge.placement.planner import plan_for
from redge.placement.problem import Health, Problem, Role, Settings
from redge.placement.testbed import random_problem
from redge.placement.transition import ActionKind

LOADS_MAX = 6
PREFETCHES_MAX = 6


class ClusterLife(RuleBasedStateMachine):
    problem: Problem

    @initialize(seed=st.integers(0, 2**32 - 1), nodes=st.integers(2, 6), apps=st.integers(1, 16))
    def start(self, seed: int, nodes: int, apps: int) -> None:
        bounded = Settings(loads_per_plan_max=LOADS_MAX, prefetches_per_plan_max=PREFETCHES_MAX)
        self.problem = random_problem(
            random.Random(seed), nodes, apps, memory_pressure=0.9, settings=bounded
        )
        self.plans = 0

    def _set_node(self, index: int, **changes) -> None:
        nodes = list(self.problem.nodes)
        nodes[index % len(nodes)] = dataclasses.replace(nodes[index % len(nodes)], **changes)
        self.problem = dataclasses.replace(self.problem, nodes=tuple(nodes))

    @rule(
        index=st.integers(0, 63),
        health=st.sampled_from([Health.FAILED, Health.SUSPECTED, Health.LEFT]),
    )
    def hurt(self, index: int, health: Health) -> None:
        self._set_node(index, health=health)

    @rule(index=st.integers(0, 63))
    def recover(self, index: int) -> None:
        self._set_node(index, health=Health.ALIVE, hold_down=True)

    @rule(index=st.integers(0, 63))
    def end_hold_down(self, index: int) -> None:
        self._set_node(index, hold_down=False)

    @rule(allowed=st.booleans())
    def restore(self, allowed: bool) -> None:
        self.problem = dataclasses.replace(self.problem, restore_allowed=allowed)

    @rule(index=st.integers(0, 63))
    def remove_app(self, index: int) -> None:
        if self.problem.apps:
            apps = list(self.problem.apps)
            del apps[index % len(apps)]
            self.problem = dataclasses.replace(self.problem, apps=tuple(apps))

    @rule(index=st.integers(0, 63))
    def load_fails(self, index: int) -> None:
        """A replica of the current plan fails to load where it is."""
        if self.problem.current.replicas:
            replica = self.problem.current.replicas[index % len(self.problem.current.replicas)]
            unloadable = self.problem.unloadable | {(replica.node_id, replica.variant)}
            self.problem = dataclasses.replace(self.problem, unloadable=unloadable)

    @rule()
    def load_failures_forgotten(self) -> None:
        self.problem = dataclasses.replace(self.problem, unloadable=frozenset())

    @rule()
    def plan(self) -> None:
        problem = self.problem
        result = plan_for(problem)
        assert violations(problem, result.plan) == []
        kinds = [a.kind for a in result.actions]
        assert kinds.count(ActionKind.LOAD) <= LOADS_MAX
        assert kinds.count(ActionKind.PREFETCH) <= PREFETCHES_MAX
        before = {(r.app, r.node_id): r for r in problem.current.replicas}
        nodes = {n.node_id: n for n in problem.nodes}
        for replica in result.plan.replicas:
            old = before.get((replica.app, replica.node_id))
            if old == replica:
                continue
            node = nodes[replica.node_id]
            if old is not None and old.variant == replica.variant and replica.role is Role.COLD:
                continue  # a demotion to cold adds nothing
            assert node.health is Health.ALIVE, (replica, node)
            if replica.role is Role.PRIMARY:
                assert not node.hold_down, (replica, node)
        assert not [r for r in result.plan.replicas if (r.node_id, r.variant) in problem.unloadable]
        assert result.plan.epoch == problem.current.epoch + (1 if result.changed else 0)
        self.problem = problem.advanced(result.plan)
        self.plans += 1

    @invariant()
    def epochs_only_grow(self) -> None:
        assert self.problem.current.epoch <= self.plans


TestClusterLife = ClusterLife.TestCase
TestClusterLife.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
