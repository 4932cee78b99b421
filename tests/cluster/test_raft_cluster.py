"""Real `redge peer` processes on loopback: election, commits, crashes, restarts, membership."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request

import pytest

from redge.chaos.cluster import ADMIN_TOKEN, LocalCluster, free_ports, http_json, wait_until

pytestmark = pytest.mark.cluster


def app_spec(name: str) -> dict:
    return {"name": name, "variants": ["big", "small"], "priority": "standard", "slo_ms": 200, "backup": "cold"}


def app_names(peer) -> set[str] | None:
    snapshot = peer.snapshot(timeout_s=1.0)
    return {a["name"] for a in snapshot["apps"]} if snapshot else None


def wait_app_everywhere(cluster: LocalCluster, name: str, node_ids: list[str], timeout_s: float = 10.0) -> None:
    wait_until(
        lambda: all(name in (app_names(cluster.peers[n]) or set()) for n in node_ids),
        timeout_s,
        what=f"app {name} on {node_ids}",
    )


def register_once_the_cluster_commits(cluster: LocalCluster, via: str, spec: dict, timeout_s: float = 10.0) -> None:
    """Register an app, retrying while an election runs (503/504); any other answer fails."""

    def attempt() -> bool:
        status, body = cluster.register_app(via, spec, timeout_s=5)
        assert status in (200, 503, 504), body
        return status == 200

    wait_until(attempt, timeout_s, interval_s=0.05, what=f"a commit through {via}")


@pytest.fixture
def cluster():
    with LocalCluster(size=3) as running:
        yield running


def test_three_peers_elect_a_leader_and_commit_from_any_peer(cluster):
    leader = cluster.wait_leader()
    assert leader in cluster.peers
    follower = next(n for n in cluster.peers if n != leader)
    for via, name in ((leader, "at-leader"), (follower, "at-follower")):
        status, body = cluster.register_app(via, app_spec(name))
        assert status == 200, body
    wait_app_everywhere(cluster, "at-follower", list(cluster.peers))
    snapshot = cluster.peers[follower].snapshot()
    assert {m["node_id"] for m in snapshot["members"]} == set(cluster.peers)
    # Each peer says when it applied each event: never before its proposal.
    for via in (leader, follower):
        status, body = http_json("GET", cluster.peers[via].url + "/cluster/events?limit=100", timeout_s=5)
        registered = [e for e in body["events"] if e["kind"] == "app_registered"]
        assert status == 200 and len(registered) == 2
        assert all(e["applied_ms"] >= e["at_ms"] for e in registered), registered
    assert all(m["status"] == "alive" for m in snapshot["members"])
    assert snapshot["leader"] == leader


def test_leader_killed_survivors_elect_and_commit(cluster):
    leader = cluster.wait_leader()
    cluster.peers[leader].kill()
    survivors = [n for n in cluster.peers if n != leader]
    new_leader = cluster.wait_leader(survivors, timeout_s=10, not_node=leader)
    assert new_leader in survivors
    status, body = cluster.register_app(survivors[0], app_spec("after-crash"))
    assert status == 200, body
    wait_app_everywhere(cluster, "after-crash", survivors)


def test_minority_cannot_commit(cluster):
    leader = cluster.wait_leader()
    lonely = next(n for n in cluster.peers if n != leader)
    for node_id in cluster.peers:
        if node_id != lonely:
            cluster.peers[node_id].kill()
    status, body = cluster.register_app(lonely, app_spec("never"), timeout_s=10)
    assert status in (503, 504), body
    assert "error" in body
    assert "never" not in app_names(cluster.peers[lonely])
    # The lone peer stays up and says it is not ready.
    wait_until(lambda: not cluster.peers[lonely].ready(), 10, what="the lone peer to report not ready")
    assert cluster.peers[lonely].get("/v2/health/live")[0] == 200


def test_killed_peer_restarts_from_its_data_dir_with_committed_state(cluster):
    leader = cluster.wait_leader()
    victim = next(n for n in cluster.peers if n != leader)
    cluster.peers[victim].kill()
    status, body = cluster.register_app(leader, app_spec("while-down"))
    assert status == 200, body
    cluster.peers[victim].start()
    cluster.wait_ready([victim], timeout_s=30)
    wait_app_everywhere(cluster, "while-down", [victim])
    # The restart is a new incarnation: the cluster can tell it from its previous life.
    member = next(m for m in cluster.peers[victim].snapshot()["members"] if m["node_id"] == victim)
    assert member["incarnation"] == 2
    assert member["status"] == "alive"


def test_peer_joins_at_run_time_and_another_leaves(cluster):
    cluster.wait_leader()
    newcomer = cluster.add_peer(join_via="n1")
    cluster.wait_ready([newcomer.node_id], timeout_s=30)
    members = {m["node_id"]: m["status"] for m in cluster.peers["n1"].snapshot()["members"]}
    assert members[newcomer.node_id] == "alive"
    status, body = cluster.register_app(newcomer.node_id, app_spec("from-newcomer"))
    assert status == 200, body
    wait_app_everywhere(cluster, "from-newcomer", list(cluster.peers))

    # A clean leave: SIGTERM, exit 0, recorded as left (not failed), and the rest still commit.
    leaving = cluster.peers["n2"]
    assert leaving.terminate() == 0, leaving.log_tail(40)
    wait_until(
        lambda: {m["node_id"]: m["status"] for m in cluster.peers["n1"].snapshot()["members"]}.get("n2") == "left",
        10,
        what="n2 recorded as left",
    )
    register_once_the_cluster_commits(cluster, "n3", app_spec("after-leave"))
    # Raft now has three members: two of them are a majority, so losing one more keeps quorum.
    cluster.peers[newcomer.node_id].kill()
    register_once_the_cluster_commits(cluster, "n1", app_spec("after-second-loss"))


def test_join_with_a_wrong_secret_is_refused_and_cluster_unharmed(cluster, tmp_path):
    cluster.wait_leader()
    http_port, raft_port, heartbeat_port = free_ports(3)
    env = dict(os.environ, REDGE_SECRET="not-the-secret")
    result = subprocess.run(
        [sys.executable, "-m", "redge", "peer", "--node-id", "intruder",
         "--http", f"127.0.0.1:{http_port}", "--raft", f"127.0.0.1:{raft_port}",
         "--heartbeat", f"127.0.0.1:{heartbeat_port}", "--data-dir", str(tmp_path / "intruder"),
         "--join", cluster.peers["n1"].url],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "secret" in result.stderr
    snapshot = cluster.peers["n1"].snapshot()
    assert {m["node_id"] for m in snapshot["members"]} == set(cluster.peers)
    assert cluster.register_app("n1", app_spec("still-fine"))[0] == 200


def test_taken_address_and_bad_config_fail_with_a_clear_message(cluster, tmp_path):
    taken = cluster.peers["n1"]
    http_port, raft_port, heartbeat_port = free_ports(3)
    env = dict(os.environ, REDGE_SECRET=cluster.secret)
    base = [sys.executable, "-m", "redge", "peer", "--node-id", "n9", "--data-dir", str(tmp_path / "n9"),
            "--heartbeat", f"127.0.0.1:{heartbeat_port}", "--peers", cluster.peers["n2"].raft_address]
    result = subprocess.run(
        base + ["--http", f"127.0.0.1:{http_port}", "--raft", taken.raft_address],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"cannot bind the Raft address {taken.raft_address}" in result.stderr

    result = subprocess.run(
        base + ["--http", f"127.0.0.1:{taken.http_port}", "--raft", f"127.0.0.1:{raft_port}"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"cannot bind the HTTP address 127.0.0.1:{taken.http_port}" in result.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("node_id = [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "redge", "peer", "--config", str(bad)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr

    result = subprocess.run(
        [sys.executable, "-m", "redge", "peer", "--node-id", "n9", "--http", "10.0.0.1:1", "--raft", "10.0.0.1:2",
         "--heartbeat", "10.0.0.1:3", "--data-dir", str(tmp_path / "x")],
        env={k: v for k, v in os.environ.items() if k != "REDGE_SECRET"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr
    # The running cluster is untouched by all of this.
    assert cluster.register_app("n2", app_spec("unharmed"))[0] == 200


def test_admin_calls_need_the_token_and_bad_apps_get_400(cluster):
    cluster.wait_leader()
    url = cluster.peers["n1"].url + "/cluster/apps"
    assert http_json("POST", url, app_spec("x"))[0] == 401
    assert http_json("POST", url, app_spec("x"), token="wrong")[0] == 401
    status, body = http_json("POST", url, {**app_spec("x"), "priority": "urgent"}, token=ADMIN_TOKEN)
    assert status == 400 and "priority" in body["error"]
    status, body = http_json("POST", url, {"name": "x"}, token=ADMIN_TOKEN)
    assert status == 400 and "variants" in body["error"]
    status, body = http_json("DELETE", url + "/nope", token=ADMIN_TOKEN)
    assert status == 404
    status, body = http_json("GET", cluster.peers["n1"].url + "/cluster/events?limit=0")
    assert status == 400
    status, body = http_json("GET", cluster.peers["n1"].url + "/cluster/events?since=0&limit=50")
    assert status == 200 and any(e["kind"] == "member_joined" for e in body["events"])
    with urllib.request.urlopen(cluster.peers["n1"].url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "redge_raft_term" in text and 'redge_commands_applied_total{command="RegisterApp",outcome="rejected"}' in text


def test_sigterm_of_the_leader_hands_over_and_leaves(cluster):
    leader = cluster.wait_leader()
    assert cluster.peers[leader].terminate() == 0
    survivors = [n for n in cluster.peers if n != leader]
    new_leader = cluster.wait_leader(survivors, timeout_s=10, not_node=leader)
    assert new_leader in survivors
    statuses = {m["node_id"]: m["status"] for m in cluster.peers[survivors[0]].snapshot()["members"]}
    assert statuses[leader] == "left"
    assert cluster.register_app(new_leader, app_spec("after-handover"))[0] == 200


def test_python_api_registers_apps_and_follows_events(cluster):
    import asyncio

    from redge.agent.client import AsyncClient, RequestRejected

    async def scenario() -> list[dict]:
        async with AsyncClient([cluster.peers["n2"].url, cluster.peers["n1"].url], watch_routes=False) as client:
            stream = client.events(since=0, wait_s=2.0)
            seen = []
            result = await client.register_app(app_spec("via-python"), ADMIN_TOKEN)
            assert result["registered"]
            try:
                await client.register_app({**app_spec("bad"), "priority": "urgent"}, ADMIN_TOKEN)
                raise AssertionError("a bad app was accepted")
            except RequestRejected as error:
                assert error.status == 400
            async for event in stream:
                seen.append(event)
                if event["kind"] == "app_registered" and event.get("app") == "via-python":
                    break
            await stream.aclose()
            return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    assert any(e["kind"] == "member_joined" for e in seen)


def test_garbage_flood_on_the_leader_s_raft_port_leaves_it_leading_and_committing(cluster):
    """51 MB with a 0x7fffffff length header, from eight connections without the secret, at
    the leader's Raft port: each is closed on its header, the leader keeps committing at
    its usual pace, and nobody is suspected of anything."""
    import socket
    import struct
    import threading
    import time

    leader = cluster.wait_leader()
    started_ms = time.time() * 1000
    host, port = cluster.peers[leader].raft_address.rsplit(":", 1)
    garbage = struct.pack("i", 0x7FFFFFFF) + os.urandom(1 << 20) * 51
    sent: list[int] = []

    def flood() -> None:
        with socket.create_connection((host, int(port)), timeout=5) as attacker:
            total = 0
            try:
                while total < len(garbage):
                    total += attacker.send(garbage[total : total + (1 << 20)])
            except OSError:  # reset: the leader closed the connection
                pass
            sent.append(total)

    floods = [threading.Thread(target=flood) for _ in range(8)]
    for thread in floods:
        thread.start()
    status, body = http_json("POST", cluster.peers[leader].url + "/cluster/probe",
                             {"count": 200, "concurrency": 4, "deadline_s": 20}, timeout_s=30, token=ADMIN_TOKEN)
    for thread in floods:
        thread.join(timeout=30)
    assert status == 200 and body["committed"] == 200, body
    latencies = sorted(body["latencies_ms"])
    assert latencies[len(latencies) // 2] < 50 and latencies[-1] < 1000, latencies[-5:]
    assert max(sent) < len(garbage), "a flood connection was read to its end instead of closed on its header"
    assert cluster.wait_leader() == leader
    status, body = http_json("GET", cluster.peers[leader].url + "/cluster/events?limit=2000", timeout_s=5)
    suspicions = [e for e in body["events"] if e["at_ms"] >= started_ms and e["kind"] in ("suspicion", "failure_confirmed")]
    assert suspicions == []


def test_a_peer_stopped_with_sigterm_comes_back_when_started_again(cluster):
    """SIGTERM makes a peer leave the Raft group (the quorum shrinks, nobody waits for it). An
    operator's restart brings it back: it finds itself out of the group and asks a member it
    knows from its own journal to add it again, with a higher incarnation."""
    cluster.wait_leader()
    peer = cluster.peers["n2"]
    before = next(m for m in cluster.peers["n1"].snapshot()["members"] if m["node_id"] == "n2")["incarnation"]
    assert peer.terminate() == 0
    wait_until(lambda: next(m for m in cluster.peers["n1"].snapshot()["members"] if m["node_id"] == "n2")["status"]
               == "left", 10, what="n2 left")
    peer.log_file.close()
    peer.start()
    cluster.wait_ready(["n2"], timeout_s=30)
    member = next(m for m in cluster.peers["n1"].snapshot()["members"] if m["node_id"] == "n2")
    assert member["status"] == "alive" and member["incarnation"] > before
    register_once_the_cluster_commits(cluster, "n2", app_spec("after-rejoin"))
    wait_app_everywhere(cluster, "after-rejoin", list(cluster.peers))


@pytest.mark.parametrize(("path", "header", "status"), [
    ("/cluster/apps", b"Authorization: Bearer \xff\xfe\xc3\x28", b"401"),
    ("/cluster/apps", b"Authorization: Bearer caf\xc3\xa9", b"401"),
    ("/cluster/join", b"X-Redge-Join-Signature: \xff\xfe\x80", b"401"),
    ("/cluster/join", b"X-Redge-Join-Signature: \xff\x00\x01", b"400"),  # not HTTP at all: its parser refuses it
])
def test_malformed_credentials_get_401_and_the_peer_stays_up(cluster, path, header, status):
    cluster.wait_leader()
    peer = cluster.peers["n1"]
    body = b'{"name": "x", "variants": ["mlp-small"]}'
    with socket.create_connection(("127.0.0.1", peer.http_port), timeout=10) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.split(b" ", 2)[1] == status, answer[:300]
    assert http_json("GET", peer.url + "/v2/health/live")[0] == 200
    assert cluster.register_app("n1", app_spec("after-bad-credentials"))[0] == 200
