"""A cluster of real `redge peer` processes on loopback, for tests, benchmarks and the demo.

Each peer is started as its users start it (`python -m redge peer ...` with the secret in
the environment) and is watched only through its public HTTP API. Faults are signals to real
processes: SIGKILL for a crash, SIGSTOP/SIGCONT for a hang. The cluster tears itself down on
exit, killing whatever it started, so a failed test leaves no process behind.

With `mode="netns"` (root only) each peer runs in its own network namespace on a private
bridge (chaos/netns.py), so that chaos/faults.py can cut links and drop packets between
peers; the peers are still reached from here at `peer.url`, through a portal on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ADMIN_TOKEN = "redge-local-admin-token"
NETNS_HTTP_PORT = 8100
NETNS_RAFT_PORT = 9100
NETNS_HEARTBEAT_PORT = 7100


class ClusterError(Exception):
    pass


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (the kernel picks them; collisions are unlikely)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
            ports.append(probe.getsockname()[1])
    finally:
        for probe in sockets:
            probe.close()
    return ports


def wait_until(condition: Callable[[], T | None], timeout_s: float, interval_s: float = 0.01, what: str = "") -> T:
    """Poll `condition` until it returns something truthy, or raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout_s:.1f}s waiting for {what or condition!r}")
        time.sleep(interval_s)


async def wait_until_async(condition: Callable[[], T | None], timeout_s: float, interval_s: float = 0.005,
                           what: str = "") -> T:
    """`wait_until` for a caller on an event loop: the loop runs between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout_s:.1f}s waiting for {what or condition!r}")
        await asyncio.sleep(interval_s)


def http_json(method: str, url: str, body: Any = None, timeout_s: float = 2.0, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except json.JSONDecodeError:
            return error.code, None


@dataclass
class PeerProcess:
    node_id: str
    http_port: int
    raft_port: int
    heartbeat_port: int
    data_dir: Path
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_file: Any = None
    # Where the peer listens; in netns mode an address inside its namespace.
    host: str = "127.0.0.1"
    # In netns mode the host reaches the peer's HTTP port through a portal on this port.
    portal_port: int | None = None
    # Sent with reads when the peer requires a read token.
    read_token: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.portal_port or self.http_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running(), f"{self.node_id} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.data_dir / "peer.log", "ab")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def signal(self, signal_number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal_number)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 15.0) -> int | None:
        if self.process is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def get(self, path: str, timeout_s: float = 2.0) -> tuple[int, Any]:
        return http_json("GET", self.url + path, timeout_s=timeout_s, token=self.read_token or None)

    def snapshot(self, timeout_s: float = 2.0) -> dict[str, Any] | None:
        try:
            status, body = self.get("/cluster", timeout_s)
        except (OSError, urllib.error.URLError):
            return None
        return body if status == 200 else None

    def ready(self) -> bool:
        try:
            status, _ = self.get("/v2/health/ready", timeout_s=1.0)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.data_dir / "peer.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalCluster:
    """N peers on 127.0.0.1. Use as a context manager; `start()` waits until all are ready."""

    size: int = 3
    profile: str = "enterprise"
    root: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    torch_threads: int = 1
    peers: dict[str, PeerProcess] = field(default_factory=dict)
    # "loopback": every peer on 127.0.0.1. "netns": one network namespace per peer on a
    # private bridge (root only; see chaos/netns.py), so partitions and loss can be injected.
    mode: str = "loopback"
    network: Any = None
    _portals: list[Any] = field(default_factory=list)
    _temporary: Any = None
    # The cluster secret its peers share, random for each cluster: a fixed one would let
    # any local user speak Raft (pickles) to it.
    secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    # With one, every peer requires it for reads (--read-token-file), and this harness sends it.
    read_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("loopback", "netns"):
            raise ClusterError(f"unknown cluster mode {self.mode!r}: loopback or netns")
        if self.root is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="redge-cluster-")
            self.root = Path(self._temporary.name)
        node_ids = [f"n{index + 1}" for index in range(self.size)]
        if self.mode == "netns":
            self._make_network(node_ids)
        try:
            ports = free_ports(self.size * 3)
            for index, node_id in enumerate(node_ids):
                http_port, raft_port, heartbeat_port = ports[index * 3 : index * 3 + 3]
                if self.mode == "netns":
                    # Each namespace has its own ports: the same numbers on every peer.
                    http_port, raft_port, heartbeat_port = NETNS_HTTP_PORT, NETNS_RAFT_PORT, NETNS_HEARTBEAT_PORT
                self.peers[node_id] = self._make_peer(node_id, http_port, raft_port, heartbeat_port)
        except BaseException:
            self.stop()
            raise
        raft_addresses = [p.raft_address for p in self.peers.values()]
        for peer in self.peers.values():
            others = [a for a in raft_addresses if a != peer.raft_address]
            peer.args += ["--peers", ",".join(others)]

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDGE_SECRET=self.secret,
            REDGE_ADMIN_TOKEN=ADMIN_TOKEN,
            OMP_NUM_THREADS=str(self.torch_threads),
            MKL_NUM_THREADS=str(self.torch_threads),
            PYTHONUNBUFFERED="1",
        )
        if self.read_token:
            env["REDGE_READ_TOKEN"] = self.read_token
        return env

    def _make_network(self, node_ids: list[str]) -> None:
        from redge.chaos.netns import NetnsNetwork

        self.network = NetnsNetwork(node_ids)
        self.network.create()

    def _make_peer(self, node_id: str, http_port: int, raft_port: int, heartbeat_port: int) -> PeerProcess:
        assert self.root is not None
        data_dir = self.root / node_id
        host = "127.0.0.1"
        prefix: list[str] = []
        portal_port = None
        if self.network is not None:
            from redge.chaos.netns import Portal

            host = self.network.address(node_id)
            prefix = self.network.exec_prefix(node_id)
            portal = Portal(self.network.client_namespace, (host, http_port))
            self._portals.append(portal)
            portal_port = portal.port
        args = [
            *prefix,
            sys.executable, "-m", "redge", "peer",
            "--node-id", node_id,
            "--http", f"{host}:{http_port}",
            "--raft", f"{host}:{raft_port}",
            "--heartbeat", f"{host}:{heartbeat_port}",
            "--data-dir", str(data_dir),
            "--profile", self.profile,
            *self.extra_args,
        ]
        return PeerProcess(
            node_id, http_port, raft_port, heartbeat_port, data_dir, args, self._environment(),
            host=host, portal_port=portal_port, read_token=self.read_token,
        )

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        for peer in self.peers.values():
            peer.start()
        self.wait_ready(list(self.peers), timeout_s)

    def wait_ready(self, node_ids: list[str], timeout_s: float = 60.0) -> None:
        def all_ready() -> bool:
            for node_id in node_ids:
                peer = self.peers[node_id]
                if not peer.running():
                    raise ClusterError(f"peer {node_id} exited with {peer.process.returncode}:\n{peer.log_tail()}")
                if not peer.ready():
                    return False
            return True

        wait_until(all_ready, timeout_s, interval_s=0.05, what=f"peers {node_ids} to be ready")

    def stop(self) -> None:
        for peer in self.peers.values():
            if peer.running():
                peer.signal(signal.SIGCONT)
                peer.kill()
            if peer.log_file is not None:
                peer.log_file.close()
        for portal in self._portals:
            portal.close()
        self._portals.clear()
        if self.network is not None:
            self.network.close()
            self.network = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def add_peer(self, join_via: str, env: dict[str, str] | None = None) -> PeerProcess:
        """Start one more peer that joins the running cluster through `join_via`'s HTTP URL
        (`env`: variables to set for it alone, such as a fault's)."""
        if self.network is not None:
            raise ClusterError("add_peer is not supported in netns mode: the network is fixed at start")
        node_id = f"n{len(self.peers) + 1}"
        http_port, raft_port, heartbeat_port = free_ports(3)
        peer = self._make_peer(node_id, http_port, raft_port, heartbeat_port)
        peer.args += ["--join", self.peers[join_via].url]
        peer.env.update(env or {})
        self.peers[node_id] = peer
        peer.start()
        return peer

    # ------------------------------------------------------------------ queries

    def running_peers(self) -> list[PeerProcess]:
        return [p for p in self.peers.values() if p.running()]

    def leader(self, among: list[str] | None = None) -> str | None:
        """The leader that every answering peer among `among` agrees on, or None."""
        leaders = set()
        for node_id in among or [p.node_id for p in self.running_peers()]:
            snapshot = self.peers[node_id].snapshot(timeout_s=1.0)
            if snapshot is None:
                continue
            leaders.add(snapshot.get("leader"))
        if len(leaders) == 1:
            return leaders.pop()
        return None

    def wait_leader(self, among: list[str] | None = None, timeout_s: float = 30.0, not_node: str | None = None) -> str:
        def agreed() -> str | None:
            leader = self.leader(among)
            return leader if leader and leader != not_node else None

        return wait_until(agreed, timeout_s, interval_s=0.02, what="an agreed Raft leader")

    def register_app(self, via: str, app: dict[str, Any], timeout_s: float = 5.0) -> tuple[int, Any]:
        return http_json("POST", self.peers[via].url + "/cluster/apps", app, timeout_s=timeout_s, token=ADMIN_TOKEN)
