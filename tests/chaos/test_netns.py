"""Network namespaces for chaos: reachability, partitions, loss, and that nothing is left behind.

Skipped, with the reason, where namespaces or nftables are unavailable (not root, no nft).
"""

from __future__ import annotations

import random
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

from redge.chaos.faults import Nemesis, PacketLoss, Partition
from redge.chaos.netns import NetnsNetwork, NetnsUnavailable, Portal, netns_unavailable_reason

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))

PORT = 8100


@dataclass
class NetworkOnlyCluster:
    network: NetnsNetwork
    mode: str = "netns"
    peers: dict = field(default_factory=dict)


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())


def connects(network: NetnsNetwork, source: str, target: str, timeout_s: float = 0.5) -> bool:
    """Whether `source`'s namespace can open a TCP connection to `target`'s server."""
    code = (f"import socket; socket.create_connection(({network.address(target)!r}, {PORT}), timeout={timeout_s})")
    prefix = network.exec_prefix(source) if source != "client" else ["ip", "netns", "exec", network.client_namespace]
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, timeout=10, check=False).returncode == 0


@pytest.fixture
def network():
    with NetnsNetwork(["n1", "n2", "n3"]) as made:
        servers = [
            subprocess.Popen([*made.exec_prefix(node), sys.executable, "-m", "http.server", "--bind",
                              made.address(node), str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for node in made.node_ids
        ]
        try:
            for node in made.node_ids:
                deadline_tries = 100
                while not connects(made, "client", node) and deadline_tries:
                    deadline_tries -= 1
                assert deadline_tries, f"server in {node} did not start"
            yield made
        finally:
            for server in servers:
                server.kill()
                server.wait(timeout=10)


def test_namespaces_are_made_and_removed():
    before = namespaces()
    with NetnsNetwork(["n1", "n2"]) as made:
        assert set(made.namespaces) <= namespaces()
    assert namespaces() == before


def test_a_failed_setup_leaves_nothing_behind():
    before = namespaces()
    broken = NetnsNetwork(["n1"], tag="x" * 300)  # an impossible name: creation fails
    with pytest.raises(NetnsUnavailable):
        broken.create()
    assert namespaces() == before


def test_portal_reaches_a_peer_and_says_when_it_cannot(network):
    portal = Portal(network.client_namespace, (network.address("n1"), PORT))
    missing = Portal(network.client_namespace, (network.address("n1"), PORT + 1))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{portal.port}/", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{missing.port}/", timeout=5)
        assert error.value.code == 502 and error.value.headers["X-Redge-Portal"] == "unreachable"
    finally:
        portal.close()
        missing.close()


def test_partition_cuts_between_groups_only_and_heals(network):
    nemesis = Nemesis(NetworkOnlyCluster(network, peers={n: None for n in network.node_ids}), random.Random(0))
    partition = Partition((("n1",), ("rest",)))
    assert nemesis.apply(partition).targets == ("n1",)
    assert not connects(network, "n1", "n2") and not connects(network, "n3", "n1")
    assert connects(network, "n2", "n3") and connects(network, "client", "n1")
    nemesis.apply(partition)  # idempotent
    nemesis.heal(partition)
    nemesis.heal(partition)
    assert connects(network, "n1", "n2") and connects(network, "n3", "n1")


def test_one_way_partition_drops_one_direction(network):
    nemesis = Nemesis(NetworkOnlyCluster(network, peers={n: None for n in network.node_ids}), random.Random(0))
    nemesis.apply(Partition((("n1",), ("n2",)), one_way=True))
    # n1's packets never reach n2 (so no handshake from either side), but n1 still hears n3
    assert not connects(network, "n1", "n2")
    assert connects(network, "n3", "n1") and connects(network, "n1", "n3")
    assert nemesis.close() == []
    assert connects(network, "n1", "n2")


def test_total_packet_loss_blocks_and_heals(network):
    nemesis = Nemesis(NetworkOnlyCluster(network, peers={n: None for n in network.node_ids}), random.Random(0))
    loss = PacketLoss(("n2",), 100)
    nemesis.apply(loss)
    assert not connects(network, "n1", "n2") and not connects(network, "client", "n2")
    nemesis.heal(loss)
    assert connects(network, "n1", "n2")


@dataclass
class PortsOnly:
    http_port: int = PORT
    raft_port: int = 9100
    heartbeat_port: int = 7100


def get_time_s(network: NetnsNetwork, source: str, target: str) -> float:
    """Seconds one HTTP GET from `source` to `target`'s server takes (measured inside `source`)."""
    code = ("import time, urllib.request; t = time.monotonic(); "
            f"urllib.request.urlopen('http://{network.address(target)}:{PORT}/', timeout=5).read(); "
            "print(time.monotonic() - t)")
    completed = subprocess.run([*network.exec_prefix(source), sys.executable, "-c", code], capture_output=True,
                               text=True, timeout=20, check=True)
    return float(completed.stdout)


def test_delay_slows_what_a_node_receives_and_heals(network):
    from redge.chaos.faults import Delay

    nemesis = Nemesis(NetworkOnlyCluster(network, peers={n: PortsOnly() for n in network.node_ids}),
                      random.Random(0))
    delay = Delay(("n2",), ms=200, jitter_ms=0)
    assert get_time_s(network, "n1", "n2") < 0.15
    nemesis.apply(delay)
    assert get_time_s(network, "n1", "n2") >= 0.2
    assert get_time_s(network, "n1", "n3") < 0.15, "only n2 is delayed"
    nemesis.heal(delay)
    assert nemesis.close() == []
    assert get_time_s(network, "n1", "n2") < 0.15


def test_bandwidth_installs_and_removes_a_token_bucket(network):
    from redge.chaos.faults import Bandwidth

    def qdiscs() -> str:
        return subprocess.run([*network.exec_prefix("n2"), "tc", "qdisc", "show", "dev", "eth0"],
                              capture_output=True, text=True, timeout=10, check=True).stdout

    nemesis = Nemesis(NetworkOnlyCluster(network, peers={n: None for n in network.node_ids}), random.Random(0))
    limit = Bandwidth("n2", rate_mbit=2.0)
    try:
        nemesis.apply(limit)
    except NetnsUnavailable as error:  # a kernel without the tbf qdisc
        pytest.skip(f"tc tbf unavailable: {error}")
    assert "tbf" in qdiscs() and "2Mbit" in qdiscs()
    nemesis.heal(limit)
    nemesis.heal(limit)
    assert "tbf" not in qdiscs()
