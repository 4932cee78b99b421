"""The order in which followers stand for election when their leader is gone."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redge.agent.profile import get_profile
from redge.consensus.raft import fast_election_delay_s, should_stand_early
from redge.consensus.timing import RaftTiming

ENTERPRISE = get_profile("enterprise").raft
ADDRESSES = [f"127.0.0.1:{9100 + i}" for i in range(7)]


@given(st.integers(2, 7), st.data())
def test_every_follower_gets_its_own_turn_apart_by_more_than_the_jitter(size, data):
    voters = ADDRESSES[:size]
    leader = data.draw(st.sampled_from(voters))
    draws = data.draw(st.lists(st.floats(0, 1), min_size=size, max_size=size))
    delays = sorted(
        fast_election_delay_s(ENTERPRISE, me, [v for v in voters if v != me], leader, draw)
        for me, draw in zip(voters, draws, strict=True)
        if me != leader
    )
    assert delays[0] <= ENTERPRISE.fast_election_first_s + ENTERPRISE.fast_election_jitter_s
    gaps = [b - a for a, b in itertools.pairwise(delays)]
    assert all(gap >= ENTERPRISE.fast_election_step_s - ENTERPRISE.fast_election_jitter_s - 1e-9 for gap in gaps)
    assert delays[-1] < ENTERPRISE.election_timeout_min_s  # all turns come before Raft's own timeout


def test_the_order_is_the_same_whoever_computes_it_and_leaves_the_leader_out():
    voters = ADDRESSES[:3]  # n1 leads; n2 and n3 follow
    n2 = fast_election_delay_s(ENTERPRISE, voters[1], [voters[0], voters[2]], voters[0], 0.0)
    n3 = fast_election_delay_s(ENTERPRISE, voters[2], [voters[0], voters[1]], voters[0], 0.0)
    assert (n2, n3) == (ENTERPRISE.fast_election_first_s, ENTERPRISE.fast_election_first_s + ENTERPRISE.fast_election_step_s)


def test_iobt_turns_are_further_apart_than_a_wifi_round_trip():
    iobt = get_profile("iobt").raft
    assert iobt.fast_election_step_s - iobt.fast_election_jitter_s >= 0.07  # 2 x (20 + 15) ms


@pytest.mark.parametrize(
    ("leader", "last_leader", "gone", "is_leader", "election_running", "expected"),
    [
        ("n1", "n1", "n1", False, False, True),  # our leader dropped or is suspected
        ("n1", "n1", "n2", False, False, False),  # another follower: no election for that
        (None, "n1", "n1", False, False, True),  # we refused a candidate and forgot n1: our turn still comes
        (None, "n1", "n1", False, True, False),  # we stand, or voted this term: let that election finish
        (None, "n1", "n2", False, False, False),
        (None, None, "n1", False, False, False),  # never followed anyone (starting up)
        ("n3", "n3", "n1", False, False, False),  # a new leader is known: the old one's loss changes nothing
        ("n1", "n1", "n1", True, False, False),  # pysyncobj says we lead: nothing to stand for
        (None, "n2", "n1", True, False, False),
    ],
)
def test_who_stands_early(leader, last_leader, gone, is_leader, election_running, expected):
    decision = should_stand_early(leader, last_leader, gone, is_leader=is_leader, election_running=election_running)
    assert decision is expected


@pytest.mark.parametrize(
    ("fallback_s", "expected_s"),
    [(None, 1.2), (0.3, 0.3)],
)
def test_a_leader_steps_down_after_its_own_fallback_or_the_election_timeout(fallback_s, expected_s):
    timing = RaftTiming(election_timeout_min_s=0.6, election_timeout_max_s=1.2, append_entries_period_s=0.04,
                        leader_fallback_s=fallback_s)
    conf = timing.to_conf_kwargs()
    assert conf["leaderFallbackTimeout"] == expected_s
    assert (conf["raftMinTimeout"], conf["raftMaxTimeout"]) == (0.6, 1.2)


def test_enterprise_raft_timeout_outlasts_a_tcp_retransmission_and_its_leader_steps_down_sooner():
    # Raft's own timeout is the backstop (elections come in turns on a dropped, quiet or
    # suspected leader): it must outlast a retransmitted segment (Linux RTO >= 200 ms).
    assert ENTERPRISE.election_timeout_min_s >= 0.4
    assert ENTERPRISE.leader_fallback_s is not None and ENTERPRISE.leader_fallback_s < ENTERPRISE.election_timeout_min_s
