"""One Profile per kind of network: detector settings, Raft timing and deadlines in one
value, the interval-bound timings derived from the heartbeat interval, user profiles from
TOML, one registry."""

from __future__ import annotations

import dataclasses

import pytest

from redge.agent.client import AsyncClient
from redge.agent.config import load
from redge.agent.detector_settings import DetectorSettings
from redge.agent.errors import ConfigError
from redge.agent.profile import PROFILES, derived_raft, derived_settings, get_profile, load_profile

DERIVED = ("first_heartbeat_estimate_ms", "max_check_interval_ms", "self_pause_threshold_ms", "local_health_lag_ms")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_built_in_profiles_are_what_their_interval_derives(name):
    profile = PROFILES[name]
    interval = profile.heartbeat_interval_ms
    rest = {f.name: getattr(profile.detector, f.name) for f in dataclasses.fields(DetectorSettings)
            if f.name not in (*DERIVED, "name", "heartbeat_interval_ms")}
    assert derived_settings(name, interval, **rest) == profile.detector
    assert profile.raft.append_entries_period_s == pytest.approx(2 * interval / 1000)
    assert profile.detector.name == profile.name == name


@pytest.mark.parametrize(("interval", "expected"), [
    (20.0, {"first_heartbeat_estimate_ms": 20.0, "max_check_interval_ms": 20.0, "self_pause_threshold_ms": 40.0}),
    (50.0, {"first_heartbeat_estimate_ms": 50.0, "max_check_interval_ms": 50.0, "self_pause_threshold_ms": 100.0}),
    (200.0, {"first_heartbeat_estimate_ms": 200.0, "max_check_interval_ms": 200.0, "self_pause_threshold_ms": 400.0}),
])
def test_a_user_profile_derives_from_its_interval(tmp_path, interval, expected):
    path = tmp_path / "field.toml"
    path.write_text(f"heartbeat_interval_ms = {interval}\nproposal_timeout_s = 7.5\n")
    profile = load_profile(path)
    assert profile.name == "field" and profile.proposal_timeout_s == 7.5
    for key, value in expected.items():
        assert getattr(profile.detector, key) == value
    assert profile.raft == derived_raft(interval)
    # Times it does not derive scale with the interval from the enterprise profile's.
    scale = interval / PROFILES["enterprise"].heartbeat_interval_ms
    assert profile.detector.acceptable_heartbeat_pause_ms == pytest.approx(
        PROFILES["enterprise"].detector.acceptable_heartbeat_pause_ms * scale)


def test_a_user_profile_overrides_what_it_names(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text('name = "lab"\nheartbeat_interval_ms = 30\nclient_deadline_s = 3\n'
                    "[detector]\nphi_threshold = 10.0\nprobe_timeout_ms = 40\n[raft]\nelection_timeout_max_s = 2.0\n")
    profile = get_profile(str(path))
    assert (profile.name, profile.detector.phi_threshold, profile.detector.probe_timeout_ms) == ("lab", 10.0, 40)
    assert profile.raft.election_timeout_max_s == 2.0 and profile.client_deadline_s == 3


@pytest.mark.parametrize(("text", "problem"), [
    ("proposal_timeout_s = 1\n", "needs heartbeat_interval_ms"),
    ("heartbeat_interval_ms = 20\nspeed = 3\n", "unknown keys: speed"),
    ("heartbeat_interval_ms = -5\n", "heartbeat_interval_ms must be positive"),
    ("heartbeat_interval_ms = 20\n[detector]\nphi_threshold = 0\n", "phi_threshold must be positive"),
    ("heartbeat_interval_ms = 20\n[detector]\nphi = 8\n", "unexpected keyword"),
    ("heartbeat_interval_ms = 20\nclient_attempt_timeout_s = 9\n", "must not exceed"),
    ("heartbeat_interval_ms = [", "not valid TOML"),
])
def test_a_bad_user_profile_says_what_is_wrong(tmp_path, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_profile(path)


def test_a_peer_config_takes_a_profile_file_and_refuses_a_bad_one(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("heartbeat_interval_ms = 25\n")
    bad.write_text("heartbeat_interval_ms = 0\n")
    base = {"node_id": "n1", "http": "127.0.0.1:1", "raft": "127.0.0.1:2", "heartbeat": "127.0.0.1:3",
            "data_dir": str(tmp_path / "data")}
    assert load({**base, "profile": str(good)}, {}).profile == str(good)
    with pytest.raises(ConfigError, match="heartbeat_interval_ms must be positive"):
        load({**base, "profile": str(bad)}, {})
    with pytest.raises(ConfigError, match="unknown profile 'lan'"):
        load({**base, "profile": "lan"}, {})


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_client_deadlines_come_from_the_profile(name):
    client = AsyncClient(["http://127.0.0.1:1"], profile=name)
    assert client.deadline_s == PROFILES[name].client_deadline_s
    assert client.attempt_timeout_s == PROFILES[name].client_attempt_timeout_s
    assert AsyncClient(["http://127.0.0.1:1"], profile=name, deadline_s=1.5).deadline_s == 1.5
