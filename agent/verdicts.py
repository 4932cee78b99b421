"""What one observer's failure detector says about a node (agent/detector.py): verdicts for
the cluster, probes for the shell to send. Plain values."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# verdicts


class SuspectReason(enum.StrEnum):
    # Every reason means "and it answered none of our authenticated probes in time".
    PHI = "phi"  # heartbeats stopped: phi crossed the threshold
    UNREACHABLE = "unreachable"  # the kernel answered port unreachable (ECONNREFUSED)
    DISCONNECTED = "disconnected"  # the Raft connection to the node dropped
    SILENT = "silent"  # watched but never heard from, past the first-heartbeat grace


class Hint(enum.StrEnum):
    """Evidence that costs an attacker nothing, or that harmless events also produce: it
    starts probes, never a suspicion by itself."""

    REFUSED = "refused"  # ICMP port unreachable on a heartbeat socket: anyone can forge it
    DISCONNECTED = "disconnected"  # the Raft TCP connection to the node dropped (a process exit closes it)


class DegradedReason(enum.StrEnum):
    SLOW = "slow"  # inference latency above factor x SLO over the window
    TIMEOUTS = "timeouts"  # heartbeats arrive but requests time out
    LATE = "late"  # heartbeats late or lost, but it answers authenticated probes


@dataclass(frozen=True, slots=True)
class Suspect:
    node_id: str
    incarnation: int
    reason: SuspectReason
    phi: float
    at_ms: float


@dataclass(frozen=True, slots=True)
class Recover:
    node_id: str
    incarnation: int
    at_ms: float


@dataclass(frozen=True, slots=True)
class Restarted:
    """The node came back with a higher incarnation: its previous life is over
    (and so is whatever it had loaded), whether or not anyone suspected it."""

    node_id: str
    previous_incarnation: int
    incarnation: int
    at_ms: float


@dataclass(frozen=True, slots=True)
class Quiet:
    """The node has been silent for almost long enough to be suspected (`quiet_lead_ms`
    short of it). Not an opinion about the node: if it leads Raft, start an election."""

    node_id: str
    incarnation: int
    silent_ms: float
    at_ms: float


@dataclass(frozen=True, slots=True)
class Degraded:
    node_id: str
    reason: DegradedReason
    # median latency / SLO over the window for SLOW; timeouts in the window for TIMEOUTS
    measure: float
    at_ms: float


@dataclass(frozen=True, slots=True)
class Restored:
    node_id: str
    at_ms: float


@dataclass(frozen=True, slots=True)
class Probe:
    """Not a verdict: the monitor asks the shell to send one authenticated ping to `node_id`
    for probe round `round_id`, and, when `helpers` are named, to ask each of them to ping it
    too (SWIM's ping-req). An answer goes back to `Monitor.on_ack` with the round id."""

    node_id: str
    round_id: int
    attempt: int
    helpers: tuple[str, ...]
    at_ms: float


Verdict = Suspect | Quiet | Recover | Restarted | Degraded | Restored
# What the monitor returns: verdicts for the cluster, probes for the shell to send.
Output = Verdict | Probe
