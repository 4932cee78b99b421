"""A private network of Linux network namespaces, for faults that loopback cannot express.

On loopback every peer shares one network stack, so a partition or packet loss would hit
everyone (and every other program on the machine). Here each peer gets its own namespace with
one interface `eth0`, joined by veth pairs to a bridge that lives in a namespace of its own;
a client namespace on the same bridge stands for the users' machines. Addresses come from a
private range and exist only inside these namespaces: the host's interfaces, routes and
firewall are never touched, so other programs on a shared machine see nothing.

Faults are nftables tables inside the namespaces (see `faults.py`), one table per namespace
rebuilt whole on every change, so applying a rule twice or healing it twice is harmless.

The test process lives in the host namespace and cannot route to these addresses. A `Portal`
listens on 127.0.0.1 for each peer and opens the upstream connection from a thread that has
entered the client namespace (setns applies to one thread only), so the existing
`LocalCluster` helpers, which speak HTTP to 127.0.0.1, work unchanged. When the peer cannot
be reached the portal answers 502 with `X-Redge-Portal: unreachable`, so a client can tell "never
delivered" (a definite failure) from "sent, then lost" (unknown).

Everything made here is torn down by `close()`, also after an exception: processes in the
namespaces first, then the namespaces (which takes their veths, bridge and rules with them).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Self

CLONE_NEWNET = 0x40000000
SUBNET_PREFIX = "10.213.77"
CLIENT_HOST_INDEX = 250
NFT_TABLE = "redge_chaos"
COMMAND_TIMEOUT_S = 10.0
PORTAL_CONNECTIONS_MAX = 256
PORTAL_CONNECT_TIMEOUT_S = 2.0
PORTAL_CHUNK_BYTES = 65536

_names = itertools.count(1)


class NetnsUnavailable(Exception):
    """This machine (or this user) cannot make network namespaces or nftables rules."""


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why netns mode cannot run here, or None when it can.

    Being root is not enough (a container may lack CAP_SYS_ADMIN, or nf_tables), so this
    makes one namespace with a veth and an nftables table, once per process, and removes it.
    """
    if os.geteuid() != 0:
        return "netns mode needs root (network namespaces, veth, nftables)"
    if shutil.which("ip") is None:
        return "netns mode needs iproute2 (`ip`)"
    if shutil.which("nft") is None:
        return "netns mode needs nftables (`apt-get install -y nftables`)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    probe = f"redge-probe-{os.getpid()}"
    try:
        run_command(["ip", "netns", "add", probe])
        try:
            run_command(["ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0"])
            run_command(["ip", "netns", "exec", probe, "nft", "-f", "-"],
                        input_text=f"table inet {NFT_TABLE} {{ chain input {{ type filter hook input priority 0; }}; }}\n")
        finally:
            run_command(["ip", "netns", "del", probe])
    except NetnsUnavailable as error:
        return f"netns mode cannot run here: {error}"
    return None


def run_command(args: list[str], input_text: str | None = None) -> str:
    """Run one admin command with a deadline; raise with its stderr when it fails."""
    try:
        completed = subprocess.run(
            args, input=input_text, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetnsUnavailable(f"{' '.join(args)} did not finish in {COMMAND_TIMEOUT_S:.0f}s") from None
    if completed.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(args)} failed: {completed.stderr.strip()}")
    return completed.stdout


def enter_namespace(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(fd)


@dataclass
class NetnsNetwork:
    """Namespaces for `node_ids` plus a client, on one bridge. Use as a context manager."""

    node_ids: list[str]
    tag: str = ""
    namespaces: list[str] = field(default_factory=list)
    # namespace -> fault key -> (input rules, nat prerouting rules)
    rules: dict[str, dict[str, tuple[list[str], list[str]]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.tag:
            self.tag = f"redge{os.getpid()}x{next(_names)}"
        assert len(self.node_ids) < CLIENT_HOST_INDEX - 2, "too many peers for one /24"

    # ------------------------------------------------------------------ names

    @property
    def bridge_namespace(self) -> str:
        return f"{self.tag}-bridge"

    @property
    def client_namespace(self) -> str:
        return f"{self.tag}-client"

    def namespace(self, node_id: str) -> str:
        return f"{self.tag}-{node_id}"

    def address(self, node_id: str) -> str:
        return f"{SUBNET_PREFIX}.{self.node_ids.index(node_id) + 2}"

    @property
    def client_address(self) -> str:
        return f"{SUBNET_PREFIX}.{CLIENT_HOST_INDEX}"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(self) -> None:
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        try:
            self._add_namespace(self.bridge_namespace)
            bridge = ["ip", "-n", self.bridge_namespace]
            run_command([*bridge, "link", "add", "br0", "type", "bridge"])
            run_command([*bridge, "link", "set", "br0", "up"])
            hosts = [(node_id, self.namespace(node_id), self.address(node_id)) for node_id in self.node_ids]
            hosts.append(("client", self.client_namespace, self.client_address))
            for index, (_, namespace, address) in enumerate(hosts):
                self._add_namespace(namespace)
                port = f"p{index}"
                run_command(["ip", "-n", namespace, "link", "add", "eth0", "type", "veth",
                             "peer", "name", port, "netns", self.bridge_namespace])
                run_command(["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0"])
                run_command(["ip", "-n", namespace, "link", "set", "eth0", "up"])
                run_command([*bridge, "link", "set", port, "master", "br0"])
                run_command([*bridge, "link", "set", port, "up"])
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, namespace: str) -> None:
        run_command(["ip", "netns", "add", namespace])
        self.namespaces.append(namespace)
        run_command(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def close(self) -> None:
        """Delete every namespace made here; deleting one takes its veths and rules along."""
        for namespace in reversed(self.namespaces):
            try:
                pids = run_command(["ip", "netns", "pids", namespace]).split()
            except NetnsUnavailable:
                pids = []
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            try:
                run_command(["ip", "netns", "del", namespace])
            except NetnsUnavailable:
                pass
        self.namespaces.clear()

    # ------------------------------------------------------------------ commands inside

    def exec_prefix(self, node_id: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node_id)]

    def set_rules(self, node_id: str, key: str, input_rules: list[str], nat_rules: list[str] | None = None) -> None:
        """Install (or replace) fault `key`'s rules in `node_id`'s namespace."""
        namespace = self.namespace(node_id)
        with self._lock:
            self.rules.setdefault(namespace, {})[key] = (list(input_rules), list(nat_rules or []))
            self._load(namespace)

    def clear_rules(self, node_id: str, key: str) -> None:
        namespace = self.namespace(node_id)
        with self._lock:
            if self.rules.get(namespace, {}).pop(key, None) is not None:
                self._load(namespace)

    def _load(self, namespace: str) -> None:
        by_key = self.rules.get(namespace, {})
        input_rules = [rule for key in sorted(by_key) for rule in by_key[key][0]]
        nat_rules = [rule for key in sorted(by_key) for rule in by_key[key][1]]
        # `add table` then `delete table` makes the delete safe when the table is absent.
        text = [f"add table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]
        if input_rules or nat_rules:
            text.append(f"table inet {NFT_TABLE} {{")
            text.append("  chain input { type filter hook input priority 0; policy accept;")
            text += [f"    {rule}" for rule in input_rules]
            text.append("  }")
            text.append("  chain prerouting { type nat hook prerouting priority -100; policy accept;")
            text += [f"    {rule}" for rule in nat_rules]
            text.append("  }")
            text.append("}")
        run_command(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input_text="\n".join(text) + "\n")

    def tc(self, node_id: str, args: list[str]) -> None:
        run_command(["ip", "netns", "exec", self.namespace(node_id), "tc", *args])


class Portal:
    """127.0.0.1:PORT in the host -> ADDRESS:PORT in the client namespace, one thread per connection."""

    def __init__(self, client_namespace: str, upstream: tuple[str, int]) -> None:
        self.client_namespace = client_namespace
        self.upstream = upstream
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._slots = threading.BoundedSemaphore(PORTAL_CONNECTIONS_MAX)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"portal-{self.port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                connection.close()
                continue
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(sock)

    def _serve(self, downstream: socket.socket) -> None:
        upstream = None
        self._track(downstream, True)
        try:
            enter_namespace(self.client_namespace)
            upstream = socket.socket()
            self._track(upstream, True)
            upstream.settimeout(PORTAL_CONNECT_TIMEOUT_S)
            try:
                upstream.connect(self.upstream)
            except OSError as error:
                _answer_unreachable(downstream, f"{self.upstream[0]}:{self.upstream[1]} unreachable: {error}")
                return
            upstream.settimeout(None)
            pump = threading.Thread(target=_pump, args=(upstream, downstream), daemon=True)
            pump.start()
            _pump(downstream, upstream)
            pump.join(timeout=30)
        except OSError:
            pass
        finally:
            for sock in (downstream, upstream):
                if sock is not None:
                    self._track(sock, False)
                    sock.close()
            self._slots.release()

    def close(self) -> None:
        self._closing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        with self._open_lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            chunk = source.recv(PORTAL_CHUNK_BYTES)
            if not chunk:
                break
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _answer_unreachable(downstream: socket.socket, message: str) -> None:
    body = ('{"error": "' + message.replace('"', "'") + '"}').encode()
    head = (
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nX-Redge-Portal: unreachable\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        # Read the request first: closing with unread data would reset the connection and
        # the client would see "unknown" instead of this definite answer.
        downstream.settimeout(0.2)
        downstream.recv(PORTAL_CHUNK_BYTES)
    except OSError:
        pass
    try:
        downstream.settimeout(PORTAL_CONNECT_TIMEOUT_S)
        downstream.sendall(head + body)
    except OSError:
        pass
