"""The parent's framing of the model host pipe and its pool of request segments (pure parts)."""

from __future__ import annotations

import socket
from multiprocessing.connection import Connection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redge.runtime.host import _frame, _next_frame, _PipeProtocol, _SegmentPool

messages = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=12,
)


@given(st.lists(messages, min_size=1, max_size=6), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_messages_survive_any_split_of_the_stream(sent: list, cuts: list[int]) -> None:
    received: list = []
    protocol = _PipeProtocol(received.append, lambda: None)
    stream = b"".join(_frame(message) for message in sent)
    position = 0
    for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        if position >= len(stream):
            break
        protocol.data_received(stream[position : position + cut])
        position += cut
    protocol.data_received(stream[position:])
    assert received == sent


def test_incomplete_frames_wait_for_the_rest() -> None:
    frame = _frame(("reply", 1))
    buffer = bytearray(frame[:3])
    assert _next_frame(buffer) is None and len(buffer) == 3
    buffer += frame[3:-1]
    assert _next_frame(buffer) is None
    buffer += frame[-1:]
    assert _next_frame(buffer) is not None and buffer == bytearray()


def test_frames_are_what_the_host_s_connection_reads_and_writes() -> None:
    """The host keeps a plain multiprocessing Connection: both ends must agree on the wire."""
    parent, child = socket.socketpair()
    connection = Connection(child.detach())
    try:
        parent.sendall(_frame((7, "infer", {"key": "k"})))
        assert connection.recv() == (7, "infer", {"key": "k"})
        connection.send((7, True, b"x" * 5000))
        buffer = bytearray()
        while (frame := _next_frame(buffer)) is None:
            buffer += parent.recv(65536)
        import pickle

        assert pickle.loads(frame) == (7, True, b"x" * 5000)
    finally:
        connection.close()
        parent.close()


def test_unreadable_replies_are_skipped_and_reading_goes_on() -> None:
    received: list = []
    protocol = _PipeProtocol(received.append, lambda: None)
    garbage = b"not a pickle"
    protocol.data_received(len(garbage).to_bytes(4, "big") + garbage + _frame("after"))
    assert received == ["after"]


@pytest.mark.parametrize(
    ("sizes", "created", "free_after"),
    [
        ([1000, 1000, 1000], 1, 1),  # one segment serves requests one after another
        ([100_000, 70_000], 1, 1),  # a smaller request fits the 128 KiB segment of a larger one
        ([70_000, 200_000], 2, 2),  # a larger one needs a new segment; both are kept
    ],
)
def test_pool_reuses_segments_that_fit(sizes: list[int], created: int, free_after: int) -> None:
    pool = _SegmentPool(keep_max=4)
    try:
        for size in sizes:
            segment = pool.take(size)
            assert segment.size >= size
            pool.give(segment)
        assert pool.created_total == created and len(pool) == free_after
    finally:
        pool.close()


def test_pool_keeps_at_most_keep_max_and_drop_never_returns() -> None:
    pool = _SegmentPool(keep_max=2)
    try:
        taken = [pool.take(1000) for _ in range(4)]
        pool.drop(taken.pop())
        for segment in taken:
            pool.give(segment)
        assert len(pool) == 2 and pool.created_total == 4
    finally:
        pool.close()
    assert len(pool) == 0


def test_sweep_removes_only_segments_of_processes_that_are_gone(tmp_path) -> None:
    import os
    import subprocess

    from redge.runtime.host import SEGMENT_PREFIX, sweep_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()
    names = {
        "dead": f"{SEGMENT_PREFIX}{gone.pid}_0_abcd",
        "alive": f"{SEGMENT_PREFIX}{os.getpid()}_0_abcd",
        "foreign": "psm_1234",
        "odd": f"{SEGMENT_PREFIX}notapid_0",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert sweep_orphans(tmp_path) == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
    assert sweep_orphans(tmp_path / "missing") == []
