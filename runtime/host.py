"""The model host: a separate process per peer that loads and runs models.

Why a process: the peer's own process sends heartbeats every 20 ms and votes in Raft.
Loading a model holds the GIL for long stretches (`torch.jit.load` holds it for the
whole load, 474 ms for resnet152), and a peer that stalls that long looks dead to its
neighbours. So models live in a child process (multiprocessing, spawn context: no
forked torch state), and the peer talks to it through a pipe:

- the parent's end of the pipe (a Unix socket pair) is read and written by its event loop
  itself: a reply resolves its future in the same callback that reads it, with no thread
  in between (each thread hand-off cost a wake-up, and under load a scheduling delay);
  writes never block the loop, the transport buffers what the socket cannot take yet;
- tensors above `inline_bytes_max` travel in a `multiprocessing.shared_memory` segment
  instead of through the pipe. Request segments are pooled: the parent takes one from its
  pool, the host maps each segment once and reads the inputs in place, and the segment goes
  back to the pool when the host has answered (creating, mapping and unlinking a segment for
  every request cost more than the copy itself);
- every queue is bounded (`requests_pending_max`; past it `HostBusy`), every call has a
  deadline, and the child drops requests whose deadline passed before it got to them;
- a crashed host (killed, out of memory, a model that aborts) closes the pipe: the reader
  sees EOF, every pending call fails at once with `HostCrashed`, never a hang. If the
  peer dies instead, the child sees EOF and exits.

Roles are the parent's business: a model loads as `warm` (idle backup) or `serving`, and
`promote` flips a flag in the parent. It sends nothing to the child, so it takes
microseconds even while the child is busy loading another model. `infer` refuses a warm
model (`ModelNotServing`): routing traffic to a backup is a decision, not an accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import multiprocessing
import os
import pickle
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from redge.runtime.errors import (
    ArtifactNotFound,
    DeadlineExceeded,
    HostBusy,
    HostClosed,
    HostCrashed,
    InferenceFailed,
    LoadFailed,
    ModelNotLoaded,
    ModelNotServing,
    RuntimeFailure,
)
from redge.runtime.loader import TRUSTED_MODULES_DEFAULT, LoadOptions, LoadReport
from redge.runtime.manifest import Manifest
from redge.runtime.priority import boosted, own_scheduling_group

log = structlog.get_logger(__name__)

ROLES = ("warm", "serving")
PIPE_CLOSED_GRACE_S = 2.0
# Data-plane workers a host serves at once, and how long one may take to show its token.
DATA_CLIENTS_MAX = 16
DATA_HANDSHAKE_TIMEOUT_S = 2.0
DATA_TOKEN_BYTES = 32
_ALIGNMENT_BYTES = 64
_READY = "ready"


@dataclass(frozen=True)
class HostOptions:
    device: str = "cpu"
    # torch intra-op threads in the host, and ONNX Runtime's per session.
    threads: int = 1
    # Inference threads per loaded model. Models run side by side, each in its own order
    # (as Triton runs one instance of each model): a co-located app does not queue behind
    # another app's requests, it shares the device with them.
    infer_workers: int = 1
    requests_pending_max: int = 64
    inline_bytes_max: int = 64 * 1024
    start_timeout_s: float = 120.0
    load_timeout_s: float = 600.0
    control_timeout_s: float = 30.0
    close_timeout_s: float = 5.0
    verify: str = "size"
    # Added niceness of the host process (and of its scheduling group: it starts a session
    # of its own). Positive values let the (mostly idle) peer win the CPU over loading and
    # inference, but measured on a contended machine a nice 5 host loaded 3x slower against
    # other processes: 0 unless the node is ours.
    nice: int = 0
    # The niceness loads run at, where the host may lower it (CAP_SYS_NICE): a recovery's
    # load is the critical path (`priority.boosted`). None: loads run at `nice`.
    load_nice: int | None = None
    trusted_modules: tuple[str, ...] = TRUSTED_MODULES_DEFAULT
    # Set by `ModelHost(data_plane=True)` for its child: where data-plane workers connect
    # (an abstract Unix socket) and the token they must show. Empty: the pipe only.
    data_address: str = ""
    data_token: bytes = field(default=b"", repr=False)
    # Where the host keeps what it derives from artifacts to load them faster next time
    # (`loader.derive_onnx`); empty: nothing is derived.
    derived_dir: str = ""
    # Stamps of files already hashed, for `verify="stamped"` (`store.verify_stamped`).
    stamps_dir: str = ""
    # Backends to import and use once as soon as the host runs (`loader.PREPARATIONS`), so
    # that its first load, often a recovery, does not pay seconds of imports.
    prepare: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.threads >= 1 and self.infer_workers >= 1 and self.requests_pending_max >= 1


@dataclass(frozen=True, slots=True)
class InferTiming:
    """Where one inference's time went, in ms: waiting in the host's queue, in the model,
    and the whole round trip seen by the peer. What is left (`transfer_ms`) is the hop
    itself: tensors in and out, pipes, thread wake-ups."""

    queued_ms: float
    compute_ms: float
    total_ms: float

    @property
    def transfer_ms(self) -> float:
        return max(0.0, self.total_ms - self.queued_ms - self.compute_ms)


@dataclass
class ModelState:
    key: str
    name: str
    version: str
    format: str
    role: str
    report: LoadReport
    loaded_at_s: float
    requests_total: int = 0
    last_request_at_s: float | None = None


# -- tensors across the process boundary


@dataclass(frozen=True)
class _Packed:
    segment: str | None
    tensors: tuple[tuple[str, str, tuple[int, ...], int, np.ndarray | None], ...]


def _pack(
    arrays: Mapping[str, np.ndarray],
    inline_bytes_max: int,
    take: Callable[[int], shared_memory.SharedMemory] | None = None,
) -> tuple[_Packed, shared_memory.SharedMemory | None]:
    """Inline small tensors; put large ones into one shared memory segment (from `take`,
    or a new one)."""
    total_bytes = sum(_aligned(array.nbytes) for array in arrays.values())
    if total_bytes <= inline_bytes_max:
        return _Packed(None, tuple((n, a.dtype.str, a.shape, 0, a) for n, a in arrays.items())), None
    if take is not None:
        segment = take(total_bytes)
    else:
        segment = shared_memory.SharedMemory(create=True, size=max(total_bytes, 1))
    entries = []
    offset = 0
    try:
        for name, array in arrays.items():
            contiguous = np.ascontiguousarray(array)
            view = np.ndarray(contiguous.shape, dtype=contiguous.dtype, buffer=segment.buf, offset=offset)
            view[...] = contiguous
            del view
            entries.append((name, contiguous.dtype.str, contiguous.shape, offset, None))
            offset += _aligned(contiguous.nbytes)
    except BaseException:
        _close_segment(segment, unlink=True)
        raise
    return _Packed(segment.name, tuple(entries)), segment


def _unpack(packed: _Packed) -> dict[str, np.ndarray]:
    """The host's answer in the parent: copy the tensors out, and free the host's segment."""
    if packed.segment is None:
        return {name: array for name, _, _, _, array in packed.tensors if array is not None}
    segment = shared_memory.SharedMemory(name=packed.segment)
    try:
        arrays = {}
        for name, dtype, shape, offset, _ in packed.tensors:
            view = np.ndarray(shape, dtype=np.dtype(dtype), buffer=segment.buf, offset=offset)
            arrays[name] = view.copy()
            del view
        return arrays
    finally:
        segment.close()
        segment.unlink()


class _SegmentPool:
    """The parent's request segments, reused from one request to the next.

    A segment returns to the pool (`give`) only once the host has answered the request that
    used it; a request that timed out or was abandoned may still be read by the host, so its
    segment is unlinked instead (`drop`): the host's mapping keeps the memory alive until it
    lets go. Sizes are rounded up to a power of two so that a pool serves varying batches.
    """

    SIZE_MIN_BYTES = 64 * 1024

    def __init__(self, keep_max: int) -> None:
        self.keep_max = keep_max
        self._free: list[shared_memory.SharedMemory] = []
        self.created_total = 0
        self._names = itertools.count()

    def take(self, size_bytes: int) -> shared_memory.SharedMemory:
        fitting = [segment for segment in self._free if segment.size >= size_bytes]
        if fitting:
            segment = min(fitting, key=lambda candidate: candidate.size)
            self._free.remove(segment)
            return segment
        size = max(self.SIZE_MIN_BYTES, 1 << max(0, size_bytes - 1).bit_length())
        self.created_total += 1
        # Named after this process, so that what a killed process left behind can be found
        # and removed by the next one (`sweep_orphans`).
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{next(self._names)}_{os.urandom(4).hex()}"
        return shared_memory.SharedMemory(name=name, create=True, size=size)

    def give(self, segment: shared_memory.SharedMemory | None) -> None:
        if segment is None:
            return
        if len(self._free) < self.keep_max:
            self._free.append(segment)
        else:
            _close_segment(segment, unlink=True)

    def drop(self, segment: shared_memory.SharedMemory | None) -> None:
        _close_segment(segment, unlink=True)

    def close(self) -> None:
        free, self._free = self._free, []
        for segment in free:
            _close_segment(segment, unlink=True)

    def __len__(self) -> int:
        return len(self._free)


SEGMENT_PREFIX = "redge_"
_SHM_DIRECTORY = Path("/dev/shm")


def sweep_orphans(directory: Path = _SHM_DIRECTORY) -> list[str]:
    """Unlink request segments whose creating process is gone; returns their names.

    A pooled segment lives as long as its host, so a peer killed with SIGKILL (together with
    multiprocessing's resource tracker, when a whole process group is killed) leaves its
    pool behind in /dev/shm. Each new model host sweeps them up."""
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed  # no /dev/shm here: segments live elsewhere and are not ours to sweep
    for entry in entries:
        name = entry.name
        if not name.startswith(SEGMENT_PREFIX):
            continue
        try:
            pid = int(name[len(SEGMENT_PREFIX) :].split("_", 1)[0])
        except ValueError:
            continue
        if _process_exists(pid):
            continue
        try:
            entry.unlink()
            removed.append(name)
        except OSError:
            pass
    if removed:
        log.info("orphan_segments_removed", count=len(removed))
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class _MappedSegments:
    """The host's mappings of the parent's request segments, by name, most recent last.

    Mapping a segment costs a system call or three and a registration with the resource
    tracker; a pooled segment comes back many times, so it is mapped once. Bounded: the
    oldest mapping is closed when the cache is full (the parent may have unlinked it).
    """

    def __init__(self, keep_max: int) -> None:
        self.keep_max = keep_max
        self._segments: dict[str, shared_memory.SharedMemory] = {}

    def get(self, name: str) -> shared_memory.SharedMemory:
        segment = self._segments.pop(name, None)
        if segment is None:
            segment = shared_memory.SharedMemory(name=name)
        self._segments[name] = segment
        while len(self._segments) > self.keep_max:
            oldest = next(iter(self._segments))
            _close_segment(self._segments.pop(oldest), unlink=False)
        return segment

    def views(self, packed: _Packed) -> dict[str, np.ndarray]:
        """The request's tensors in place, without a copy: valid until the host answers."""
        if packed.segment is None:
            return {name: array for name, _, _, _, array in packed.tensors if array is not None}
        buffer = self.get(packed.segment).buf
        return {
            name: np.ndarray(shape, dtype=np.dtype(dtype), buffer=buffer, offset=offset)
            for name, dtype, shape, offset, _ in packed.tensors
        }


def _discard(packed: Any) -> None:
    if isinstance(packed, _Packed) and packed.segment is not None:
        try:
            segment = shared_memory.SharedMemory(name=packed.segment)
            segment.close()
            segment.unlink()
        except FileNotFoundError:
            pass


def _aligned(size_bytes: int) -> int:
    return (size_bytes + _ALIGNMENT_BYTES - 1) // _ALIGNMENT_BYTES * _ALIGNMENT_BYTES


# -- the child process


def _host_main(connection: Connection, options: HostOptions) -> None:
    """Entry point of the host process: receive commands, run them, reply.

    The parent's pipe carries every command. With `options.data_address`, the host also
    listens there (an abstract Unix socket) for data-plane workers: each proves it holds
    `options.data_token`, then sends `infer` requests only, answered on its own connection.
    """
    # A scheduling group of its own, below the peer's, before the long import of torch: the
    # peer's control process must win the CPU over loading and inference (runtime/priority.py).
    own_scheduling_group(options.nice)
    import torch

    from redge.runtime.loader import derive_onnx, load, prepare_backends

    torch.set_num_threads(options.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    models: dict[str, Any] = {}
    models_lock = threading.Lock()
    load_options = LoadOptions(threads=options.threads, verify=options.verify, trusted_modules=options.trusted_modules,
                               derived_dir=options.derived_dir, stamps_dir=options.stamps_dir)
    # Deriving (optimising an ONNX graph for this CPU) runs after the load it follows has
    # answered, on a thread of its own: never in the way of a load or of inference.
    derive_queue: queue.Queue[Any] = queue.Queue()
    segments = _MappedSegments(keep_max=2 * options.requests_pending_max * (1 + DATA_CLIENTS_MAX))
    segments_lock = threading.Lock()
    load_queue: queue.Queue[Any] = queue.Queue(maxsize=options.requests_pending_max)
    infer_queues: dict[str, queue.Queue[Any]] = {}  # per model key
    infer_queues_lock = threading.Lock()
    pid = multiprocessing.current_process().pid

    def replier(channel: Connection) -> Callable[[int, bool, Any], None]:
        lock = threading.Lock()

        def reply(request_id: int, ok: bool, payload: Any) -> None:
            with lock:
                try:
                    channel.send((request_id, ok, payload))
                except (BrokenPipeError, OSError):
                    pass  # the other end is gone; its receive loop sees EOF and ends

        return reply

    reply = replier(connection)

    def run_load(request_id: int, payload: dict[str, Any], answer: Callable[..., None]) -> None:
        try:
            manifest = Manifest.from_json(payload["manifest"])
            with boosted(options.load_nice) if options.load_nice is not None else contextlib.nullcontext():
                model, report = load(payload["directory"], manifest, options.device, load_options)
            with models_lock:
                previous = models.get(payload["key"])
                models[payload["key"]] = model
            if previous is not None:
                previous.close()
            answer(request_id, True, report)
            if report.derivable:
                derive_queue.put((payload["directory"], manifest))
        except RuntimeFailure as error:
            answer(request_id, False, error)
        except Exception as error:  # noqa: BLE001
            answer(request_id, False, LoadFailed("?", "?", "?", "host", f"{type(error).__name__}: {error}"))

    def run_unload(request_id: int, payload: dict[str, Any], answer: Callable[..., None]) -> None:
        import gc

        with models_lock:
            model = models.pop(payload["key"], None)
        if model is not None:
            model.close()
            del model
            gc.collect()
        answer(request_id, True, None)

    def run_infer(request_id: int, payload: dict[str, Any], answer: Callable[..., None]) -> None:
        key = payload["key"]
        packed = payload["inputs"]
        started_s = time.perf_counter()
        try:
            deadline_s = payload["deadline_s"]
            if deadline_s is not None and time.monotonic() > deadline_s:
                raise DeadlineExceeded("infer", key, 0.0)
            with models_lock:
                model = models.get(key)
            if model is None:
                raise ModelNotLoaded(key)
            with segments_lock:
                inputs = segments.views(packed)
            outputs = model.infer(inputs)
            del inputs  # views into the sender's segment: it is reused once we answer
            computed_s = time.perf_counter()
            result, _ = _pack(outputs, options.inline_bytes_max)
            queued_ms = (started_s - payload["received_s"]) * 1000
            answer(request_id, True, (result, queued_ms, (computed_s - started_s) * 1000))
        except RuntimeFailure as error:
            answer(request_id, False, error)
        except Exception as error:  # noqa: BLE001
            answer(request_id, False, InferenceFailed(key, f"{type(error).__name__}: {error}"))

    def derive_worker() -> None:
        while True:
            item = derive_queue.get()
            try:
                if isinstance(item, tuple):
                    directory, manifest = item
                    derive_onnx(directory, manifest, options.device, load_options)
                else:
                    item()  # a `derived` command: answered once everything before it is done
            except Exception as error:  # noqa: BLE001 - a faster next load is an optimisation: the artifact still loads
                log.warning("derive_failed", error=f"{type(error).__name__}: {error}")

    def worker(work: queue.Queue[Any]) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            function, request_id, payload, answer = item
            function(request_id, payload, answer)

    def infer_queue(key: str) -> queue.Queue[Any]:
        with infer_queues_lock:
            work = infer_queues.get(key)
            if work is None:
                work = infer_queues[key] = queue.Queue(maxsize=options.requests_pending_max)
                for index in range(options.infer_workers):
                    threading.Thread(target=worker, args=(work,), name=f"host-infer-{key}-{index}", daemon=True).start()
            return work

    def submit_infer(request_id: int, payload: dict[str, Any], answer: Callable[..., None]) -> None:
        payload["received_s"] = time.perf_counter()
        try:
            infer_queue(payload["key"]).put_nowait((run_infer, request_id, payload, answer))
        except queue.Full:
            answer(request_id, False, HostBusy(options.requests_pending_max, options.requests_pending_max))

    def serve_data_client(sock: socket.socket) -> None:
        """One worker's connection: the token first, then infer requests until EOF."""
        try:
            sock.settimeout(DATA_HANDSHAKE_TIMEOUT_S)
            token = _receive_exactly(sock, len(options.data_token))
            sock.settimeout(None)
        except OSError:
            sock.close()
            return
        if not hmac.compare_digest(token, options.data_token):
            sock.close()
            return
        channel = Connection(sock.detach())
        answer = replier(channel)
        answer(0, True, (_READY, pid))
        while True:
            try:
                request_id, operation, payload = channel.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            if operation == "infer":
                submit_infer(request_id, payload, answer)
            else:
                answer(request_id, False, InferenceFailed("?", f"a data connection may only infer, not {operation!r}"))
        channel.close()

    def accept_data_clients(listener: socket.socket) -> None:
        clients = threading.BoundedSemaphore(DATA_CLIENTS_MAX)

        def serve(sock: socket.socket) -> None:
            try:
                serve_data_client(sock)
            finally:
                clients.release()

        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            if not clients.acquire(blocking=False):
                sock.close()  # more clients than any peer runs workers: someone else's
                continue
            threading.Thread(target=serve, args=(sock,), name="host-data-client", daemon=True).start()

    if options.data_address:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(options.data_address)
        listener.listen(DATA_CLIENTS_MAX)
        threading.Thread(target=accept_data_clients, args=(listener,), name="host-data-listener", daemon=True).start()
    threading.Thread(target=worker, args=(load_queue,), name="host-load", daemon=True).start()
    threading.Thread(target=derive_worker, name="host-derive", daemon=True).start()
    if options.prepare:
        # Beside the first commands rather than before them: a load that needs a module
        # still being imported waits for that import, as it would have without this.
        threading.Thread(target=prepare_backends, args=(options.device, options.prepare), name="host-prepare",
                         daemon=True).start()
    reply(0, True, (_READY, pid))
    while True:
        try:
            request_id, operation, payload = connection.recv()
        except (EOFError, OSError):
            break  # the peer is gone: so is its host
        if operation == "shutdown":
            reply(request_id, True, None)
            break
        if operation == "load":
            load_queue.put((run_load, request_id, payload, reply))
        elif operation == "unload":
            load_queue.put((run_unload, request_id, payload, reply))
            with infer_queues_lock:
                stopping = infer_queues.pop(payload["key"], None)
            for _ in range(options.infer_workers if stopping is not None else 0):
                stopping.put(None)  # after the requests already queued for it
        elif operation == "infer":
            submit_infer(request_id, payload, reply)
        elif operation == "ping":
            reply(request_id, True, None)
        elif operation == "derived":
            derive_queue.put(lambda request_id=request_id: reply(request_id, True, None))
        elif operation == "derive":
            derive_queue.put((payload["directory"], Manifest.from_json(payload["manifest"])))
            reply(request_id, True, None)
        else:
            raise AssertionError(f"unknown host operation {operation!r}")
    # Skip interpreter teardown (seconds with torch loaded): nothing here needs flushing.
    os._exit(0)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("closed before the token")
        data += chunk
    return data


# -- the parent's facade


class _PipeProtocol(asyncio.Protocol):
    """The parent's end of the pipe, framed as `multiprocessing.connection` frames them
    (a 4-byte big-endian signed length, or -1 and an 8-byte length, then a pickle), so the
    host process keeps its plain blocking `Connection`."""

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            frame = _next_frame(self._buffer)
            if frame is None:
                return
            try:
                self._on_message(pickle.loads(frame))
            except Exception as error:  # noqa: BLE001 - one bad reply must not end the host's pipe
                log.error("model_host_reply_unreadable", error=repr(error))

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


def _next_frame(buffer: bytearray) -> bytes | None:
    """Take one complete frame's payload off the front of `buffer`, or None if incomplete."""
    if len(buffer) < 4:
        return None
    (size,) = struct.unpack_from("!i", buffer)
    header = 4
    if size == -1:
        if len(buffer) < 12:
            return None
        (size,) = struct.unpack_from("!Q", buffer, 4)
        header = 12
    if len(buffer) < header + size:
        return None
    frame = bytes(buffer[header : header + size])
    del buffer[: header + size]
    return frame


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    segment: shared_memory.SharedMemory | None = None
    answered: bool = False  # the host replied: it no longer reads `segment`


@dataclass
class _Counters:
    requests_total: int = 0
    crashes_total: int = 0
    started_at_s: float = field(default_factory=time.monotonic)


class _Channel:
    """One connection to a host process, seen from an event loop: framed requests out,
    replies matched to their futures, request tensors in pooled shared memory.

    Bounded: at most `requests_pending_max` requests wait for an answer (past that,
    `HostBusy`), and every wait has a deadline. `usable` is asked before each request: the
    owner says whether the other end may still answer (a crashed host, a closed client)."""

    def __init__(self, options: HostOptions, usable: Callable[[], None], on_lost: Callable[[], None]) -> None:
        self.options = options
        self._usable = usable
        self._on_lost = on_lost
        self._pending: dict[int, _Pending] = {}
        self._request_ids = itertools.count(1)
        self._segments = _SegmentPool(keep_max=options.requests_pending_max)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.counters = _Counters()

    async def open(self, sock: socket.socket) -> asyncio.Future[Any]:
        """Take over `sock`; returns the future of the host's ready message (request id 0)."""
        self._loop = asyncio.get_running_loop()
        ready = self._loop.create_future()
        self._pending[0] = _Pending(ready)
        sock.setblocking(False)
        self._transport, _ = await self._loop.create_connection(
            lambda: _PipeProtocol(self._on_reply, self._lost), sock=sock
        )
        return ready

    def forget_ready(self) -> None:
        self._pending.pop(0, None)

    def _lost(self) -> None:
        self.closed = True
        self._on_lost()

    def check_capacity(self) -> None:
        if len(self._pending) >= self.options.requests_pending_max:
            raise HostBusy(len(self._pending), self.options.requests_pending_max)

    def submit(self, operation: str, payload: Any, segment: shared_memory.SharedMemory | None = None) -> asyncio.Future[Any]:
        try:
            self._usable()
            self.check_capacity()
            request_id = next(self._request_ids)
            frame = _frame((request_id, operation, payload))  # an unpicklable payload fails here, unregistered
        except BaseException:
            self._segments.give(segment)  # never sent
            raise
        assert self._loop is not None
        future = self._loop.create_future()
        self._pending[request_id] = _Pending(future, segment)
        if not self.write_frame(frame):
            self._pending.pop(request_id)
            self._segments.give(segment)  # never sent
            self._usable()
            raise HostCrashed(None, "the connection to the host is closed")
        self.counters.requests_total += 1
        future.add_done_callback(lambda _: self._forget(request_id))
        return future

    def _forget(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if pending.answered:
            self._segments.give(pending.segment)
        else:
            self._segments.drop(pending.segment)  # the host may still read it

    async def wait(self, future: asyncio.Future[Any], budget_s: float, operation: str, key: str) -> Any:
        try:
            return await asyncio.wait_for(future, budget_s)
        except TimeoutError:
            raise DeadlineExceeded(operation, key, budget_s * 1000) from None

    async def infer(
        self, key: str, inputs: Mapping[str, np.ndarray], deadline_s: float | None
    ) -> tuple[dict[str, np.ndarray], InferTiming]:
        """Run `key` on the host; `deadline_s` is an absolute `time.monotonic()` time."""
        started_s = time.perf_counter()
        now_s = time.monotonic()
        budget_s = (deadline_s - now_s) if deadline_s is not None else self.options.control_timeout_s
        if budget_s <= 0:
            raise DeadlineExceeded("infer", key, 0.0)
        self._usable()
        self.check_capacity()
        packed, segment = _pack(dict(inputs), self.options.inline_bytes_max, self._segments.take)
        future = self.submit("infer", {"key": key, "inputs": packed, "deadline_s": deadline_s}, segment)
        result, queued_ms, compute_ms = await self.wait(future, budget_s, "infer", key)
        outputs = _unpack(result)
        return outputs, InferTiming(queued_ms, compute_ms, (time.perf_counter() - started_s) * 1000)

    def write(self, message: Any) -> bool:
        return self.write_frame(_frame(message))

    def write_frame(self, frame: bytes) -> bool:
        """Send one framed request; False when the connection is closed."""
        transport = self._transport
        if transport is None or transport.is_closing() or self.closed:
            return False
        try:
            transport.write(frame)
        except (OSError, RuntimeError):
            return False
        return True

    def _on_reply(self, message: tuple[int, bool, Any]) -> None:
        request_id, ok, payload = message
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            _discard(payload[0] if ok and isinstance(payload, tuple) else payload)  # answered after its deadline
            return
        pending.answered = True
        if ok:
            pending.future.set_result(payload)
        else:
            pending.future.set_exception(payload)

    def fail_all(self, error: RuntimeFailure) -> None:
        for request_id, pending in list(self._pending.items()):
            if not pending.future.done():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits it any more
                    pending.future.set_exception(error)
                    pending.future.exception()  # mark retrieved: nobody may be awaiting it
            self._forget(request_id)

    def close(self, error: RuntimeFailure) -> None:
        self.closed = True
        self._segments.close()
        self.fail_all(error)
        if self._transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._transport.close()

    def __len__(self) -> int:
        return len(self._pending)


class ModelHost:
    """The asyncio facade of one host process. Create, `await start()`, then use.

    With `data_plane=True` the host also serves data-plane workers directly
    (`data_endpoint`): they connect with `HostClient` and run inference without a hop
    through this process."""

    def __init__(
        self, options: HostOptions | None = None, on_crash: Callable[[HostCrashed], None] | None = None,
        *, data_plane: bool = False,
    ) -> None:
        options = options or HostOptions()
        if data_plane:
            options = replace(
                options,
                data_address=f"\0redge-host-{os.getpid()}-{os.urandom(8).hex()}",
                data_token=os.urandom(DATA_TOKEN_BYTES),
            )
        self.options = options
        self.on_crash = on_crash
        self._models: dict[str, ModelState] = {}
        self._loading: dict[str, asyncio.Future[LoadReport]] = {}
        self._process: Any = None
        self._pipe_closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._crashed: HostCrashed | None = None
        self._closed = False
        self._channel = _Channel(self.options, self._check_usable, self._on_pipe_closed)
        self.counters = self._channel.counters

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def alive(self) -> bool:
        return self._process is not None and self._crashed is None and not self._closed and not self._pipe_closed

    @property
    def crashed(self) -> HostCrashed | None:
        return self._crashed

    @property
    def data_endpoint(self) -> tuple[str, bytes] | None:
        """(address, token) for `HostClient`, while the host is alive and serves workers."""
        if not self.options.data_address or not self.alive:
            return None
        return self.options.data_address, self.options.data_token

    async def start(self) -> None:
        assert self._process is None, "a ModelHost starts once; make a new one after a crash"
        self._loop = asyncio.get_running_loop()
        sweep_orphans()
        context = multiprocessing.get_context("spawn")
        parent_socket, child_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_end = Connection(child_socket.detach())
        self._process = context.Process(
            target=_host_main, args=(child_end, self.options), name="redge-model-host", daemon=True
        )
        try:
            self._process.start()
        finally:
            child_end.close()  # so that the child's death closes the pipe and we see EOF
        ready = await self._channel.open(parent_socket)
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.options.start_timeout_s)
        except TimeoutError:
            await self.aclose()
            raise HostCrashed(None, f"host did not start within {self.options.start_timeout_s} s") from None
        finally:
            self._channel.forget_ready()
        log.info("model_host_started", pid=self._process.pid, threads=self.options.threads, device=self.options.device)

    def close(self) -> None:
        """Stop the host process (gracefully, then by force); idempotent and bounded.

        Call it from the event loop's thread, or use `aclose()` from a coroutine.
        """
        if self._begin_close():
            self._stop_process()
            self._finish_close()

    async def aclose(self) -> None:
        if self._begin_close():
            await asyncio.get_running_loop().run_in_executor(None, self._stop_process)
            self._finish_close()

    def _begin_close(self) -> bool:
        """Ask the host to shut down (in the loop's thread); False if there is nothing to close."""
        if self._closed or self._process is None:
            self._closed = True
            return False
        self._closed = True
        self._channel.write((next(self._channel._request_ids), "shutdown", None))
        return True

    def _stop_process(self) -> None:
        """Wait for the host to exit, killing it if it does not (blocks: an executor's job)."""
        self._process.join(self.options.close_timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(self.options.close_timeout_s)

    def _finish_close(self) -> None:
        self._channel.close(HostClosed())
        self._models.clear()
        log.info("model_host_closed", pid=self.pid, exit_code=self._process.exitcode)

    # -- commands

    async def load(
        self,
        key: str,
        artifact_dir: Path | str,
        manifest: Manifest | None = None,
        role: str = "warm",
        timeout_s: float | None = None,
    ) -> LoadReport:
        """Load an artifact under `key` (idempotent for the same artifact) in `role`."""
        assert role in ROLES, role
        directory = Path(artifact_dir)
        if manifest is None:
            try:
                manifest = Manifest.read(directory)
            except FileNotFoundError:
                raise ArtifactNotFound(directory.parent.name, directory.name, str(directory)) from None
        state = self._models.get(key)
        if state is not None and (state.name, state.version) == manifest.key:
            if role == "serving":
                state.role = "serving"
            return state.report
        if key in self._loading:
            return await asyncio.shield(self._loading[key])
        budget_s = timeout_s if timeout_s is not None else self.options.load_timeout_s
        payload = {"key": key, "directory": str(directory), "manifest": manifest.to_json()}
        future = self._channel.submit("load", payload)
        self._loading[key] = future
        try:
            report: LoadReport = await self._channel.wait(future, budget_s, "load", key)
        except DeadlineExceeded:
            # The child may still finish this load: have it dropped right after.
            unload = self._channel.submit("unload", {"key": key})
            unload.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        finally:
            self._loading.pop(key, None)
        self._models[key] = ModelState(
            key=key, name=manifest.name, version=manifest.version, format=manifest.format,
            role=role, report=report, loaded_at_s=time.monotonic(),
        )
        log.info("model_loaded", key=key, name=manifest.name, version=manifest.version, role=role, load_ms=round(report.total_ms, 1))
        return report

    async def infer(
        self, key: str, inputs: Mapping[str, np.ndarray], deadline_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run a serving model. `deadline_s` is an absolute `time.monotonic()` time."""
        outputs, _ = await self.infer_timed(key, inputs, deadline_s)
        return outputs

    async def infer_timed(
        self, key: str, inputs: Mapping[str, np.ndarray], deadline_s: float | None = None
    ) -> tuple[dict[str, np.ndarray], InferTiming]:
        """`infer`, and where its time went."""
        state = self._models.get(key)
        self._check_usable()
        if state is None:
            raise ModelNotLoaded(key)
        if state.role != "serving":
            raise ModelNotServing(key, state.role)
        outputs, timing = await self._channel.infer(key, inputs, deadline_s)
        state.requests_total += 1
        state.last_request_at_s = time.monotonic()
        return outputs, timing

    async def promote(self, key: str) -> None:
        """Warm backup -> serving: a flag in this process, no message, no load."""
        self.promote_now(key)

    def promote_now(self, key: str) -> None:
        state = self._models.get(key)
        if state is None:
            raise ModelNotLoaded(key)
        state.role = "serving"

    async def demote(self, key: str) -> None:
        state = self._models.get(key)
        if state is None:
            raise ModelNotLoaded(key)
        state.role = "warm"

    async def derive(self, artifact_dir: Path | str, manifest: Manifest) -> None:
        """Have the host derive what makes `manifest` load faster later (an ONNX graph
        optimised for this node), in the background; returns once it is queued. A cold
        backup's artifact is derived this way before it is ever loaded."""
        self._check_usable()
        future = self._channel.submit("derive", {"directory": str(artifact_dir), "manifest": manifest.to_json()})
        await self._channel.wait(future, self.options.control_timeout_s, "derive", manifest.name)

    async def derived(self, timeout_s: float | None = None) -> None:
        """Return once the host has derived what every load so far made derivable (ONNX
        graphs optimised for this node, `HostOptions.derived_dir`)."""
        self._check_usable()
        future = self._channel.submit("derived", {})
        await self._channel.wait(future, timeout_s or self.options.load_timeout_s, "derived", "")

    async def unload(self, key: str, timeout_s: float | None = None) -> None:
        """Drop a model from the host; idempotent."""
        self._models.pop(key, None)
        future = self._channel.submit("unload", {"key": key})
        await self._channel.wait(future, timeout_s or self.options.control_timeout_s, "unload", key)
        log.info("model_unloaded", key=key)

    def models(self) -> dict[str, ModelState]:
        return {key: replace(state) for key, state in self._models.items()}

    def role(self, key: str) -> str | None:
        state = self._models.get(key)
        return None if state is None else state.role

    def memory_bytes(self) -> int | None:
        """Resident memory of the host process, when psutil is installed."""
        try:
            import psutil

            return int(psutil.Process(self.pid).memory_info().rss) if self.pid else None
        except Exception:  # noqa: BLE001
            return None

    # -- plumbing

    @property
    def _segments(self) -> _SegmentPool:
        return self._channel._segments

    def _check_usable(self) -> None:
        if self._crashed is not None:
            raise self._crashed
        if self._closed:
            raise HostClosed()
        if self._pipe_closed:
            raise HostCrashed(None, "the pipe to the host closed; the host is exiting")
        assert self._process is not None, "call `await host.start()` first"

    def _on_pipe_closed(self) -> None:
        """EOF from the host: it exited, or was killed. The crash is reported once the
        process is reaped, for its exit code: the loop watches the process sentinel, which
        turns readable at the exit (no thread, no executor that could be busy or gone)."""
        if self._closed or self._crashed is not None or self._pipe_closed:
            return
        self._pipe_closed = True  # from now on nothing is sent and every call fails at once
        loop = asyncio.get_running_loop()
        process = self._process
        sentinel = process.sentinel

        def reap() -> None:
            with contextlib.suppress(Exception):
                loop.remove_reader(sentinel)
            if process.is_alive():  # the pipe closed but the process lingers: end it
                process.kill()
            process.join(1.0)
            self._on_crash(process.exitcode)

        try:
            loop.add_reader(sentinel, reap)
        except (OSError, RuntimeError, ValueError):
            reap()
            return
        # A host that closed its end but does not exit is ended after a grace period.
        loop.call_later(PIPE_CLOSED_GRACE_S, lambda: self._crashed is None and not self._closed and reap())

    def _on_crash(self, exit_code: int | None) -> None:
        if self._closed or self._crashed is not None:
            return
        self._crashed = HostCrashed(exit_code, "the host process exited; its models are gone")
        self.counters.crashes_total += 1
        self._models.clear()
        self._channel.close(self._crashed)
        log.error("model_host_crashed", pid=self.pid, exit_code=exit_code)
        if self.on_crash is not None:
            self.on_crash(self._crashed)


class HostClient:
    """A data-plane worker's own connection to the model host: inference only, straight to
    the host process, without a hop through the peer's control process. Roles are the
    control process's business: the worker asks only for models its routing table says
    are loaded here, and the host answers `ModelNotLoaded` for any other."""

    def __init__(self, address: str, token: bytes, options: HostOptions | None = None) -> None:
        self.address = address
        self._token = token
        self.options = options or HostOptions()
        self._closed = False
        self._lost = False
        self._channel = _Channel(self.options, self._check_usable, self._on_lost)

    @property
    def alive(self) -> bool:
        return not self._closed and not self._lost

    async def connect(self, timeout_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout_s):
                await loop.sock_connect(sock, self.address)
                await loop.sock_sendall(sock, self._token)
                ready = await self._channel.open(sock)
                await ready
        except (OSError, TimeoutError) as error:
            sock.close()
            self._lost = True
            raise HostCrashed(None, f"cannot reach the model host at its data socket: {error or type(error).__name__}") from None
        finally:
            self._channel.forget_ready()

    async def infer(
        self, key: str, inputs: Mapping[str, np.ndarray], deadline_s: float | None
    ) -> tuple[dict[str, np.ndarray], InferTiming]:
        return await self._channel.infer(key, inputs, deadline_s)

    def _check_usable(self) -> None:
        if self._closed:
            raise HostClosed()
        if self._lost:
            raise HostCrashed(None, "the connection to the model host closed")

    def _on_lost(self) -> None:
        if self._closed or self._lost:
            return
        self._lost = True
        self._channel.close(HostCrashed(None, "the connection to the model host closed"))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close(HostClosed())

    def __len__(self) -> int:
        return len(self._channel)


def _close_segment(segment: shared_memory.SharedMemory | None, unlink: bool) -> None:
    if segment is None:
        return
    try:
        segment.close()
        if unlink:
            segment.unlink()
    except (FileNotFoundError, BufferError):
        pass
