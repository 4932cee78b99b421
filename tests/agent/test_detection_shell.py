"""How the peer's detection shell turns verdicts into election turns and proposals (fakes
for the peer and Raft; the real path runs in tests/cluster/test_detection_cluster.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from redge.agent.detection import DetectionConfig, FailureDetection
from redge.agent.metrics import PeerMetrics
from redge.agent.profile import get_profile
from redge.agent.verdicts import Quiet, Recover, Suspect, SuspectReason


class FakeRaft:
    def __init__(self, leader_address: str) -> None:
        self.leader_address = leader_address
        self.hastened: list[str] = []
        self.state = SimpleNamespace(
            members={n: SimpleNamespace(raft_address=f"127.0.0.1:90{i}", incarnation=1) for i, n in enumerate(["n1", "n2", "n3"])}
        )

    def read(self, reader):
        return reader(self.state)

    def hasten_election(self, address: str) -> bool:
        if address != self.leader_address:
            return False
        self.hastened.append(address)
        return True


def shell(raft: FakeRaft) -> tuple[FailureDetection, list]:
    proposed: list = []

    async def propose(command, timeout_s):
        proposed.append(command)
        return SimpleNamespace(accepted=True, reason="")

    cluster = SimpleNamespace(node_id="n1", read=raft.read, propose=propose)
    profile = get_profile("enterprise")
    config = DetectionConfig(heartbeat_address="127.0.0.1:1", secret="s", settings=profile.detector,
                             proposal_timeout_s=profile.proposal_timeout_s)
    detection = FailureDetection(cluster, raft, PeerMetrics("n1"), config)
    detection._watched = {"n2", "n3"}
    return detection, proposed


@pytest.mark.parametrize(
    ("verdict", "hastened", "proposes"),
    [
        (Quiet("n2", 1, 80.0, 0.0), ["127.0.0.1:901"], False),  # the leader went quiet: our turn, no opinion
        (Quiet("n3", 1, 80.0, 0.0), [], False),  # a follower went quiet: nothing
        (Suspect("n2", 1, SuspectReason.PHI, 8.1, 0.0), ["127.0.0.1:901"], True),
        (Suspect("n3", 1, SuspectReason.PHI, 8.1, 0.0), [], True),
        (Quiet("n9", 1, 80.0, 0.0), [], False),  # not ours to watch (a verdict from before a rotation)
        (Suspect("n9", 1, SuspectReason.PHI, 8.1, 0.0), [], False),
        (Recover("n2", 1, 0.0), [], False),  # nothing was held: nothing to withdraw
    ],
)
def test_verdicts_map_to_election_turns_and_proposals(verdict, hastened, proposes):
    async def scenario():
        raft = FakeRaft(leader_address="127.0.0.1:901")  # n2 leads
        detection, proposed = shell(raft)
        detection._on_verdict(verdict)
        await asyncio.gather(*detection._proposals.values())
        return raft.hastened, proposed

    done_hastened, proposed = asyncio.run(scenario())
    assert done_hastened == hastened
    assert bool(proposed) is proposes
    if proposes:
        assert (proposed[0].target_id, proposed[0].observer_id) == (verdict.node_id, "n1")

