"""The watch-rotation setting: accepted values, and the round every peer derives from it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redge.agent.config import load
from redge.agent.errors import ConfigError
from redge.agent.watching import watch_round

BASE = {"node_id": "n1", "http": "127.0.0.1:1", "raft": "127.0.0.1:2", "heartbeat": "127.0.0.1:3"}
ENVIRON = {"REDGE_SECRET": "s3cret-s3cret"}


@pytest.mark.parametrize(("value", "accepted"), [(0, True), (60, True), (10.0, True), (5, False), (-1, False), ("x", False)])
def test_watch_rotation_is_off_or_at_least_ten_seconds(tmp_path, value, accepted):
    values = dict(BASE, data_dir=str(tmp_path), watch_rotation_s=value)
    if accepted:
        assert load(values, ENVIRON).watch_rotation_s == value
    else:
        with pytest.raises(ConfigError, match="watch-rotation-s"):
            load(values, ENVIRON)


@given(st.floats(0, 1e10, allow_nan=False), st.floats(10, 86_400))
def test_rounds_only_go_forward_and_turn_on_multiples_of_the_period(now_s, rotation_s):
    round_number = watch_round(now_s, rotation_s)
    assert round_number * rotation_s <= now_s < (round_number + 1) * rotation_s + 1e-6 * rotation_s
    assert watch_round(now_s + rotation_s, rotation_s) >= round_number + 1 - 1e-9
    assert watch_round(now_s, 0.0) == 0
