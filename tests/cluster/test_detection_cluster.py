"""Failure detection on real peers: each fault with the verdict the cluster must reach.

A crash is confirmed by two observers; a hung process is confirmed and, once it runs again,
refutes the verdict with a higher incarnation; one observer that stops hearing a node (a
one-way partition, made with an nftables rule on loopback) hears it through another
member's probes, so nobody suspects it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from redge.agent.detector_settings import ENTERPRISE
from redge.chaos.cluster import LocalCluster, http_json, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster():
    with LocalCluster(size=3) as running:
        running.wait_leader()
        yield running


def events(cluster: LocalCluster, via: str, since_ms: float = 0) -> list[dict]:
    status, body = http_json("GET", cluster.peers[via].url + "/cluster/events?limit=2000", timeout_s=5)
    assert status == 200
    return [e for e in body["events"] if e["at_ms"] >= since_ms]


def member(cluster: LocalCluster, via: str, node_id: str) -> dict:
    return next(m for m in cluster.peers[via].snapshot()["members"] if m["node_id"] == node_id)


def test_crash_is_confirmed_by_two_observers(cluster):
    fault_ms = time.time() * 1000
    cluster.peers["n3"].kill()
    confirmed = wait_until(
        lambda: [e for e in events(cluster, "n1", fault_ms) if e["kind"] == "failure_confirmed" and e["node"] == "n3"],
        5, interval_s=0.02, what="n3 confirmed failed",
    )[0]
    assert confirmed["observers"] == ["n1", "n2"]
    assert confirmed["at_ms"] - fault_ms < 2000
    reasons = {e["reason"] for e in events(cluster, "n1", fault_ms) if e["kind"] == "suspicion" and e["node"] == "n3"}
    assert reasons <= {"disconnected", "unreachable", "phi", "silent"} and reasons
    assert member(cluster, "n2", "n3")["status"] == "failed"


def test_hung_process_is_confirmed_then_refutes_with_a_higher_incarnation(cluster):
    incarnation = member(cluster, "n1", "n3")["incarnation"]
    fault_ms = time.time() * 1000
    cluster.peers["n3"].signal(signal.SIGSTOP)
    try:
        wait_until(lambda: member(cluster, "n1", "n3")["status"] == "failed", 5, interval_s=0.02, what="n3 failed")
        phi = [e for e in events(cluster, "n1", fault_ms) if e["kind"] == "suspicion" and e["node"] == "n3"]
        assert {e["reason"] for e in phi} <= {"phi", "silent"}  # the process is there: no ICMP refusal
    finally:
        cluster.peers["n3"].signal(signal.SIGCONT)
    back = wait_until(
        lambda: (m := member(cluster, "n1", "n3"))["status"] == "alive" and m, 10, interval_s=0.02, what="n3 back"
    )
    assert back["incarnation"] > incarnation
    assert back["hold_down_until_ms"] > time.time() * 1000 - 1000
    assert any(e["kind"] == "member_recovered" and e["node"] == "n3" for e in events(cluster, "n1", fault_ms))


def metric(cluster: LocalCluster, node_id: str, prefix: str) -> float:
    """The sum of a peer's series whose line starts with `prefix`."""
    with urllib.request.urlopen(cluster.peers[node_id].url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(prefix))


def elections_hastened(cluster: LocalCluster, node_id: str) -> float:
    return metric(cluster, node_id, "redge_elections_hastened_total{")


def test_hung_leader_is_replaced_by_an_early_election_and_confirmed(cluster):
    """A hung leader keeps its TCP connections, so Raft alone would wait out its election
    timeout (150-300 ms) before the survivors could commit anything; their detectors start
    the election (on `Quiet`, just before the suspicion) and the confirmation follows."""
    leader = cluster.wait_leader()
    survivors = [n for n in cluster.peers if n != leader]
    # Past the leader's start-up as its watchers see it (its heartbeat count; detection is
    # slower in a node's first 5 s, and Raft's own election timeout may then come first).
    startup_beats = ENTERPRISE.startup_grace_ms / ENTERPRISE.heartbeat_interval_ms
    wait_until(lambda: metric(cluster, leader, "redge_heartbeats_sent ") >= len(survivors) * (startup_beats + 10),
               30, interval_s=0.1, what=f"{leader} past its start-up")
    before = {n: elections_hastened(cluster, n) for n in survivors}
    cluster.peers[leader].signal(signal.SIGSTOP)
    try:
        wait_until(lambda: member(cluster, survivors[0], leader)["status"] == "failed", 5, interval_s=0.02,
                   what=f"{leader} failed")
        assert cluster.wait_leader(among=survivors, not_node=leader) in survivors
        # Usually on `Quiet`; on `Suspect` when a busy machine wakes the detector past both
        # deadlines at once (tests/agent/test_detection_shell.py checks each mapping).
        assert sum(elections_hastened(cluster, n) - before[n] for n in survivors) >= 1
    finally:
        cluster.peers[leader].signal(signal.SIGCONT)


TABLE = "redge_test_one_way"


def _nft_available() -> bool:
    return os.geteuid() == 0 and shutil.which("nft") is not None


@pytest.mark.skipif(not _nft_available(), reason="needs root and nftables to drop packets on loopback")
def test_one_observer_losing_a_node_does_not_even_suspect_it(cluster):
    """Everything n3 sends to n1's heartbeat port is dropped in the kernel: a one-way loss
    on one link. n1 hears no heartbeats and no direct answers to its probes, but n2 pings
    n3 for it and relays the answers: n3 is alive, so n1 never suspects it. It finds n3
    late (`member_degraded`), and well again once the link heals."""
    observer, target = cluster.peers["n1"], cluster.peers["n3"]
    # Heartbeats leave n3 from ephemeral ports: match the sender id inside the datagram (a
    # length byte, then the id, after a 28-byte header). Probe answers leave from n3's own
    # heartbeat port. The rules go away with their table.
    sender = b"\x02" + b"n3"
    rules = (
        f"table inet {TABLE} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n"
        f"  udp dport {observer.heartbeat_port} @th,{64 + 28 * 8},24 0x{sender.hex()} drop\n"
        f"  udp sport {target.heartbeat_port} udp dport {observer.heartbeat_port} drop\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        fault_ms = time.time() * 1000
        degraded = wait_until(
            lambda: [e for e in events(cluster, "n2", fault_ms) if e["kind"] == "member_degraded" and e["node"] == "n3"],
            10, interval_s=0.02, what="n1 finding n3 late",
        )[0]
        assert degraded["observer"] == "n1"
        # Watch every event committed for two seconds (long poll, no sleeping): nobody
        # suspects n3, let alone confirms it.
        watch_until = time.monotonic() + 2.0
        since = 0
        while (left_s := watch_until - time.monotonic()) > 0:
            status, body = http_json(
                "GET", f"{observer.url}/cluster/events?since={since}&wait_s={left_s:.2f}", timeout_s=left_s + 5
            )
            assert status == 200
            for event in body["events"]:
                since = max(since, event["seq"])
                if event["at_ms"] >= fault_ms:
                    assert (event["kind"], event.get("node")) not in (("failure_confirmed", "n3"), ("suspicion", "n3")), event
        assert member(cluster, "n2", "n3")["status"] == "alive"
    finally:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], check=False)
    # Healed: n1 hears n3 on time again and withdraws its verdict (after the degraded window).
    wait_until(lambda: not member(cluster, "n2", "n3").get("degraded"), ENTERPRISE.degraded_window_ms / 1000 + 10,
               interval_s=0.1, what="n3 well again")
