"""What an attacker on the machine or the LAN sends a cluster, as plain functions and faults.

Nothing here needs the cluster secret; that is the point. Each primitive is what the
hostile scenario (`redge chaos run hostile`) throws at real peers while inference runs, and
the checker asserts that none of it changes who the cluster thinks is alive:

- `forge_port_unreachable`: an ICMP "port unreachable" that claims to answer a UDP
  datagram from one socket to another (raw socket: root). A connected UDP socket that
  receives one fails its next send with ECONNREFUSED, which an older redge took for proof
  that the peer process was gone. `sweep_port_unreachable` sends one for every ephemeral
  port, the way an attacker who does not know the observer's source port would.
- `flood_raft`: TCP connections to a Raft port that announce a frame of 0x7fffffff bytes and
  then send garbage, before any authentication.
- `fuzz_http` and `oversized_bodies`: random and huge inference requests at the OIP
  endpoints, JSON and binary.

The traffic goes only to loopback or to namespaces the caller made (the faults resolve
addresses from the cluster they are given).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from redge.chaos.faults import Fault

if TYPE_CHECKING:
    from redge.chaos.cluster import PeerProcess
    from redge.chaos.faults import Nemesis

EPHEMERAL_PORTS = range(32768, 61000)  # Linux's default ip_local_port_range
_ICMP_DESTINATION_UNREACHABLE = 3
_ICMP_PORT_UNREACHABLE = 3


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def port_unreachable_packet(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The ICMP message (header and quoted datagram) that reports a UDP datagram from
    `source` to `destination` as refused. The kernel adds the outer IP header."""
    source_ip, destination_ip = socket.inet_aton(source[0]), socket.inet_aton(destination[0])
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + 45, 0)
    quoted_ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 45, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                            source_ip, destination_ip)
    quoted_ip = quoted_ip[:10] + struct.pack("!H", _checksum(quoted_ip)) + quoted_ip[12:]
    body = struct.pack("!I", 0) + quoted_ip + udp
    header = struct.pack("!BBH", _ICMP_DESTINATION_UNREACHABLE, _ICMP_PORT_UNREACHABLE, 0)
    checksum = _checksum(header + body)
    return struct.pack("!BBH", _ICMP_DESTINATION_UNREACHABLE, _ICMP_PORT_UNREACHABLE, checksum) + body


def raw_icmp_socket() -> socket.socket:
    """A raw ICMP socket (needs root or CAP_NET_RAW; raises PermissionError otherwise)."""
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def forge_port_unreachable(sock: socket.socket, observer: tuple[str, int], target: tuple[str, int]) -> None:
    """Tell `observer` (its socket's address) that its datagram to `target` was refused."""
    sock.sendto(port_unreachable_packet(observer, target), (observer[0], 0))


def sweep_port_unreachable(sock: socket.socket, observer_ip: str, target: tuple[str, int],
                           ports: range = EPHEMERAL_PORTS) -> int:
    """One forged refusal for every source port `observer_ip` may use towards `target`:
    whichever socket of the observer talks to `target` gets one. Returns packets sent."""
    sent = 0
    for port in ports:
        try:
            forge_port_unreachable(sock, (observer_ip, port), target)
            sent += 1
        except BlockingIOError:
            continue  # the socket buffer is full: that port is skipped this sweep
    return sent


def garbage_frame_header() -> bytes:
    """pysyncobj's 4-byte length prefix announcing the largest frame it could express."""
    return struct.pack("i", 0x7FFFFFFF)


def flood_raft(address: tuple[str, int], megabytes: int = 51, timeout_s: float = 10.0) -> int:
    """Connect to a Raft port, announce a 2 GiB frame and send `megabytes` of garbage.
    Returns how many bytes went in before the peer closed the connection."""
    chunk = os.urandom(1 << 20)
    sent = 0
    try:
        with socket.create_connection(address, timeout=timeout_s) as connection:
            connection.sendall(garbage_frame_header())
            for _ in range(megabytes):
                connection.sendall(chunk)
                sent += len(chunk)
    except OSError:
        pass  # closed by the peer: what the guard is for
    return sent


def random_body(rng: random.Random, size_max: int = 64 * 1024) -> tuple[bytes, dict[str, str]]:
    """A random inference request: bytes, broken JSON, or JSON of the wrong shape, with or
    without the binary-extension header (sometimes lying about its length)."""
    kind = rng.randrange(5)
    headers = {"Content-Type": "application/json"}
    if kind == 0:
        body = rng.randbytes(rng.randrange(size_max))
    elif kind == 1:
        body = b'{"inputs": [{"name": "input", "shape": [' + rng.randbytes(rng.randrange(64)) + b"]"
    elif kind == 2:
        shape = [rng.randrange(0, 5000) for _ in range(rng.randrange(1, 5))]
        body = ('{"inputs": [{"name": "input", "datatype": "FP32", "shape": %s, "data": [%s]}]}' % (
            shape, ",".join("0.5" for _ in range(rng.randrange(2000))))).encode()
    elif kind == 3:
        header = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}]}'
        body = header + rng.randbytes(rng.randrange(128))
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(rng.choice([len(header), 0, -1, 10**9, len(header) + 3]))}
    else:
        depth = rng.randrange(1, 200)
        body = ('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ' + "[" * depth + "1" + "]" * depth + "}]}").encode()
    return body, headers


def huge_json_body(elements: int) -> bytes:
    """A JSON tensor of `elements` numbers (about 4 bytes each) whose shape does not fit the model."""
    data = b"0.5," * (elements - 1) + b"0.5" if elements > 0 else b""
    return b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, %d], "data": [' % elements + data + b"]}]}"


# ---------------------------------------------------------------------- faults


def _running_targets(nemesis: Nemesis) -> list[PeerProcess]:
    """Peers that are up and that no active fault is stopping or breaking right now."""
    busy = {node for record in nemesis.active_records() for node in record.targets}
    return [peer for peer in nemesis.cluster.peers.values() if peer.running() and peer.node_id not in busy]


def _count(notes: dict[str, Any], key: str, amount: int = 1) -> None:
    notes[key] = notes.get(key, 0) + amount


@dataclass(frozen=True)
class IcmpSweep(Fault):
    """Forged ICMP port unreachable for every peer's heartbeat port, a sweep over every
    ephemeral source port, one sweep every `interval_s` (raw socket: root). Touches no node:
    every peer stays up, so any failure confirmed meanwhile is a false positive."""

    interval_s: float = 2.0
    kind: ClassVar[str] = "icmp-sweep"

    def unavailable_reason(self, mode: str) -> str | None:
        if os.geteuid() != 0:
            return "icmp-sweep forges ICMP with a raw socket: it needs root"
        return None

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        record = nemesis.record_of(self)
        notes = record.notes if record is not None else {}

        def run(stop: threading.Event) -> None:
            with raw_icmp_socket() as raw:
                raw.setblocking(False)
                while not stop.is_set():
                    started = time.monotonic()
                    for target in _running_targets(nemesis):
                        for observer in nemesis.cluster.peers.values():
                            if observer is target or stop.is_set():
                                continue
                            _count(notes, "packets", sweep_port_unreachable(
                                raw, observer.host, (target.host, target.heartbeat_port)))
                            if observer.host == target.host:
                                break  # one shared address (loopback): one sweep reaches every observer
                    _count(notes, "sweeps")
                    stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

        nemesis.start_background(self, run)
        return ()

    def heal(self, nemesis: Nemesis) -> None:
        nemesis.stop_background(self)


@dataclass(frozen=True)
class RaftFlood(Fault):
    """`connections` TCP connections to every peer's Raft port, each announcing a 2 GiB frame
    and sending `megabytes` of garbage, again every `interval_s`. No secret."""

    connections: int = 4
    megabytes: int = 51
    interval_s: float = 1.0
    kind: ClassVar[str] = "raft-flood"

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        record = nemesis.record_of(self)
        notes = record.notes if record is not None else {}

        def run(stop: threading.Event) -> None:
            while not stop.is_set():
                for peer in _running_targets(nemesis):
                    host, port = peer.raft_address.rsplit(":", 1)
                    for _ in range(self.connections):
                        accepted = flood_raft((host, int(port)), self.megabytes, timeout_s=5.0)
                        _count(notes, "floods")
                        notes["bytes_accepted_max"] = max(notes.get("bytes_accepted_max", 0), accepted)
                stop.wait(self.interval_s)

        nemesis.start_background(self, run)
        return ()

    def heal(self, nemesis: Nemesis) -> None:
        nemesis.stop_background(self)


class _Answers:
    """How a fault's own HTTP requests ended: an answer (by status), not delivered, or none."""

    def __init__(self, notes: dict[str, Any], nemesis: Nemesis) -> None:
        self.notes = notes
        self.nemesis = nemesis
        notes.setdefault("statuses", {})
        notes.setdefault("unanswered", 0)
        notes.setdefault("examples", [])

    def answered(self, status: int) -> None:
        statuses = self.notes["statuses"]
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    def failed(self, peer: PeerProcess, error: BaseException, sent: bool) -> None:
        if not sent or isinstance(error, ConnectionRefusedError):
            _count(self.notes, "not_delivered")
        elif not peer.running() or peer.node_id in {n for r in self.nemesis.active_records() for n in r.targets}:
            _count(self.notes, "interrupted")  # a fault stopped that peer meanwhile
        else:
            _count(self.notes, "unanswered")
            if len(self.notes["examples"]) < 5:
                self.notes["examples"].append(f"{peer.node_id}: {type(error).__name__}: {error}")


def _post(peer: PeerProcess, path: str, body: bytes, headers: dict[str, str], answers: _Answers,
          timeout_s: float = 10.0) -> None:
    """One request on a connection of its own; the body may be refused before it is sent."""
    head = f"POST {path} HTTP/1.1\r\nHost: redge\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sent = False
    try:
        with socket.create_connection(("127.0.0.1", int(peer.url.rsplit(":", 1)[1])), timeout=timeout_s) as sock:
            sock.sendall(head.encode())
            sent = True
            view = memoryview(body)
            offset = 0
            try:
                while offset < len(body):
                    offset += sock.send(view[offset : offset + (1 << 20)])
            except OSError:
                pass  # the peer answered early and closed: read that answer
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionResetError("closed without an answer")
                data += chunk
            answers.answered(int(data.split(b" ", 2)[1]))
    except (OSError, ValueError, IndexError) as error:
        answers.failed(peer, error, sent)


@dataclass(frozen=True)
class HttpFuzz(Fault):
    """`rate_per_s` random inference requests (random bytes, broken or deep JSON, shapes the
    model cannot take, lying binary headers) at random running peers. Every one must get an
    answer: the fault counts those that got none (`unanswered`), which the checker refuses."""

    app: str = "det"
    rate_per_s: float = 30.0
    kind: ClassVar[str] = "http-fuzz"

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        record = nemesis.record_of(self)
        answers = _Answers(record.notes if record is not None else {}, nemesis)
        rng = random.Random(nemesis.rng.randrange(2**32))

        def run(stop: threading.Event) -> None:
            while not stop.is_set():
                targets = _running_targets(nemesis)
                if targets:
                    body, headers = random_body(rng)
                    _post(rng.choice(targets), f"/v2/models/{self.app}/infer", body, headers, answers)
                stop.wait(1.0 / self.rate_per_s)

        nemesis.start_background(self, run)
        return ()

    def heal(self, nemesis: Nemesis) -> None:
        nemesis.stop_background(self)


@dataclass(frozen=True)
class OversizedBodies(Fault):
    """Huge requests at random running peers, `concurrency` at a time: JSON tensors of
    `json_megabytes` (a shape the model cannot take) and binary ones of `binary_megabytes`.
    Each must be answered (413 or 503, before the peer reads it all), never dropped."""

    app: str = "det"
    json_megabytes: int = 48
    binary_megabytes: int = 60
    concurrency: int = 2
    kind: ClassVar[str] = "oversized-bodies"

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        record = nemesis.record_of(self)
        answers = _Answers(record.notes if record is not None else {}, nemesis)
        json_body = huge_json_body(self.json_megabytes * (1 << 20) // 4)
        binary_size = self.binary_megabytes * (1 << 20) // 4 * 4
        header = ('{"inputs":[{"name":"input","datatype":"FP32","shape":[1,%d],"parameters":{"binary_data_size":%d}}]}'
                  % (binary_size // 4, binary_size)).encode()
        binary_body = header + bytes(binary_size)
        bodies = [(json_body, {"Content-Type": "application/json"}),
                  (binary_body, {"Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(len(header))})]

        def run(stop: threading.Event, lane: int) -> None:
            rng = random.Random(lane)
            turn = lane
            while not stop.is_set():
                targets = _running_targets(nemesis)
                if targets:
                    body, headers = bodies[turn % 2]
                    turn += 1
                    _post(rng.choice(targets), f"/v2/models/{self.app}/infer", body, headers, answers, timeout_s=30.0)
                stop.wait(0.05)

        for lane in range(self.concurrency):
            nemesis.start_background((self, lane), lambda stop, lane=lane: run(stop, lane))
        return ()

    def heal(self, nemesis: Nemesis) -> None:
        for lane in range(self.concurrency):
            nemesis.stop_background((self, lane))


HOSTILE_FAULT_KINDS: dict[str, type[Fault]] = {
    cls.kind: cls for cls in (IcmpSweep, RaftFlood, HttpFuzz, OversizedBodies)
}
