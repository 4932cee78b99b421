"""The narrow ports a peer's duties work through, handed to them when the peer is wired.

A duty sees the committed state (`read`), proposes commands, asks whether this peer leads,
and changes the Raft voters: nothing else of the peer. The peer implements them over its
Raft node (agent/peer.py `PeerCluster`); tests and simulations implement them over a plain
`ClusterState` and a fake clock (tests/agent/test_leader_simulation.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, TypeVar

from redge.consensus import commands as c
from redge.consensus.state import ClusterState, Outcome

T = TypeVar("T")


class ClusterPort(Protocol):
    node_id: str

    def read(self, reader: Callable[[ClusterState], T]) -> T:
        """Run `reader` on the committed state (briefly, under its lock)."""
        ...

    def leading(self) -> bool:
        """This peer is the Raft leader, and its replica follows the cluster's state."""
        ...

    def following(self) -> bool:
        """This peer's replica follows the cluster's state (it read every snapshot it got)."""
        ...

    def partners(self) -> list[str]:
        """The Raft addresses of the other voters."""
        ...

    async def propose(self, command: c.Command, timeout_s: float | None = None) -> Outcome:
        """Commit `command` (within `timeout_s`, default the profile's proposal timeout);
        raises ConsensusError when the cluster cannot commit now."""
        ...

    async def remove_voter(self, raft_address: str) -> None:
        ...


class RaftTransport(Protocol):
    """The Raft connections' hooks failure detection uses (consensus/raft.py RaftNode has them)."""

    def partner_connected(self, address: str) -> bool:
        """Whether this node's connection to the partner at `address` is up (any thread)."""
        ...

    def on_partner_disconnected(self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], None]) -> None:
        """Call `callback(address)` on `loop` when a partner's connection drops."""
        ...

    def hasten_election(self, suspected_address: str) -> bool:
        """Stand for election now if the suspected node leads and it is this node's turn."""
        ...
