"""Profiles: the timings of a kind of network, chosen once per cluster.

A profile is one value that holds everything timed by the network a cluster runs on: the
failure detector's settings (heartbeats, suspicion, probes), Raft's timing (how fast a dead
leader is replaced), and how long proposals, forwarded requests and clients wait.
`enterprise` is servers on a LAN with sub-millisecond RTT; `iobt` is boards on lossy,
jittery WiFi, where timeouts must be several RTTs long or every lost packet would start an
election.

Where a timing is a multiple of the heartbeat interval it is derived from it
(`derived_settings`), so a user profile names the interval and what differs; a user profile
is a TOML file (`redge peer --profile path/to/edge.toml`, docs/operations.md#profiles).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redge.agent.detector_settings import ENTERPRISE, IOBT, DetectorSettings
from redge.consensus.timing import RaftTiming


@dataclass(frozen=True)
class Profile:
    name: str
    detector: DetectorSettings
    raft: RaftTiming
    proposal_timeout_s: float
    request_timeout_s: float
    forward_timeout_s: float
    # What the redge client waits by default for one call in all, and for one attempt.
    client_deadline_s: float = 5.0
    client_attempt_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.detector.name != self.name:
            raise ValueError(f"profile {self.name!r} holds detector settings named {self.detector.name!r}")
        for field in ("proposal_timeout_s", "request_timeout_s", "forward_timeout_s", "client_deadline_s",
                      "client_attempt_timeout_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be positive")
        if self.client_attempt_timeout_s > self.client_deadline_s:
            raise ValueError("client_attempt_timeout_s must not exceed client_deadline_s")

    @property
    def heartbeat_interval_ms(self) -> float:
        return self.detector.heartbeat_interval_ms


def derived_settings(name: str, heartbeat_interval_ms: float, **given: Any) -> DetectorSettings:
    """Detector settings whose interval-bound timings follow the heartbeat interval: the
    first-interval estimate and the longest check sleep are one interval, a stall of the
    observer is two, local health counts a lag of one. `given` overrides any of them and
    sets the rest (the phi threshold, the acceptable pause, ...)."""
    derived = {
        "first_heartbeat_estimate_ms": heartbeat_interval_ms,
        "max_check_interval_ms": heartbeat_interval_ms,
        "self_pause_threshold_ms": 2 * heartbeat_interval_ms,
        "local_health_lag_ms": heartbeat_interval_ms,
    }
    return DetectorSettings(name=name, heartbeat_interval_ms=heartbeat_interval_ms, **(derived | given))


def derived_raft(heartbeat_interval_ms: float, **given: Any) -> RaftTiming:
    """Raft timing with the leader's append-entries period at two heartbeat intervals."""
    values = {"election_timeout_min_s": 0.6, "election_timeout_max_s": 1.2,
              "append_entries_period_s": 2 * heartbeat_interval_ms / 1000}
    return RaftTiming(**(values | given))


def _built_in() -> dict[str, Profile]:
    # The detector's two settings are the measured ones (agent/detector.py); they are exactly
    # what `derived_settings` gives for their intervals, which tests/agent/test_profile.py pins.
    return {
        "enterprise": Profile(
            name="enterprise",
            detector=ENTERPRISE,
            # Raft's own election timeout is the backstop: followers stand in turns as soon
            # as their leader's connection drops or their detector finds it quiet, so this
            # only has to outlast a TCP retransmission on a lossy link (200 ms at least),
            # which at 150-300 ms it did not: leaders changed every ~20 s at 2 % loss.
            raft=derived_raft(ENTERPRISE.heartbeat_interval_ms, leader_fallback_s=0.3),
            proposal_timeout_s=2.0,
            request_timeout_s=5.0,
            forward_timeout_s=2.0,
            client_deadline_s=5.0,
            client_attempt_timeout_s=1.0,
        ),
        "iobt": Profile(
            name="iobt",
            detector=IOBT,
            raft=derived_raft(
                IOBT.heartbeat_interval_ms,
                connection_retry_s=0.25,
                # A vote's round trip on WiFi-like links is tens of ms: turns further apart.
                fast_election_first_s=0.01,
                fast_election_step_s=0.1,
                fast_election_jitter_s=0.01,
            ),
            proposal_timeout_s=5.0,
            request_timeout_s=10.0,
            forward_timeout_s=4.0,
            client_deadline_s=10.0,
            client_attempt_timeout_s=2.0,
        ),
    }


PROFILES: dict[str, Profile] = _built_in()

_PROFILE_KEYS = {f.name for f in dataclasses.fields(Profile)} - {"name", "detector", "raft"}


def load_profile(path: Path) -> Profile:
    """A user profile from TOML: `name`, `heartbeat_interval_ms`, and optional tables
    `[detector]` and `[raft]` and keys of Profile (timeouts) that override what is derived.
    Raises ValueError with every problem it found."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ValueError(f"cannot read the profile {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"the profile {path} is not valid TOML: {error}") from None
    base = PROFILES["enterprise"]
    name = data.pop("name", path.stem)
    interval = data.pop("heartbeat_interval_ms", None)
    detector = data.pop("detector", {})
    raft = data.pop("raft", {})
    unknown = sorted(set(data) - _PROFILE_KEYS)
    if unknown:
        raise ValueError(f"the profile {path} has unknown keys: {', '.join(unknown)}")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool):
        raise ValueError(f"the profile {path} needs heartbeat_interval_ms, a number")
    if not isinstance(detector, dict) or not isinstance(raft, dict):
        raise ValueError(f"the profile {path}: [detector] and [raft] must be tables")
    # What the interval does not decide comes from enterprise, scaled where it is a time.
    scale = float(interval) / base.heartbeat_interval_ms
    inherited = {
        f.name: getattr(base.detector, f.name) * (scale if "_ms" in f.name else 1)
        for f in dataclasses.fields(DetectorSettings)
        if f.name not in ("name", "heartbeat_interval_ms", "first_heartbeat_estimate_ms", "max_check_interval_ms",
                          "self_pause_threshold_ms", "local_health_lag_ms")
    }
    try:
        settings = derived_settings(str(name), float(interval), **(inherited | detector))
        timing = derived_raft(float(interval), **raft)
        return Profile(name=str(name), detector=settings, raft=timing,
                       **({key: getattr(base, key) for key in _PROFILE_KEYS} | data))
    except (TypeError, ValueError) as error:
        raise ValueError(f"the profile {path}: {error}") from None


def get_profile(name: str) -> Profile:
    """A built-in profile by name, or a user profile from a TOML file (a name ending .toml)."""
    if name.endswith(".toml"):
        return load_profile(Path(name))
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(sorted(PROFILES))}, "
                         f"or give a profile file (NAME.toml)") from None
