"""Every access to pysyncobj's internals, in one place, pinned to the versions it was read from.

pysyncobj has no public hooks for what redge needs from it: the election deadline (to stand
for election in turns when a leader is gone), its wake-up pipe, the transport's disconnect
callback, and a transport that does not trust the bytes it reads. Reaching into
name-mangled attributes from all over the adapter would break silently on an upgrade; here
each access is one small function, `check_version` refuses a pysyncobj this file was not
read against, and tests/consensus/test_shim.py exercises every function on the pinned
version.

The frame guard. pysyncobj's TCP connection reads a 4-byte length, then buffers until that
many bytes arrived, appending to an immutable `bytes` (each append copies the whole buffer)
and only then tries to authenticate the frame. A length header of 0x7fffffff from anyone,
without the cluster secret, made a peer buffer everything sent to it at quadratic cost: 51 MB
of garbage froze a leader long enough to be deposed and confirmed failed. The guard replaces
the connection's read and parse steps: the buffer is a `bytearray` (linear), and a frame
whose length is not positive or exceeds what its connection may legally send is refused on
its header, before its body is buffered, and the connection is closed. A connection that has
not yet proved it holds the secret (its first frame decrypts) may send only the small frames
of the key exchange; after that, the largest legal Raft message. Connections that never
authenticate are capped in number and closed after `UNAUTHENTICATED_TIMEOUT_S`.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pysyncobj
import pysyncobj.pickle as raft_pickle
from pysyncobj import SyncObj
from pysyncobj.monotonic import monotonic as raft_clock_s
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from redge.consensus.commands import MAX_COMMAND_BYTES

# The versions of pysyncobj whose internals this module was written against and tested on.
SUPPORTED_VERSIONS = ("0.3.12", "0.3.13", "0.3.14", "0.3.15", "0.3.16", "0.3.17")

# pysyncobj sends log entries in batches of at most `appendEntriesBatchSizeBytes` (64 KiB by
# default) plus the entry that crosses it, a state dump in 64 KiB chunks, and one entry of up
# to MAX_COMMAND_BYTES on its own. Pickling and zlib add little; Fernet's base64 adds a third.
RAFT_BATCH_BYTES = 64 * 1024
FRAME_BYTES_MAX = (MAX_COMMAND_BYTES + 2 * RAFT_BATCH_BYTES) * 4 // 3 + 64 * 1024
# Before the key exchange: a 32-byte random key, pickled, compressed and encrypted (~200 bytes).
UNAUTHENTICATED_FRAME_BYTES_MAX = 4096
UNAUTHENTICATED_CONNECTIONS_MAX = 32
UNAUTHENTICATED_TIMEOUT_S = 3.0
LISTEN_BACKLOG = 128
_LENGTH = struct.Struct("i")  # pysyncobj's own framing: native-endian signed 32-bit


class ShimError(RuntimeError):
    """The installed pysyncobj is not one whose internals this module knows."""


def check_version() -> str:
    version = getattr(pysyncobj, "__version__", None) or _read_version()
    if version not in SUPPORTED_VERSIONS:
        raise ShimError(
            f"pysyncobj {version} is not one of {', '.join(SUPPORTED_VERSIONS)}; "
            "redge reaches into its internals (consensus/shim.py): read them again before allowing it"
        )
    return version


def _read_version() -> str:
    from pysyncobj.version import VERSION

    return VERSION


# ---------------------------------------------------------------------- frame guard


def _refused_nowhere(reason: str) -> None:
    pass


# Told the reason of every refusal, on pysyncobj's tick threads (the adapter counts them:
# consensus/raft.py `frame_stats`); set by `install_frame_guard`.
_on_refused: Callable[[str], None] = _refused_nowhere
_installed = False


def frame_bytes_max(connection: TcpConnection) -> int:
    """The largest frame `connection` may send now: small until its key exchange is done."""
    if connection.encryptor is not None and not connection.sendRandKey:
        return UNAUTHENTICATED_FRAME_BYTES_MAX
    return FRAME_BYTES_MAX


def frame_length_problem(header: bytes | bytearray | memoryview, limit: int) -> str | None:
    """Why a frame with this 4-byte length header must be refused, or None. Pure."""
    (length,) = _LENGTH.unpack_from(header)
    if length <= 0:
        return "bad_length"
    if length > limit:
        return "oversized"
    return None


def _buffer(connection: TcpConnection) -> bytearray:
    buffer = connection._TcpConnection__readBuffer
    if not isinstance(buffer, bytearray):  # connect() and disconnect() reset it to bytes()
        buffer = bytearray(buffer)
        connection._TcpConnection__readBuffer = buffer
    return buffer


def _refuse(connection: TcpConnection, reason: str) -> None:
    _on_refused(reason)
    connection.disconnect()


def _guarded_process_read(self: TcpConnection) -> bool:
    """One recv into a linear buffer; refuses an illegal frame as soon as its header is in."""
    sock = self._TcpConnection__socket
    try:
        incoming = sock.recv(self._TcpConnection__recvBufferSize)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            self.disconnect()
        return False
    if not incoming:
        self.disconnect()
        return False
    buffer = _buffer(self)
    buffer += incoming
    if len(buffer) >= _LENGTH.size:
        problem = frame_length_problem(buffer, frame_bytes_max(self))
        if problem is not None:
            _refuse(self, problem)
            return False
    return True


def _guarded_parse_message(self: TcpConnection) -> Any:
    """pysyncobj's frame parsing, on the linear buffer and with the length checked first."""
    buffer = _buffer(self)
    if len(buffer) < _LENGTH.size:
        return None
    problem = frame_length_problem(buffer, frame_bytes_max(self))
    if problem is not None:
        _refuse(self, problem)
        return None
    (length,) = _LENGTH.unpack_from(buffer)
    if len(buffer) - _LENGTH.size < length:
        return None
    data = bytes(buffer[_LENGTH.size : _LENGTH.size + length])
    try:
        if self.encryptor:
            timestamp = self.encryptor.extract_timestamp(data)
            if timestamp < self.recvLastTimestamp:
                raise ValueError("a frame older than the last one")
            self.recvLastTimestamp = timestamp
            data = self.encryptor.decrypt(data)
        message = raft_pickle.loads(zlib.decompress(data))
        if self.recvRandKey:
            random_key, message = message
            if random_key != self.recvRandKey:
                raise ValueError("wrong connection key")
    except Exception:  # noqa: BLE001 - anything a stranger's bytes can raise: refuse them
        _refuse(self, "unauthenticated")
        return None
    del buffer[: _LENGTH.size + length]  # a bytearray drops its head without copying the tail
    return message


def install_frame_guard(on_refused: Callable[[str], None]) -> None:
    """Replace pysyncobj's TCP read and parse steps with the guarded ones, telling
    `on_refused` the reason of each refusal. Idempotent: installing twice, even from two
    threads at once, makes the same assignments."""
    global _installed, _on_refused
    _on_refused = on_refused
    if _installed:
        return
    check_version()
    TcpConnection._TcpConnection__processRead = _guarded_process_read
    TcpConnection._TcpConnection__processParseMessage = _guarded_parse_message
    _installed = True


def expire_unauthenticated(transport: TCPTransport, now_s: float, opened_at_s: dict[int, float]) -> None:
    """Close incoming connections that have not authenticated in time, or beyond the cap.
    `opened_at_s` maps id(connection) to when this node first saw it (kept by the caller)."""
    unknown = list(transport._unknownConnections)
    alive = {id(connection) for connection in unknown}
    for key in [k for k in opened_at_s if k not in alive]:
        del opened_at_s[key]
    for connection in unknown:
        opened_at_s.setdefault(id(connection), now_s)
    ordered = sorted(unknown, key=lambda connection: opened_at_s[id(connection)])
    excess = len(ordered) - UNAUTHENTICATED_CONNECTIONS_MAX
    for index, connection in enumerate(ordered):
        too_old = now_s - opened_at_s[id(connection)] > UNAUTHENTICATED_TIMEOUT_S
        if index < excess or too_old:
            _on_refused("unauthenticated_timeout" if too_old else "too_many_connections")
            transport._unknownConnections.discard(connection)
            connection.disconnect()
            opened_at_s.pop(id(connection), None)


def widen_backlog(transport: TCPTransport, backlog: int = LISTEN_BACKLOG) -> None:
    """pysyncobj listens with a backlog of 5: a handful of strangers' connections would make a
    restarted peer's connect wait for SYN retransmissions (a second or more). Listening again
    on a bound socket only changes the backlog."""
    server = transport._server
    sock = getattr(server, "_TcpServer__socket", None) if server is not None else None
    if sock is not None:
        sock.listen(backlog)


# ---------------------------------------------------------------------- the SyncObj's internals

_FOLLOWER, _CANDIDATE, _LEADER = 0, 1, 2


def transport_of(sync: SyncObj) -> TCPTransport:
    return sync._SyncObj__transport


def is_candidate(sync: SyncObj) -> bool:
    return sync._SyncObj__raftState == _CANDIDATE


def voted_this_term(sync: SyncObj) -> bool:
    """Whether this node granted its vote in the current term (pysyncobj resets it on a new term)."""
    return sync._SyncObj__votedForNodeId is not None


def bring_election_forward(sync: SyncObj, deadline_s: float) -> None:
    """Move the election deadline (pysyncobj's clock) to `deadline_s` if that is sooner.
    Call on the tick thread only."""
    sync._SyncObj__raftElectionDeadline = min(sync._SyncObj__raftElectionDeadline, deadline_s)


def wake_tick_thread(sync: SyncObj) -> None:
    """End pysyncobj's poll now rather than at its next tick: its own wake-up pipe, which it
    uses for new commands. Thread-safe; a full pipe already means "wake up"."""
    notifier = getattr(sync, "_SyncObj__pipeNotifier", None)
    if notifier is None:
        return
    try:
        notifier.notify()
    except OSError:
        _on_refused("wake_pipe_full")


__all__ = [
    "FRAME_BYTES_MAX",
    "SUPPORTED_VERSIONS",
    "UNAUTHENTICATED_CONNECTIONS_MAX",
    "UNAUTHENTICATED_FRAME_BYTES_MAX",
    "ShimError",
    "bring_election_forward",
    "check_version",
    "expire_unauthenticated",
    "frame_bytes_max",
    "frame_length_problem",
    "install_frame_guard",
    "is_candidate",
    "raft_clock_s",
    "transport_of",
    "voted_this_term",
    "wake_tick_thread",
    "widen_backlog",
]
