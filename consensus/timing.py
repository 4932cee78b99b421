"""Raft's timings for a kind of network: plain values, so that a profile or a config can be
read without importing the Raft adapter (and pysyncobj behind it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RaftTiming:
    """Raft timing for a kind of network. Must satisfy pysyncobj's own rules:
    election_timeout_min_s > 3 * append_entries_period_s and the max above the min."""

    election_timeout_min_s: float
    election_timeout_max_s: float
    append_entries_period_s: float
    tick_period_s: float = 0.005
    connection_retry_s: float = 0.1
    # pysyncobj drops a connection that carried nothing for this long. Followers never talk to
    # each other between elections, so a short timeout keeps tearing down exactly the links
    # that the next election's vote requests need (and splits the vote). Dead peers are found
    # by the election timeout and TCP keepalive instead.
    connection_timeout_s: float = 30.0
    # A leader that heard from no majority for this long steps down (None: the election
    # timeout's max). Apart from the election timeout so that a cut-off leader stops taking
    # proposals soon even where followers wait long before standing on their own.
    leader_fallback_s: float | None = None
    # After the leader's connection drops, or our detector suspects it, followers stand for
    # election one after another in a fixed order (`fast_election_delay_s`): the first
    # after `fast_election_first_s`, each next one `fast_election_step_s` later, each with up
    # to `fast_election_jitter_s` of random delay. Random delays alone (the usual Raft
    # answer) either wait long or split the vote about once in ten; a staggered order
    # elects at the first candidate unless it is down or behind.
    fast_election_first_s: float = 0.001
    fast_election_step_s: float = 0.015
    fast_election_jitter_s: float = 0.001

    def to_conf_kwargs(self) -> dict[str, Any]:
        return {
            "raftMinTimeout": self.election_timeout_min_s,
            "raftMaxTimeout": self.election_timeout_max_s,
            "appendEntriesPeriod": self.append_entries_period_s,
            "autoTickPeriod": self.tick_period_s,
            "connectionRetryTime": self.connection_retry_s,
            "connectionTimeout": max(self.connection_timeout_s, self.election_timeout_max_s),
            "leaderFallbackTimeout": (
                self.leader_fallback_s if self.leader_fallback_s is not None else self.election_timeout_max_s
            ),
        }
