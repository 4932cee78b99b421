"""Operational errors of the consensus layer.

Programmer errors assert; these are the failures a caller is expected to handle. A
`ProposalTimeout` is an unknown outcome, not a failure: the command may still commit, which
is why every command is idempotent.
"""


class ConsensusError(Exception):
    """Base of the errors a caller of the consensus layer can expect."""


class NoLeader(ConsensusError):
    """No Raft leader is known right now (an election is running, or there is no quorum)."""


class NotLeader(ConsensusError):
    """The operation must run on the leader and this node is not it."""


class NoQuorum(ConsensusError):
    """The proposal could not be committed: a majority of the group did not answer."""


class ProposalTimeout(ConsensusError):
    """The deadline passed before the commit was seen. The outcome is unknown."""


class MembershipChangeRefused(ConsensusError):
    """Raft refused a membership change (another change is in flight, or the node is known)."""


class MalformedCommand(ConsensusError):
    """The bytes do not decode to a known command."""


class FormatTooNew(ConsensusError):
    """A command of a format above the cluster's committed one: it is not proposed at all."""
