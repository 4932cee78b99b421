"""The delay proxy: its arithmetic, and a real proxy process delaying TCP and UDP on loopback."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.chaos.cluster import free_ports
from redge.chaos.proxy import DelayModel


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 500), st.floats(0, 1), st.integers(0, 2**32), st.lists(st.floats(0, 10), min_size=1, max_size=30))
def test_a_stream_never_reorders_and_every_chunk_is_delayed_within_bounds(delay_ms, jitter_share, seed, gaps_s):
    model = DelayModel(delay_ms, delay_ms * jitter_share)
    rng = random.Random(seed)
    now_s, previous_s = 0.0, 0.0
    for gap_s in gaps_s:
        now_s += gap_s
        deliver_s = model.stream_deliver_at_s(now_s, previous_s, rng)
        assert deliver_s >= previous_s
        assert deliver_s >= now_s + (model.delay_ms - model.jitter_ms) / 1000 - 1e-9
        assert deliver_s <= max(previous_s, now_s + (model.delay_ms + model.jitter_ms) / 1000) + 1e-9
        previous_s = deliver_s


def test_the_same_seed_gives_the_same_delays():
    model = DelayModel(50, 20)
    first, second = random.Random(3), random.Random(3)
    assert [model.sample_s(first) for _ in range(20)] == [model.sample_s(second) for _ in range(20)]


@pytest.fixture
def proxy():
    tcp_listen, tcp_target, udp_listen, udp_target = free_ports(4)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", tcp_target))
    server.listen(4)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", udp_target))
    process = subprocess.Popen(
        [sys.executable, "-m", "redge.chaos.proxy", "--target", "127.0.0.1", "--delay-ms", "150",
         "--tcp", f"{tcp_listen}:{tcp_target}", "--udp", f"{udp_listen}:{udp_target}", "--seed", "1"],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == b"ready"
        yield tcp_listen, server, udp_listen, receiver
    finally:
        process.kill()
        process.wait(timeout=10)
        server.close()
        receiver.close()


def test_tcp_and_udp_arrive_late_and_in_order(proxy):
    tcp_listen, server, udp_listen, receiver = proxy
    server.settimeout(5)
    client = socket.create_connection(("127.0.0.1", tcp_listen), timeout=5)
    try:
        sent = time.monotonic()
        client.sendall(b"first,")
        client.sendall(b"second")
        connection, _ = server.accept()
        connection.settimeout(5)
        received = b""
        deadline = time.monotonic() + 5
        while len(received) < 12 and time.monotonic() < deadline:
            received += connection.recv(64)
        assert received == b"first,second"
        assert time.monotonic() - sent >= 0.14
        connection.sendall(b"reply")  # replies are not delayed
        assert client.recv(64) == b"reply"
        connection.close()
    finally:
        client.close()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.settimeout(5)
    sent = time.monotonic()
    sender.sendto(b"heartbeat", ("127.0.0.1", udp_listen))
    assert receiver.recv(64) == b"heartbeat"
    assert time.monotonic() - sent >= 0.14
    sender.close()
