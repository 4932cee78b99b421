"""The cluster secret: never a public default. A peer on loopback without one generates its
own, kept in its data dir (mode 0600); off loopback it refuses to start."""

from __future__ import annotations

import os
import stat

import pytest

from redge.agent.config import GENERATED_SECRET_FILENAME, load
from redge.agent.errors import ConfigError

LOOPBACK = {"node_id": "n1", "http": "127.0.0.1:1", "raft": "127.0.0.1:2", "heartbeat": "127.0.0.1:3"}


def test_a_loopback_peer_without_a_secret_generates_one_for_itself(tmp_path):
    first = load(dict(LOOPBACK, data_dir=str(tmp_path / "a")), {})
    path = tmp_path / "a" / GENERATED_SECRET_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.secret) == 64 and first.secret == path.read_text().strip()
    assert load(dict(LOOPBACK, data_dir=str(tmp_path / "a")), {}).secret == first.secret  # kept across restarts
    other = load(dict(LOOPBACK, data_dir=str(tmp_path / "b")), {})
    assert other.secret != first.secret  # nothing fixed, nothing shared by accident


def test_a_given_secret_wins_and_nothing_is_generated(tmp_path):
    config = load(dict(LOOPBACK, data_dir=str(tmp_path)), {"REDGE_SECRET": "s3cret-s3cret"})
    assert config.secret == "s3cret-s3cret"
    assert not (tmp_path / GENERATED_SECRET_FILENAME).exists()


@pytest.mark.parametrize(("mode", "content", "problem"), [
    (0o644, "abc\n", "readable by other users"),
    (0o600, "\n", "is empty"),
])
def test_a_generated_secret_others_can_read_or_an_empty_one_is_refused(tmp_path, mode, content, problem):
    path = tmp_path / GENERATED_SECRET_FILENAME
    path.write_text(content)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=problem):
        load(dict(LOOPBACK, data_dir=str(tmp_path)), {})


def test_off_loopback_a_peer_without_a_secret_refuses_to_start(tmp_path):
    values = dict(LOOPBACK, http="10.0.0.1:1", raft="10.0.0.1:2", heartbeat="10.0.0.1:3", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="refusing to start"):
        load(values, {})
    assert not (tmp_path / GENERATED_SECRET_FILENAME).exists()


@pytest.mark.parametrize(("source", "value", "expected"), [
    ("env", "r3ad", "r3ad"),
    ("file", "r3ad-from-file\n", "r3ad-from-file"),
    ("none", "", ""),
])
def test_the_read_token_comes_from_its_file_or_the_environment(tmp_path, source, value, expected):
    values = dict(LOOPBACK, data_dir=str(tmp_path))
    environ = {"REDGE_READ_TOKEN": value} if source == "env" else {}
    if source == "file":
        (tmp_path / "read-token").write_text(value)
        values["read_token_file"] = str(tmp_path / "read-token")
    assert load(values, environ).read_token == expected


@pytest.mark.parametrize("token", ["caf\u00e9", "tab\there", "\u00ff\u00fe"], ids=["accent", "control", "latin1"])
@pytest.mark.parametrize("name", ["REDGE_READ_TOKEN", "REDGE_ADMIN_TOKEN"])
def test_a_token_that_cannot_travel_in_an_http_header_is_refused_at_start(tmp_path, name, token):
    with pytest.raises(ConfigError, match="printable ASCII"):
        load(dict(LOOPBACK, data_dir=str(tmp_path)), {name: token})
