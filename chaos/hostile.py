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
