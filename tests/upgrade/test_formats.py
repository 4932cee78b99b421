"""Command and snapshot formats: what each format writes, and how each is read.

The rules (consensus/commands.py): a field of a later format is written only once the
cluster's committed format allows it; format 1 is read exactly as the builds before formats
did; unknown fields of format 2 and later are ignored; a command above the committed format
is refused by every replica alike."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.consensus import commands as c
from redge.consensus.errors import FormatTooNew, MalformedCommand
from redge.consensus.state import ClusterState

REGISTER = c.RegisterApp("det", ("big", "small"), "critical", 100.0, "warm", 5, proposer_id="n1")


def cluster() -> ClusterState:
    state = ClusterState()
    for index in (1, 2, 3):
        assert state.apply(c.Join(f"n{index}", f"h:{index}", f"r:{index}", f"b:{index}", 1, 1)).accepted
    return state


def test_format_1_is_the_encoding_of_the_builds_before_formats():
    payload = orjson.loads(c.encode(REGISTER, 1))
    assert "v" not in payload and "proposer_id" not in payload
    before = dataclasses.asdict(REGISTER)
    del before["proposer_id"]
    assert payload == {**before, "variants": list(REGISTER.variants), "type": "register_app"}


def test_format_2_carries_its_version_and_its_fields():
    payload = orjson.loads(c.encode(REGISTER, 2))
    assert payload["v"] == 2 and payload["proposer_id"] == "n1"
    assert c.decode_versioned(c.encode(REGISTER, 2)) == (REGISTER, 2)
    assert c.decode_versioned(c.encode(REGISTER, 1)) == (dataclasses.replace(REGISTER, proposer_id=""), 1)


def test_a_build_never_writes_a_format_newer_than_it_knows():
    assert orjson.loads(c.encode(REGISTER, c.FORMAT_VERSION + 5))["v"] == c.FORMAT_VERSION


@pytest.mark.parametrize(
    ("version", "accepted"),
    [(None, False), (2, True), (3, True), (99, True)],
    ids=["no-version", "v2", "v3", "v99"],
)
def test_unknown_fields_are_an_error_in_format_1_and_ignored_after(version, accepted):
    payload = {"type": "probe", "proposer_id": "n1", "token": "t", "at_ms": 1, "from_the_future": [1, 2]}
    if version is not None:
        payload["v"] = version
    data = orjson.dumps(payload)
    if accepted:
        assert c.decode_versioned(data) == (c.Probe("n1", "t", 1), version)
    else:
        with pytest.raises(MalformedCommand, match="unknown fields"):
            c.decode(data)


@pytest.mark.parametrize("version", [1, 0, -1, "2", 2.0, True, None, [2]], ids=repr)
def test_a_v_that_is_not_a_format_of_2_or_more_is_an_unknown_field_as_before_formats(version):
    """The builds before formats refuse any "v" as an unknown field: so does this one, with
    the same words, unless it is a format they could never be sent."""
    with pytest.raises(MalformedCommand, match=r"probe: unknown fields \['v'\]"):
        c.decode(orjson.dumps({"type": "probe", "proposer_id": "n1", "token": "t", "at_ms": 1, "v": version}))


def raise_format(state: ClusterState, version: int = 2, members: tuple[str, ...] | None = None) -> bytes:
    return c.encode(c.RaiseFormat(version, "n1", 7, members=state.format_members() if members is None else members),
                    state.format_version)


def test_a_command_above_the_committed_format_is_refused_until_it_is_raised():
    state = cluster()
    applied = state.applied_count
    outcome = state.apply_encoded(c.encode(REGISTER, 2).replace(b'"v":2', b'"v":3'))
    assert not outcome.accepted and "format 3 is above the cluster's format 1" in outcome.reason
    assert state.applied_count == applied  # recorded as a malformed entry is, by every build that reads formats
    assert "det" not in state.apps
    assert state.apply_encoded(raise_format(state)).accepted
    assert state.format_version == 2
    assert state.apply_encoded(c.encode(REGISTER, 2)).accepted and "det" in state.apps
    # Format 1 commands stay valid in a format 2 cluster: a peer that joins writes them.
    assert state.apply_encoded(c.encode(c.Probe("n2", "t", 8), 1)).accepted


def test_a_command_type_of_a_later_format_is_never_even_proposed():
    with pytest.raises(FormatTooNew, match="rotate_watch needs format 2"):
        c.encode(c.RotateWatch(1, "n1", 5), 1)


def test_a_raise_is_void_if_the_members_changed_since_they_were_asked():
    """Recorded exactly as a build that does not know RaiseFormat records it, so that such a
    member, had it slipped in, holds the same state as the others."""
    state = cluster()
    asked = state.format_members()
    rejoin = c.Join("n3", "h:3", "r:3", "b:3", 2, 9)  # n3 came back, maybe on another build, after the ask
    assert state.apply(rejoin).accepted
    applied, rejected = state.applied_count, state.rejected_count
    outcome = state.apply_encoded(raise_format(state, members=asked))
    assert not outcome.accepted and outcome.reason == "unknown command type 'raise_format'"
    assert state.format_version == 1 and state.applied_count == applied and state.rejected_count == rejected + 1
    assert state.events[-1].kind == "command_rejected" and state.events[-1].at_ms == 0
    assert state.apply_encoded(raise_format(state)).accepted and state.format_version == 2


@pytest.mark.parametrize(("reads_format", "accepted"), [(0, False), (1, False), (2, True), (3, True)])
def test_from_format_2_a_join_must_read_the_clusters_format(reads_format, accepted):
    state = cluster()
    state.apply(c.RaiseFormat(2, "n1", 1))
    join = c.Join("n4", "h:4", "r:4", "b:4", 1, 2, reads_format=reads_format)
    outcome = state.apply_encoded(c.encode(join, 2))
    assert outcome.accepted is accepted
    if not accepted:
        assert "upgrade it" in outcome.reason and "n4" not in state.members
    # A Join of the previous build carries no reads_format at all: refused the same way.
    if reads_format == 0:
        assert not state.apply_encoded(c.encode(join, 1)).accepted


def test_the_format_only_goes_up():
    state = cluster()
    assert state.apply(c.RaiseFormat(2, "n1", 1)).accepted
    outcome = state.apply(c.RaiseFormat(1, "n1", 2))
    assert outcome.accepted and outcome.duplicate and state.format_version == 2


def test_events_of_format_2_say_whose_clock_their_time_is():
    state = cluster()
    state.apply(c.Probe("n1", "t", 1))
    assert all("clock" not in e.fields for e in state.events)  # format 1: as the builds before
    state.apply(c.RaiseFormat(2, "n3", 2))
    state.apply_encoded(c.encode(REGISTER, 2))
    state.apply(c.Suspect("n2", "n3", 1, "timeout", 3))
    kinds = {e.kind: e.fields.get("clock") for e in state.events}
    assert kinds["format_raised"] == "n3" and kinds["app_registered"] == "n1" and kinds["suspicion"] == "n2"


def test_a_snapshot_of_format_1_is_written_as_the_builds_before_formats_wrote_it():
    assert "format_version" not in orjson.loads(cluster().to_bytes())


@settings(deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k.isidentifier()),
                             st.integers() | st.text(max_size=5), max_size=4))
def test_a_snapshot_from_a_newer_build_is_read_without_its_new_fields(extra):
    state = cluster()
    state.apply(c.RaiseFormat(2, "n1", 1))
    state.apply(REGISTER)
    data = orjson.loads(state.to_bytes())
    extra = {f"new_{key}": value for key, value in extra.items()}
    newer = {**data, **extra}
    newer["members"] = [{**m, **extra} for m in data["members"]]
    newer["apps"] = [{**a, **extra} for a in data["apps"]]
    newer["events"] = [{**e, **extra} for e in data["events"]]
    newer["settings"] = {**data["settings"], **extra}
    read = ClusterState.from_dict(newer)
    assert read.to_bytes() == state.to_bytes()


def test_the_watch_round_is_committed_from_format_2_and_only_moves_one_at_a_time():
    state = cluster()
    state.apply(c.RaiseFormat(2, "n1", 6))
    assert state.apply_encoded(c.encode(c.RotateWatch(1, "n1", 7), 2)).accepted and state.watch_round == 1
    for stale_or_gap in (1, 3):
        outcome = state.apply(c.RotateWatch(stale_or_gap, "n2", 8))
        assert outcome.duplicate and state.watch_round == 1
    assert ClusterState.from_bytes(state.to_bytes()).watch_round == 1
