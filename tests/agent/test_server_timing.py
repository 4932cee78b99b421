"""The Server-Timing header that inference responses carry (W3C Server Timing)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redge.agent.dataplane import parse_server_timing, server_timing

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz+-_", min_size=1, max_size=12)


@given(st.dictionaries(names, st.floats(0, 1e6, allow_nan=False), max_size=8))
def test_round_trip_to_the_microsecond(durations: dict[str, float]) -> None:
    parsed = parse_server_timing(server_timing(**durations))
    assert parsed.keys() == durations.keys()
    for name, value in durations.items():
        assert parsed[name] == pytest.approx(value, abs=0.0005)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("model;dur=12.5, hop;dur=0.4", {"model": 12.5, "hop": 0.4}),
        ('total;desc="all of it";dur="3"', {"total": 3.0}),
        ("cache;desc=hit, db;dur=53", {"db": 53.0}),  # no duration: skipped
        ("model;dur=abc, hop;dur=1", {"hop": 1.0}),  # unreadable duration: skipped
        ("", {}),
        (";dur=4", {}),
    ],
)
def test_parses_what_other_servers_send_too(value: str, expected: dict[str, float]) -> None:
    assert parse_server_timing(value) == expected
