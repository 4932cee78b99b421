"""The pysyncobj shim: the pinned version's internals exist, and the frame guard holds.

The guard is tried as an attacker would: raw TCP to a real Raft node's port, without the
cluster secret. Each hostile connection must be closed on its header (before its body is
buffered), counted by reason, and the node must keep committing meanwhile.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time

import pytest

from redge.agent.profile import get_profile
from redge.chaos.cluster import free_ports, wait_until_async
from redge.consensus import commands as c
from redge.consensus import shim
from redge.consensus.raft import RaftNode, frame_stats

LIMIT = shim.FRAME_BYTES_MAX


@pytest.mark.parametrize(
    ("length", "limit", "expected"),
    [
        (1, LIMIT, None),
        (LIMIT, LIMIT, None),
        (LIMIT + 1, LIMIT, "oversized"),
        (0x7FFFFFFF, LIMIT, "oversized"),
        (0, LIMIT, "bad_length"),
        (-1, LIMIT, "bad_length"),
        (-(2**31), LIMIT, "bad_length"),
        (5000, shim.UNAUTHENTICATED_FRAME_BYTES_MAX, "oversized"),
        (200, shim.UNAUTHENTICATED_FRAME_BYTES_MAX, None),
    ],
)
def test_frame_length_rules(length, limit, expected):
    assert shim.frame_length_problem(struct.pack("i", length), limit) == expected


def test_the_largest_legal_command_fits_in_a_frame_and_a_garbage_header_does_not():
    # A 1 MiB command, base64-encrypted (x 4/3), with a full batch of entries before it.
    assert c.MAX_COMMAND_BYTES * 4 // 3 + shim.RAFT_BATCH_BYTES < shim.FRAME_BYTES_MAX < 4 * 1024 * 1024


def test_the_installed_pysyncobj_is_a_pinned_one():
    assert shim.check_version() in shim.SUPPORTED_VERSIONS


@pytest.fixture
def node(tmp_path):
    loop = asyncio.new_event_loop()
    address = f"127.0.0.1:{free_ports(1)[0]}"
    raft = RaftNode(
        self_address=address, partner_addresses=[], secret="test-secret",
        timing=get_profile("enterprise").raft, data_dir=tmp_path / "raft", loop=loop,
    )
    try:
        yield raft, loop
    finally:
        raft.close()
        loop.close()


def commit(raft: RaftNode, loop: asyncio.AbstractEventLoop, token: str) -> float:
    """Commit one probe; its latency in ms."""
    started = time.perf_counter()
    outcome = loop.run_until_complete(raft.propose(c.Probe("n1", token, 0), timeout_s=5.0))
    assert outcome.accepted
    return (time.perf_counter() - started) * 1000


def wait_leader(raft: RaftNode, loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(wait_until_async(lambda: raft.status().is_leader, 10, what="a one-node group to elect itself"))


def closed_by_peer(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_internals_the_adapter_uses_exist_on_a_live_node(node):
    raft, loop = node
    wait_leader(raft, loop)
    sync = raft._sync
    assert shim.transport_of(sync) is not None
    assert shim.is_candidate(sync) is False
    assert isinstance(shim.voted_this_term(sync), bool)
    shim.bring_election_forward(sync, shim.raft_clock_s() + 3600)  # later than now: no change
    shim.wake_tick_thread(sync)
    commit(raft, loop, "after-wake")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (struct.pack("i", 0x7FFFFFFF), "oversized"),
        (struct.pack("i", -5), "bad_length"),
        (struct.pack("i", 100_000), "oversized"),  # legal later, never before the key exchange
        (struct.pack("i", 300), "unauthenticated"),  # small enough to read: not encrypted with our secret
    ],
)
def test_a_stranger_s_frame_closes_the_connection_on_its_header(node, header, reason):
    raft, loop = node
    wait_leader(raft, loop)
    before = frame_stats.snapshot().get(reason, 0)
    host, port = raft.self_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as attacker:
        attacker.sendall(header + bytes(300))
        loop.run_until_complete(wait_until_async(lambda: frame_stats.snapshot().get(reason, 0) > before, 5,
                                                 what=f"a {reason} refusal counted"))
        assert closed_by_peer(attacker)
    commit(raft, loop, "after-" + reason)


def test_a_flood_of_garbage_is_refused_at_once_and_commits_go_on(node):
    raft, loop = node
    wait_leader(raft, loop)
    host, port = raft.self_address.rsplit(":", 1)
    garbage = struct.pack("i", 0x7FFFFFFF) + bytes(4 * 1024 * 1024)
    sent_before_close = []
    for _ in range(8):
        with socket.create_connection((host, int(port)), timeout=5) as attacker:
            attacker.settimeout(2)
            sent = 0
            try:
                while sent < len(garbage):
                    sent += attacker.send(garbage[sent : sent + 65536])
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            sent_before_close.append(sent)
        latencies = [commit(raft, loop, f"flood-{len(sent_before_close)}-{i}") for i in range(5)]
        assert max(latencies) < 1000
    # The node closed each connection long before 4 MiB went in: nothing was buffered.
    assert min(sent_before_close) < len(garbage)


def test_connections_that_never_authenticate_are_capped_and_expire(node):
    raft, loop = node
    wait_leader(raft, loop)
    host, port = raft.self_address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(shim.UNAUTHENTICATED_CONNECTIONS_MAX + 8)]
    closed: set[socket.socket] = set()
    capped_by_s = None
    try:
        deadline = time.monotonic() + shim.UNAUTHENTICATED_TIMEOUT_S + 5
        while len(closed) < len(idle):
            assert time.monotonic() < deadline, f"{len(idle) - len(closed)} unauthenticated connections still open"
            readable, _, _ = select.select([s for s in idle if s not in closed], [], [], 0.05)
            closed.update(s for s in readable if closed_by_peer(s, timeout_s=0.01))
            if capped_by_s is None and len(closed) >= 8:
                capped_by_s = time.monotonic()
        # The ones over the cap went first, before the timeout closed the rest.
        assert capped_by_s is not None and deadline - capped_by_s > 4
        commit(raft, loop, "after-idle")
    finally:
        for sock in idle:
            sock.close()
