"""The heartbeat service: UDP heartbeats and probes in and out, around the pure detector.

This is the I/O shell of failure detection (the arithmetic is in
`agent/detector.py`). It decides nothing itself:

- sends a small authenticated heartbeat to every target on a fixed rhythm,
  measuring its own scheduling lag on every wake (the detector's local health
  reads it), because a late sender looks exactly like a dying node to everyone
  who watches it;
- receives on one socket bound to this node's heartbeat address, drops
  anything forged, foreign or malformed (counted, never raised), and feeds the
  rest to the `Monitor`;
- keeps one *connected* UDP socket per target, because only a connected socket
  reports the kernel's ICMP "port unreachable" (ECONNREFUSED). That report is a
  hint and nothing more: anyone who can send an ICMP packet can forge one. The
  monitor answers a hint (this one, or the Raft connection to the node
  dropping: `on_disconnected`) with a probe round, and only a round nobody
  answers becomes a suspicion. A refused send is retried at once, so forged
  ICMP cannot silence this node's heartbeats either;
- sends the monitor's probes (`Probe`): an authenticated ping to the node, and
  ping-reqs asking other members to ping it for us (SWIM); answers pings with
  acks, and relays the acks of pings it sent for others. Probes go out of the
  unconnected bound socket, which the kernel never reports ICMP errors on.

Verdicts go out through the `on_verdict` callback; the peer proposes them
into Raft.

Wire format, big-endian. Heartbeats (version 1, 45 + len(node_id) bytes):

    magic "RH" | version u8 (1) | flags u8 (0) | incarnation u64 | sequence u64 |
    sent_us u64 (sender's monotonic clock) | node_id length u8 | node_id utf-8 |
    HMAC-SHA256(key, all of the above) truncated to 16 bytes

Probes (version 2; a version-1 peer drops them as `bad_version`):

    magic "RH" | version u8 (2) | kind u8 | incarnation u64 | nonce u64 | sent_us u64 |
    sender length u8 | subject length u8 | sender utf-8 | subject utf-8 | HMAC (16 bytes)

    kind 1 ping:      sender asks subject (the receiver) to answer, with nonce
    kind 2 ack:       sender answers subject's ping `nonce`; incarnation is the sender's
    kind 3 ping-req:  sender asks the receiver to ping subject for it, with its nonce
    kind 4 ack-relay: the receiver's ping-req `nonce` was answered by subject, whose
                      incarnation it carries

The key is derived from the cluster secret with a fixed label, so the
heartbeat key is never the Raft password itself. Replays are harmless: the
detector ignores sequences it has seen and incarnations lower than the
current one, and an ack counts only for the probe round its nonce names.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from redge.agent.clock import Clock, MonotonicClock
from redge.agent.detector import Monitor, NodeHealth
from redge.agent.detector_settings import DetectorSettings
from redge.agent.slowness import SlownessSettings
from redge.agent.verdicts import Degraded, Hint, Output, Probe, Quiet, Recover, Restarted, Restored, Suspect, Verdict

log = structlog.get_logger("redge.heartbeat")

# ---------------------------------------------------------------------------
# wire format (pure)

MAGIC = b"RH"
VERSION = 1
MAC_BYTES = 16
MAX_NODE_ID_BYTES = 64
_HEADER = struct.Struct(">2sBBQQQB")
MIN_PACKET_BYTES = _HEADER.size + 1 + MAC_BYTES
MAX_PACKET_BYTES = _HEADER.size + MAX_NODE_ID_BYTES + MAC_BYTES
_KEY_LABEL = b"redge/heartbeat/v1"
_U64_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node_id: str
    incarnation: int
    sequence: int
    sent_us: int


class HeartbeatRejected(Exception):
    """A datagram that is not a valid heartbeat; `reason` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def heartbeat_key(secret: bytes) -> bytes:
    """The HMAC key for heartbeats, derived from the cluster secret."""
    assert secret, "the cluster secret must not be empty"
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def encode_heartbeat(key: bytes, heartbeat: Heartbeat) -> bytes:
    node_id = heartbeat.node_id.encode()
    assert 1 <= len(node_id) <= MAX_NODE_ID_BYTES, "node id must be 1..64 bytes of utf-8"
    for value in (heartbeat.incarnation, heartbeat.sequence, heartbeat.sent_us):
        assert 0 <= value <= _U64_MAX
    body = _HEADER.pack(
        MAGIC, VERSION, 0, heartbeat.incarnation, heartbeat.sequence, heartbeat.sent_us,
        len(node_id),
    ) + node_id
    return body + hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]


def decode_heartbeat(key: bytes, data: bytes) -> Heartbeat:
    """Parse and authenticate one datagram; raises only HeartbeatRejected."""
    if len(data) < MIN_PACKET_BYTES:
        raise HeartbeatRejected("truncated")
    if len(data) > MAX_PACKET_BYTES:
        raise HeartbeatRejected("oversized")
    magic, version, _flags, incarnation, sequence, sent_us, id_length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HeartbeatRejected("bad_magic")
    if version != VERSION:
        raise HeartbeatRejected("bad_version")
    if id_length < 1 or len(data) != _HEADER.size + id_length + MAC_BYTES:
        raise HeartbeatRejected("bad_length")
    body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    expected = hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]
    if not hmac.compare_digest(mac, expected):
        raise HeartbeatRejected("bad_mac")
    try:
        node_id = body[_HEADER.size:].decode()
    except UnicodeDecodeError:
        raise HeartbeatRejected("bad_node_id") from None
    return Heartbeat(node_id, incarnation, sequence, sent_us)


class ProbeKind(enum.IntEnum):
    PING = 1
    ACK = 2
    PING_REQ = 3
    ACK_RELAY = 4


PROBE_VERSION = 2
_PROBE_HEADER = struct.Struct(">2sBBQQQBB")
MAX_PROBE_BYTES = _PROBE_HEADER.size + 2 * MAX_NODE_ID_BYTES + MAC_BYTES
MIN_PROBE_BYTES = _PROBE_HEADER.size + 2 + MAC_BYTES
RECEIVE_BYTES = max(MAX_PACKET_BYTES, MAX_PROBE_BYTES) + 1


@dataclass(frozen=True, slots=True)
class ProbePacket:
    kind: ProbeKind
    sender: str
    subject: str
    incarnation: int
    nonce: int
    sent_us: int


def encode_probe(key: bytes, packet: ProbePacket) -> bytes:
    sender, subject = packet.sender.encode(), packet.subject.encode()
    assert 1 <= len(sender) <= MAX_NODE_ID_BYTES and 1 <= len(subject) <= MAX_NODE_ID_BYTES
    for value in (packet.incarnation, packet.nonce, packet.sent_us):
        assert 0 <= value <= _U64_MAX
    body = _PROBE_HEADER.pack(
        MAGIC, PROBE_VERSION, int(packet.kind), packet.incarnation, packet.nonce, packet.sent_us,
        len(sender), len(subject),
    ) + sender + subject
    return body + hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]


def decode_packet(key: bytes, data: bytes) -> Heartbeat | ProbePacket:
    """Parse and authenticate one datagram of either version; raises only HeartbeatRejected."""
    if len(data) >= 3 and data[:2] == MAGIC and data[2] == PROBE_VERSION:
        return _decode_probe(key, data)
    return decode_heartbeat(key, data)


def _decode_probe(key: bytes, data: bytes) -> ProbePacket:
    if len(data) < MIN_PROBE_BYTES:
        raise HeartbeatRejected("truncated")
    if len(data) > MAX_PROBE_BYTES:
        raise HeartbeatRejected("oversized")
    _magic, _version, kind, incarnation, nonce, sent_us, sender_length, subject_length = _PROBE_HEADER.unpack_from(data)
    if not (1 <= sender_length <= MAX_NODE_ID_BYTES and 1 <= subject_length <= MAX_NODE_ID_BYTES) or len(data) != (
        _PROBE_HEADER.size + sender_length + subject_length + MAC_BYTES
    ):
        raise HeartbeatRejected("bad_length")
    body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]):
        raise HeartbeatRejected("bad_mac")
    try:
        probe_kind = ProbeKind(kind)
    except ValueError:
        raise HeartbeatRejected("bad_kind") from None
    names = body[_PROBE_HEADER.size:]
    try:
        sender, subject = names[:sender_length].decode(), names[sender_length:].decode()
    except UnicodeDecodeError:
        raise HeartbeatRejected("bad_node_id") from None
    return ProbePacket(probe_kind, sender, subject, incarnation, nonce, sent_us)


# ---------------------------------------------------------------------------
# the service (I/O)

Address = tuple[str, int]
Target = tuple[str, Address, int]

# Datagrams read per readiness callback: enough to drain a burst queued during
# a stall before the detector judges, small enough not to starve the loop.
_DRAIN_MAX = 256


@dataclass(frozen=True, slots=True)
class HeartbeatStats:
    heartbeats_sent: int
    send_errors: int
    refusals: int  # ECONNREFUSED seen on a target's socket (a hint: forgeable)
    packets_received: int
    heartbeats_accepted: int
    packets_rejected: dict[str, int]
    # Scheduling lag of the send rhythm: how late each send ran versus its slot.
    send_lag_ms_last: float
    send_lag_ms_max: float
    send_gap_ms_max: float  # longest time between two consecutive sends
    sends_late: int  # lag above half an interval
    send_slots_skipped: int  # slots dropped after a stall instead of a burst
    self_pauses: int
    self_pause_ms_max: float
    phi_at_arrival_max: float  # the highest phi a heartbeat arrived at, unsuspected
    targets: int
    suspected: list[str]
    probes_sent: int = 0  # pings sent for our own probe rounds
    probe_rounds: int = 0
    probe_rounds_answered: int = 0
    hints_refuted: int = 0  # refusals and dropped connections that a probe answer disproved
    acks_sent: int = 0
    relays: int = 0  # pings sent for other members (ping-req)
    local_health_score: int = 0


@dataclass(slots=True)
class _Peer:
    node_id: str
    address: Address
    incarnation: int
    sock: socket.socket | None = None


@dataclass(slots=True)
class _Relay:
    """A ping this node sent for another member (a ping-req): whom to tell when it is answered."""

    requester_address: Address
    subject: str
    requester_nonce: int
    expires_ms: float


RELAYS_MAX = 256
RELAY_LIFETIME_MS = 2_000.0
# A refused send is retried at once this many times: the refusal consumed the pending ICMP
# error, so the next send goes out unless another forged packet landed in between.
REFUSED_SEND_RETRIES = 2


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class HeartbeatService:
    """UDP heartbeats for one peer: send to targets, watch what they send back.

    `set_targets` takes (node_id, (host, port), incarnation) for each node to
    exchange heartbeats with (see `detector.monitoring_targets`); the
    incarnation is the one the cluster last committed for it (0 if unknown).
    `set_members` takes every member's heartbeat address: any of them may be
    asked to probe a node for us, or ask us to probe one for them.
    `transport_open(node_id)` says whether this peer's Raft connection to a node
    is up (a refusal from a node whose connection is up suspects nothing alone).
    """

    def __init__(
        self,
        node_id: str,
        bind_address: Address,
        secret: bytes,
        settings: DetectorSettings,
        clock: Clock | None = None,
        on_verdict: Callable[[Verdict], None] | None = None,
        *,
        incarnation: int | None = None,
        slowness: SlownessSettings | None = None,
        max_targets: int = 1024,
        transport_open: Callable[[str], bool] | None = None,
    ) -> None:
        encoded = node_id.encode()
        if not 1 <= len(encoded) <= MAX_NODE_ID_BYTES:
            raise ValueError("node id must be 1..64 bytes of utf-8")
        self.node_id = node_id
        self.bind_address = bind_address
        self.settings = settings
        self.clock: Clock = clock or MonotonicClock()
        self.on_verdict = on_verdict
        self.transport_open = transport_open or (lambda _node_id: False)
        # Wall-clock microseconds make a restarted process's incarnation
        # higher than its previous one without any stored state.
        self.incarnation = incarnation if incarnation is not None else time.time_ns() // 1000
        # Probe round ids start at a random point: an ack recorded in an earlier life of
        # this process matches no round of this one.
        self.monitor = Monitor(settings, slowness, max_watched=max_targets,
                               round_base=int.from_bytes(os.urandom(6), "big"))
        self._key = heartbeat_key(secret)
        self._max_targets = max_targets
        self._peers: dict[str, _Peer] = {}
        # Targets just dropped, still sent to until the given time (see `set_targets`).
        self._lingering: dict[str, tuple[_Peer, float]] = {}
        # Every member's heartbeat address (the probe address book).
        self._members: dict[str, Address] = {}
        self._relays: dict[int, _Relay] = {}
        self._relay_nonce = int.from_bytes(os.urandom(6), "big")
        self._sequence = 0
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._check_wake: asyncio.Event | None = None
        self._heartbeats_sent = 0
        self._send_errors = 0
        self._refusals = 0
        self._packets_received = 0
        self._heartbeats_accepted = 0
        self._probes_sent = 0
        self._acks_sent = 0
        self._relays_sent = 0
        self._rejected: dict[str, int] = {}
        self._send_lag_ms_last = 0.0
        self._send_lag_ms_max = 0.0
        self._sends_late = 0
        self._send_slots_skipped = 0
        self._send_gap_ms_max = 0.0
        self._log = log.bind(node=node_id)

    # -- lifecycle

    @property
    def address(self) -> Address:
        """The bound heartbeat address (the real port when bound to port 0)."""
        assert self._socket is not None, "not started"
        host, port = self._socket.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        assert self._socket is None, "already started"
        self._loop = asyncio.get_running_loop()
        self._check_wake = asyncio.Event()
        host, port = self.bind_address
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)
        now_ms = self.clock.now_ms()
        for peer in self._peers.values():
            self._open(peer)
            self.monitor.watch(peer.node_id, peer.incarnation, now_ms)
        self._tasks = [
            asyncio.create_task(self._send_loop(), name=f"heartbeat-send-{self.node_id}"),
            asyncio.create_task(self._check_loop(), name=f"heartbeat-check-{self.node_id}"),
        ]
        self._log.info(
            "heartbeat_service_started", address=self.address, incarnation=self.incarnation,
            profile=self.settings.name, targets=len(self._peers),
        )

    async def stop(self) -> None:
        """Stop sending and receiving; idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        for peer in self._peers.values():
            self._close(peer)
        for peer, _ in self._lingering.values():
            self._close(peer)
        self._lingering.clear()
        if self._socket is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
            self._log.info("heartbeat_service_stopped")

    # -- targets

    def set_incarnation(self, incarnation: int) -> None:
        """Start a new life: a new incarnation, its sequence numbers from 1 again (watchers
        read `sequence x interval` as how long this incarnation has run). Call it on the
        service's own loop, so that no heartbeat goes out with one changed and not the other."""
        if incarnation != self.incarnation:
            self.incarnation = incarnation
            self._sequence = 0

    def set_members(self, members: Iterable[tuple[str, Address]]) -> None:
        """Every member's heartbeat address, this node's own left out."""
        book = {node_id: (host, int(port)) for node_id, (host, port) in members if node_id != self.node_id}
        self._members = book
        self.monitor.set_members(book)

    def set_targets(self, targets: Iterable[Target], linger_ms: float = 0.0) -> None:
        """Exchange heartbeats with exactly these nodes from now on.

        A dropped target is no longer watched at once, but with `linger_ms` it is still sent
        heartbeats for that long: when the watch sets rotate, peers reach the turn at
        slightly different moments (their clocks), and a watcher that has not turned yet
        must not find this node silent. Heartbeats from a lingering node are taken quietly."""
        wanted: dict[str, _Peer] = {}
        for node_id, (host, port), incarnation in targets:
            if node_id == self.node_id:
                continue
            if not 1 <= len(node_id.encode()) <= MAX_NODE_ID_BYTES:
                raise ValueError(f"node id {node_id!r} must be 1..64 bytes of utf-8")
            wanted[node_id] = _Peer(node_id, (host, int(port)), int(incarnation))
        if len(wanted) > self._max_targets:
            raise ValueError(f"{len(wanted)} targets exceed the bound of {self._max_targets}")
        started = self._socket is not None
        now_ms = self.clock.now_ms()
        for node_id in [n for n in self._peers if n not in wanted]:
            dropped = self._peers.pop(node_id)
            self.monitor.unwatch(node_id)
            if linger_ms > 0 and dropped.sock is not None:
                self._lingering[node_id] = (dropped, now_ms + linger_ms)
            else:
                self._close(dropped)
        for node_id, peer in wanted.items():
            if node_id in self._lingering:  # dropped a moment ago, wanted again: same socket
                self._peers[node_id], _ = self._lingering.pop(node_id)
            current = self._peers.get(node_id)
            if current is not None and current.address == peer.address:
                current.incarnation = max(current.incarnation, peer.incarnation)
                peer = current
            else:
                if current is not None:
                    self._close(current)
                self._peers[node_id] = peer
                if started:
                    self._open(peer)
            if started:
                self.monitor.watch(node_id, peer.incarnation, now_ms)
        for node_id, peer in self._peers.items():  # watched nodes are members too
            self._members.setdefault(node_id, peer.address)

    def _open(self, peer: _Peer) -> None:
        assert self._loop is not None and peer.sock is None
        sock = socket.socket(_family(peer.address[0]), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(peer.address)
        except OSError as error:
            sock.close()
            self._send_errors += 1
            self._log.warning("heartbeat_target_unusable", target=peer.node_id,
                              address=peer.address, error=str(error))
            return
        peer.sock = sock
        self._loop.add_reader(sock.fileno(), self._on_target_readable, peer)

    def _close(self, peer: _Peer) -> None:
        if peer.sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(peer.sock.fileno())
        peer.sock.close()
        peer.sock = None

    # -- sending

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.settings.heartbeat_interval_ms / 1000.0
        slot_s = loop.time()
        previous_send_s: float | None = None
        while True:
            now_s = loop.time()
            if previous_send_s is not None:
                self._send_gap_ms_max = max(self._send_gap_ms_max,
                                            (now_s - previous_send_s) * 1000.0)
            previous_send_s = now_s
            lag_ms = max(0.0, (now_s - slot_s) * 1000.0)
            self._send_lag_ms_last = lag_ms
            self._send_lag_ms_max = max(self._send_lag_ms_max, lag_ms)
            self.monitor.on_lag(lag_ms, self.clock.now_ms())
            if lag_ms > self.settings.heartbeat_interval_ms / 2.0:
                self._sends_late += 1
            self._send_all()
            slot_s += interval_s
            if slot_s <= now_s:
                # After a stall, resume the rhythm rather than send a burst:
                # a burst of stale heartbeats tells the watchers nothing new.
                skipped = int((now_s - slot_s) / interval_s) + 1
                self._send_slots_skipped += skipped
                slot_s += skipped * interval_s
            await asyncio.sleep(slot_s - loop.time())

    def _send_all(self) -> None:
        self._sequence += 1
        sent_us = max(0, int(self.clock.now_ms() * 1000.0))
        payload = encode_heartbeat(
            self._key, Heartbeat(self.node_id, self.incarnation, self._sequence, sent_us)
        )
        if self._lingering:
            now_ms = self.clock.now_ms()
            for node_id, (peer, until_ms) in list(self._lingering.items()):
                if now_ms >= until_ms:
                    del self._lingering[node_id]
                    self._close(peer)
        for peer in [*self._peers.values(), *(peer for peer, _ in self._lingering.values())]:
            self._send_heartbeat(peer, payload)

    def _send_heartbeat(self, peer: _Peer, payload: bytes) -> None:
        for _ in range(1 + REFUSED_SEND_RETRIES):
            if peer.sock is None:
                return
            try:
                peer.sock.send(payload)
                self._heartbeats_sent += 1
                return
            except ConnectionRefusedError:
                # The pending ICMP error is consumed by this call: report it, send again.
                self._on_refused(peer)
            except BlockingIOError:
                self._send_errors += 1  # socket buffer full: this heartbeat is lost
                return
            except OSError as error:
                self._send_errors += 1
                if error.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    self._log.debug("heartbeat_send_failed", target=peer.node_id, error=str(error))
                return
        self._send_errors += 1

    def _send_probe_packet(self, address: Address, packet: ProbePacket) -> bool:
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.sendto(encode_probe(self._key, packet), address)
            return True
        except OSError as error:  # buffer full, no route: the round's timeout covers it
            self._send_errors += 1
            self._log.debug("probe_send_failed", address=address, kind=packet.kind.name, error=str(error))
            return False

    def _sent_us(self) -> int:
        return max(0, int(self.clock.now_ms() * 1000.0))

    def _carry_out(self, probe: Probe) -> None:
        """Send what the monitor asked for: a ping to the node, ping-reqs to its helpers."""
        address = self._members.get(probe.node_id)
        if address is not None and self._send_probe_packet(
            address, ProbePacket(ProbeKind.PING, self.node_id, probe.node_id, self.incarnation, probe.round_id, self._sent_us())
        ):
            self._probes_sent += 1
        for helper in probe.helpers:
            helper_address = self._members.get(helper)
            if helper_address is not None:
                self._send_probe_packet(helper_address, ProbePacket(
                    ProbeKind.PING_REQ, self.node_id, probe.node_id, self.incarnation, probe.round_id, self._sent_us()
                ))

    # -- receiving

    def _on_readable(self) -> None:
        sock = self._socket
        if sock is None:
            return
        for _ in range(_DRAIN_MAX):
            try:
                data, source = sock.recvfrom(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._reject("socket_error")
                self._log.debug("heartbeat_receive_failed", error=str(error))
                return
            self._on_datagram(data, source)

    def _on_datagram(self, data: bytes, source: Address | None = None) -> None:
        self._packets_received += 1
        try:
            packet = decode_packet(self._key, data)
        except HeartbeatRejected as rejection:
            self._reject(rejection.reason)
            return
        if isinstance(packet, ProbePacket):
            self._on_probe_packet(packet, source)
            return
        heartbeat = packet
        if heartbeat.node_id not in self._peers:
            if heartbeat.node_id not in self._lingering:
                self._reject("unknown_sender")
            return
        self._heartbeats_accepted += 1
        verdicts = self.monitor.on_heartbeat(
            heartbeat.node_id, heartbeat.incarnation, heartbeat.sequence, self.clock.now_ms(),
            sent_ms=heartbeat.sent_us / 1000.0,
        )
        self._emit(verdicts)

    def _on_probe_packet(self, packet: ProbePacket, source: Address | None) -> None:
        if packet.sender == self.node_id:
            self._reject("own_probe")
            return
        if packet.kind is ProbeKind.PING:
            if packet.subject != self.node_id or source is None:
                self._reject("misaddressed_probe")
                return
            if self._send_probe_packet(source, ProbePacket(
                ProbeKind.ACK, self.node_id, packet.sender, self.incarnation, packet.nonce, self._sent_us()
            )):
                self._acks_sent += 1
        elif packet.kind is ProbeKind.PING_REQ:
            self._relay(packet, source)
        elif packet.kind is ProbeKind.ACK:
            if packet.subject != self.node_id:
                self._reject("misaddressed_probe")
                return
            relay = self._relays.pop(packet.nonce, None)
            if relay is not None:
                if relay.subject == packet.sender:
                    self._send_probe_packet(relay.requester_address, ProbePacket(
                        ProbeKind.ACK_RELAY, self.node_id, packet.sender, packet.incarnation,
                        relay.requester_nonce, self._sent_us(),
                    ))
                return
            self._emit(self.monitor.on_ack(packet.sender, packet.nonce, packet.incarnation, self.clock.now_ms()))
        elif packet.kind is ProbeKind.ACK_RELAY:
            self._emit(self.monitor.on_ack(packet.subject, packet.nonce, packet.incarnation, self.clock.now_ms()))

    def _relay(self, packet: ProbePacket, source: Address | None) -> None:
        """Ping `packet.subject` for `packet.sender`, and remember whom to tell (bounded)."""
        address = self._members.get(packet.subject)
        if address is None or source is None or packet.subject == self.node_id:
            self._reject("unrelayable_probe")
            return
        now_ms = self.clock.now_ms()
        for nonce in [n for n, relay in self._relays.items() if relay.expires_ms <= now_ms]:
            del self._relays[nonce]
        while len(self._relays) >= RELAYS_MAX:
            del self._relays[next(iter(self._relays))]
        self._relay_nonce = (self._relay_nonce + 1) & _U64_MAX
        self._relays[self._relay_nonce] = _Relay(source, packet.subject, packet.nonce, now_ms + RELAY_LIFETIME_MS)
        if self._send_probe_packet(address, ProbePacket(
            ProbeKind.PING, self.node_id, packet.subject, self.incarnation, self._relay_nonce, self._sent_us()
        )):
            self._relays_sent += 1

    def _on_target_readable(self, peer: _Peer) -> None:
        sock = peer.sock
        if sock is None:
            return
        for _ in range(_DRAIN_MAX):
            try:
                sock.recv(RECEIVE_BYTES)
                self._reject("unexpected_on_target_socket")
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._on_refused(peer)
            except OSError as error:
                self._send_errors += 1
                self._log.debug("heartbeat_target_error", target=peer.node_id, error=str(error))
                return

    def _on_refused(self, peer: _Peer) -> None:
        self._refusals += 1
        self._hint(peer.node_id, Hint.REFUSED)

    def on_disconnected(self, node_id: str) -> None:
        """This peer's Raft connection to `node_id` dropped (call on the service's loop)."""
        self._hint(node_id, Hint.DISCONNECTED)

    def _hint(self, node_id: str, hint: Hint) -> None:
        try:
            transport_open = hint is Hint.REFUSED and self.transport_open(node_id)
        except Exception:  # noqa: BLE001 - the owner's callback must not stop detection
            self._log.exception("transport_state_unknown", target=node_id)
            transport_open = False
        self._emit(self.monitor.on_hint(node_id, hint, self.clock.now_ms(), transport_open=transport_open))

    def _reject(self, reason: str) -> None:
        count = self._rejected.get(reason, 0) + 1
        self._rejected[reason] = count
        if count & (count - 1) == 0:  # log the 1st, 2nd, 4th, 8th...: bounded under a flood
            self._log.warning("heartbeat_rejected", reason=reason, count=count)

    # -- judging

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._check_wake
        assert wake is not None
        while True:
            now_ms = self.clock.now_ms()
            self._emit(self.monitor.tick(now_ms), wake_checker=False)
            delay_s = (self.monitor.next_check_ms(now_ms) - now_ms) / 1000.0
            wake_s = loop.time() + delay_s
            wake.clear()
            try:
                async with asyncio.timeout(delay_s):
                    await wake.wait()
                woken_early = True
            except TimeoutError:
                woken_early = False
            lag_ms = 0.0 if woken_early else max(0.0, (loop.time() - wake_s) * 1000.0)
            now_ms = self.clock.now_ms()
            self.monitor.on_lag(lag_ms, now_ms)
            if lag_ms > self.settings.self_pause_threshold_ms:
                # This process did not run: the silence is ours, not theirs.
                self.monitor.on_self_pause(lag_ms, now_ms)
                self._log.warning("self_pause_detected", pause_ms=round(lag_ms, 1))

    def _emit(self, outputs: list[Output], wake_checker: bool = True) -> None:
        for output in outputs:
            if isinstance(output, Probe):
                self._carry_out(output)
                if wake_checker and self._check_wake is not None:
                    self._check_wake.set()  # a round started: its next attempt and deadline count
                continue
            _log_verdict(self._log, output)
            if self.on_verdict is None:
                continue
            try:
                self.on_verdict(output)
            except Exception:  # noqa: BLE001
                # The consumer's bug must not stop failure detection.
                self._log.exception("verdict_handler_failed", verdict=repr(output))

    # -- observation

    def stats(self) -> HeartbeatStats:
        monitor = self.monitor
        return HeartbeatStats(
            heartbeats_sent=self._heartbeats_sent,
            send_errors=self._send_errors,
            refusals=self._refusals,
            packets_received=self._packets_received,
            heartbeats_accepted=self._heartbeats_accepted,
            packets_rejected=dict(self._rejected),
            send_lag_ms_last=self._send_lag_ms_last,
            send_lag_ms_max=self._send_lag_ms_max,
            send_gap_ms_max=self._send_gap_ms_max,
            sends_late=self._sends_late,
            send_slots_skipped=self._send_slots_skipped,
            self_pauses=monitor.self_pauses,
            self_pause_ms_max=monitor.self_pause_ms_max,
            phi_at_arrival_max=monitor.phi_at_arrival_max,
            targets=len(self._peers),
            suspected=[n for n in self._peers if monitor.is_suspected(n)],
            probes_sent=self._probes_sent,
            probe_rounds=monitor.probes_started,
            probe_rounds_answered=monitor.probes_answered,
            hints_refuted=monitor.hints_refuted(),
            acks_sent=self._acks_sent,
            relays=self._relays_sent,
            local_health_score=monitor.local_health.score,
        )

    def health(self) -> list[NodeHealth]:
        return self.monitor.health(self.clock.now_ms())


def _log_verdict(bound_log: structlog.typing.FilteringBoundLogger, verdict: Verdict) -> None:
    match verdict:
        case Suspect():
            bound_log.warning("node_suspected", target=verdict.node_id, reason=str(verdict.reason),
                              phi=round(verdict.phi, 2), incarnation=verdict.incarnation)
        case Recover():
            bound_log.info("node_recovered", target=verdict.node_id,
                           incarnation=verdict.incarnation)
        case Restarted():
            bound_log.info("node_restarted", target=verdict.node_id,
                           previous_incarnation=verdict.previous_incarnation,
                           incarnation=verdict.incarnation)
        case Degraded():
            bound_log.warning("node_degraded", target=verdict.node_id,
                              reason=str(verdict.reason), measure=round(verdict.measure, 2))
        case Restored():
            bound_log.info("node_restored", target=verdict.node_id)
        case Quiet():
            bound_log.debug("node_quiet", target=verdict.node_id, silent_ms=round(verdict.silent_ms, 1))
