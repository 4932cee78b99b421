"""Profiles: the timings of a kind of network, chosen once per cluster.

A profile sets how fast Raft elects (and so how soon a dead leader is replaced), how often
heartbeats go out, and how long clients and proposals wait. `enterprise` is servers on a
LAN with sub-millisecond RTT; `iobt` is boards on lossy, jittery WiFi, where timeouts must
be several RTTs long or every lost packet would start an election.
"""

from __future__ import annotations

from dataclasses import dataclass

from redge.consensus.raft import RaftTiming


@dataclass(frozen=True)
class Profile:
    name: str
    raft: RaftTiming
    heartbeat_interval_ms: int
    proposal_timeout_s: float
    request_timeout_s: float
    forward_timeout_s: float


PROFILES: dict[str, Profile] = {
    "enterprise": Profile(
        name="enterprise",
        raft=RaftTiming(
            # Raft's own election timeout is the backstop: followers stand in turns as soon
            # as their leader's connection drops or their detector finds it quiet, so this
            # only has to outlast a TCP retransmission on a lossy link (200 ms at least),
            # which at 150-300 ms it did not: leaders changed every ~20 s at 2 % loss.
            election_timeout_min_s=0.6,
            election_timeout_max_s=1.2,
            append_entries_period_s=0.04,
            leader_fallback_s=0.3,
        ),
        heartbeat_interval_ms=20,
        proposal_timeout_s=2.0,
        request_timeout_s=5.0,
        forward_timeout_s=2.0,
    ),
    "iobt": Profile(
        name="iobt",
        raft=RaftTiming(
            election_timeout_min_s=0.6,
            election_timeout_max_s=1.2,
            append_entries_period_s=0.1,
            connection_retry_s=0.25,
            # A vote's round trip on WiFi-like links is tens of ms: turns further apart.
            fast_election_first_s=0.01,
            fast_election_step_s=0.1,
            fast_election_jitter_s=0.01,
        ),
        heartbeat_interval_ms=50,
        proposal_timeout_s=5.0,
        request_timeout_s=10.0,
        forward_timeout_s=4.0,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(sorted(PROFILES))}") from None
