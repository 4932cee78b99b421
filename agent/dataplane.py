"""The data plane: a peer's HTTP worker process, where every request body is read and parsed.

A peer is one command and one unit to supervise, but two kinds of process. The control
process (agent/peer.py) votes in Raft, sends and answers heartbeats and probes, plans and
reconciles; it must never stall, because a stalled control process is indistinguishable
from a dead one to its neighbours. So it reads no request body. That work happens here, in
worker processes it starts (`--http-workers`, default 1) and restarts when one dies:

- the control process binds the HTTP port and hands the listening socket to every worker
  (inherited file descriptor), so a worker restart refuses no connection: the kernel queues
  them until a worker accepts again;
- the control process pushes a routing table (agent/routes.py) over a private socket pair
  whenever it changes; a worker routes from that table alone;
- a worker runs inference on its own connection to the model host (runtime/host.py,
  `HostClient`), not through the control process;
- admin and cluster calls (`/cluster/...`, `/metrics`, health) are passed to the control
  process's own API on an abstract Unix socket, with a per-boot token, bodies capped small;
- what a worker served (latencies against SLOs, timeouts, forwards, HTTP statuses) goes
  back to the control process in batches, where the metrics and the SLO judge live.

Input before memory. A request must say its length (Content-Length), and may hold at most
`request_body_bytes_max` bytes, and no more than the served model's declared inputs can
take (`oip.request_bytes_bound`): past either, 413 before a byte of the body is read. Every
body admitted is counted against `request_bytes_held_max` across all requests in flight
(JSON bodies at `JSON_MEMORY_FACTOR` times their size, for the objects parsing makes); past
it, 503 at once. An input whose declared shape cannot fit the model is refused from its
declaration, before its data is decoded.

The process dies with its control process: it asks the kernel for SIGKILL when its parent
exits, and it exits when its end of the socket pair closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
import orjson
import structlog
from aiohttp import web

from redge.agent import channel, oip
from redge.agent.errors import HttpError
from redge.agent.joining import JOIN_SIGNATURE_HEADER
from redge.runtime.errors import (
    ArtifactNotFound,
    DeadlineExceeded,
    HostBusy,
    HostClosed,
    HostCrashed,
    InvalidInput,
    ManifestInvalid,
    ModelNotLoaded,
    ModelNotServing,
    RuntimeFailure,
)
from redge.runtime.host import HostClient, HostOptions
from redge.runtime.priority import own_scheduling_group
from redge.runtime.store import Store
from redge.runtime.tensor import TensorSpec

log = structlog.get_logger("redge.dataplane")

FORWARDED_HEADER = "X-Redge-Forwarded"
PREFER_LOCAL_HEADER = "X-Redge-Prefer-Local"
DEADLINE_HEADER = "X-Redge-Deadline-Ms"
# The longest a caller lets a peer hold its request while the app recovers (ms; 0: never).
HOLD_HEADER = "X-Redge-Hold-Ms"
# On a 503 for an app that is being loaded somewhere: where, so a client knows to wait.
RECOVERING_HEADER = "X-Redge-Recovering"
# On a forward while an app recovers: the app whose loaded copy (of one of this app's
# variants) the receiving peer may answer with (progressive failover).
SERVE_FROM_HEADER = "X-Redge-Serve-From"
NODE_HEADER = "X-Redge-Node"
EPOCH_HEADER = "X-Redge-Epoch"
VARIANT_HEADER = "X-Redge-Variant"
TIMING_HEADER = "Server-Timing"
CONTROL_TOKEN_HEADER = "X-Redge-Control-Token"
PASSED_HEADERS = ("Content-Type", oip.HEADER_LENGTH, NODE_HEADER, EPOCH_HEADER, VARIANT_HEADER)
CHUNK_BYTES = 1024 * 1024
# Memory a body costs while it is read and parsed, in multiples of its length: reading
# holds two copies for a moment; parsing a JSON tensor makes a Python object per number.
BINARY_MEMORY_FACTOR = 2
JSON_MEMORY_FACTOR = 8
# Control calls carry small JSON (an app, a signed join): a larger body is refused.
CONTROL_BODY_BYTES_MAX = 1024 * 1024
CONTROL_HEADERS = ("Authorization", "Content-Type", JOIN_SIGNATURE_HEADER)
# Reads passed to the control process that stay open with a read token: load balancers and
# orchestrators probe health without credentials. Matched by route, not by the path a
# client wrote (which may hide another under encoded dots).
OPEN_CONTROL_ROUTES = ("/v2/health/{kind}",)
# The longest a control call may take beyond its own long poll (`/cluster/probe` runs up to 120 s).
CONTROL_TIMEOUT_S = 150.0
STATS_INTERVAL_S = 0.1
STATS_SERVED_MAX = 2000  # observations per batch; more are counted, not timed
ROUTES_WAIT_S_MAX = 30.0
HOST_RETRY_S = 0.2
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerConfig:
    """What the control process tells a worker at start (as JSON on its stdin)."""

    node_id: str
    index: int
    listen_fd: int
    channel_fd: int
    control_address: str
    control_token: str
    store_dir: str
    storage_budget_bytes: int
    request_body_bytes_max: int
    request_bytes_held_max: int
    dynamic_dimension_max: int
    request_timeout_s: float
    forward_timeout_s: float
    # Requests this worker holds at once while their apps recover; more get 503 at once.
    held_requests_max: int = 256
    log_level: str = "info"
    nice: int = 0  # added to the control process's, for this worker and its scheduling group
    # sha256 (hex) of each token that may read the cluster's state, events, metrics and
    # artifacts (the read and the admin token); empty: reads are open. Digests, so that the
    # admin token itself never reaches a worker.
    read_digests: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_json(cls, data: bytes) -> WorkerConfig:
        values = orjson.loads(data)
        values["read_digests"] = tuple(values.get("read_digests", ()))
        return cls(**values)

    def require_read(self, request: web.Request) -> None:
        """A read of the cluster's state or artifacts: with read tokens set, it must carry one
        (`Authorization: Bearer TOKEN`), else 401."""
        if not self.read_digests:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).hexdigest()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(digest, d) for d in self.read_digests):
            raise HttpError(401, "this peer requires a token for reads: Authorization: Bearer TOKEN (read or admin)")


class Marks(NamedTuple):
    """One inference request's times: when its handler started and when it had read the body
    (perf_counter s, for `Server-Timing`), and its deadline (monotonic s), set once."""

    started_s: float
    read_s: float
    deadline_s: float


class Unavailable(Exception):
    """No replica can serve now (503). `unreachable`: a replica planned to serve could not
    be reached (not a 503 of its own), which a confirmation and a new plan will follow."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable



def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def server_timing(**durations_ms: float) -> str:
    """A `Server-Timing` header value (W3C): `read;dur=0.41, model;dur=12.03, ...`."""
    return ", ".join(f"{name};dur={value:.3f}" for name, value in durations_ms.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """The durations of a `Server-Timing` value, in ms (metrics without `dur` are skipped)."""
    durations: dict[str, float] = {}
    for metric in value.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip() == "dur" and name:
                try:
                    durations[name] = float(raw.strip().strip('"'))
                except ValueError:
                    pass
    return durations


class BodyBudget:
    """Bytes held for request bodies across every request in flight, with a bound.
    `reserve` is all or nothing: a body that does not fit is refused, never half read."""

    def __init__(self, bytes_max: int) -> None:
        assert bytes_max > 0
        self.bytes_max = bytes_max
        self.held_bytes = 0
        self.held_bytes_peak = 0
        self.refused = 0

    def reserve(self, size_bytes: int) -> bool:
        if self.held_bytes + size_bytes > self.bytes_max:
            self.refused += 1
            return False
        self.held_bytes += size_bytes
        self.held_bytes_peak = max(self.held_bytes_peak, self.held_bytes)
        return True

    def release(self, size_bytes: int) -> None:
        self.held_bytes -= size_bytes
        assert self.held_bytes >= 0


@dataclass
class Stats:
    """What this worker did since the last batch sent to the control process."""

    served: list[tuple[str, float, float, float]] = field(default_factory=list)  # app, latency, model, slo
    served_untimed: int = 0
    timeouts: int = 0
    request_timeouts: list[str] = field(default_factory=list)  # peers a forward timed out on
    forwards: dict[str, int] = field(default_factory=dict)
    http: dict[tuple[str, str], int] = field(default_factory=dict)
    bodies_refused: dict[str, int] = field(default_factory=dict)
    # Requests held while their app recovered, by how the hold ended: answered, expired
    # (the deadline passed first), refused (this worker already held its maximum).
    held: dict[str, int] = field(default_factory=dict)
    held_ms: list[float] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.served or self.served_untimed or self.timeouts or self.request_timeouts or self.forwards
                    or self.http or self.bodies_refused or self.held)

    def to_message(self, index: int, held_bytes: int, held_bytes_peak: int) -> dict[str, Any]:
        return {
            "type": "stats",
            "index": index,
            "served": self.served,
            "served_untimed": self.served_untimed,
            "timeouts": self.timeouts,
            "request_timeouts": self.request_timeouts,
            "forwards": self.forwards,
            "http": [[route, status, count] for (route, status), count in self.http.items()],
            "bodies_refused": self.bodies_refused,
            "held": self.held,
            "held_ms": self.held_ms,
            "body_bytes_held": held_bytes,
            "body_bytes_held_peak": held_bytes_peak,
        }


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.routes: dict[str, Any] = {"epoch": -1, "apps": {}, "local": {}, "ready": [False, "starting"],
                                       "host": None, "client_routes": {"epoch": -1, "apps": {}}}
        self._routes_changed = asyncio.Event()
        self.budget = BodyBudget(config.request_bytes_held_max)
        self.stats = Stats()
        self.store = Store(config.store_dir, config.storage_budget_bytes)
        self._host: HostClient | None = None
        self._host_endpoint: tuple[str, str] | None = None
        self._host_lock = asyncio.Lock()
        self._channel: channel.MessageProtocol | None = None
        self._session: aiohttp.ClientSession | None = None
        self._control: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.holding = 0  # requests held now, waiting for their app to recover
        self.routes_version = 0  # routing tables received

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, self._stopped.set)
        self._channel = await channel.connect(
            socket.socket(fileno=self.config.channel_fd), self._on_message, self._stopped.set
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30)
        )
        self._control = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.config.control_address))
        app = web.Application(client_max_size=CONTROL_BODY_BYTES_MAX, middlewares=[self._errors_middleware])
        self.register(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        listener = socket.socket(fileno=self.config.listen_fd)
        listener.setblocking(False)
        await web.SockSite(self._runner, listener).start()
        self._tasks.append(asyncio.create_task(self._send_stats(), name="stats"))
        self._channel.send({"type": "hello", "index": self.config.index, "pid": os.getpid()})
        log.info("dataplane_worker_started", index=self.config.index, pid=os.getpid())
        await self._stopped.wait()
        await self.close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stop accepting, let requests in flight finish
        for task in self._tasks:
            task.cancel()
        self._flush_stats()
        if self._host is not None:
            self._host.close()
        for session in (self._session, self._control):
            if session is not None:
                await session.close()
        log.info("dataplane_worker_stopped", index=self.config.index)

    # ------------------------------------------------------------------ control channel

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "routes":
            self.routes = message
            self.routes_version += 1
            changed, self._routes_changed = self._routes_changed, asyncio.Event()
            changed.set()
        elif kind == "flush" and self._channel is not None:
            # Everything served so far, then the answer: the control process reads them in
            # this order, so its metrics hold every request answered before it asked.
            self._flush_stats()
            self._channel.send({"type": "flushed", "id": message.get("id")})

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self._flush_stats()

    def _flush_stats(self) -> None:
        if self.stats.empty() or self._channel is None:
            return
        stats, self.stats = self.stats, Stats()
        self._channel.send(stats.to_message(self.config.index, self.budget.held_bytes, self.budget.held_bytes_peak))

    def _count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1

    # ------------------------------------------------------------------ HTTP

    def register(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/v2", self.server_metadata)
        router.add_get("/v2/models/{app}", self.model_metadata)
        router.add_get("/v2/models/{app}/ready", self.model_ready)
        router.add_post("/v2/models/{app}/infer", self.infer)
        router.add_get("/v2/models/{app}/versions/{version}", self.model_metadata)
        router.add_get("/v2/models/{app}/versions/{version}/ready", self.model_ready)
        router.add_post("/v2/models/{app}/versions/{version}/infer", self.infer)
        router.add_get("/cluster/routes", self.client_routes)
        router.add_get("/models/{name}/{version}/artifact", self.artifact_manifest)
        router.add_get("/models/{name}/{version}/files/{file:.+}", self.artifact_file)
        router.add_route("*", "/v2/health/{kind}", self.to_control)
        router.add_route("*", "/metrics", self.to_control)
        router.add_route("*", "/cluster", self.to_control)
        router.add_route("*", "/cluster/{tail:.+}", self.to_control)

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except HttpError as error:
            response = json_response({"error": error.message}, error.status, error.headers)
        except web.HTTPException as error:
            response = json_response({"error": error.reason or "error"}, error.status)
        except Exception as error:  # the worker must stay up whatever a handler does
            log.exception("http_handler_failed", route=route)
            response = json_response({"error": f"internal error: {type(error).__name__}: {error}"}, 500)
        self._count(self.stats.http, (route, str(response.status)))
        return response

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(oip.server_metadata())

    def _app(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        name = request.match_info["app"]
        entry = self.routes["apps"].get(name)
        if entry is None:
            raise HttpError(404, f"unknown app {name!r}")
        return name, entry

    async def model_metadata(self, request: web.Request) -> web.Response:
        app, _ = self._app(request)
        local = self.routes["local"].get(app)
        if local is not None:
            return json_response({
                "name": app,
                "versions": [local["version"]],
                "platform": local["format"],
                "inputs": local["inputs"],
                "outputs": local["outputs"],
                "parameters": {"node_id": self.config.node_id, "variant": local["variant"], "epoch": self.routes["epoch"]},
            })
        if FORWARDED_HEADER in request.headers:
            raise HttpError(503, f"{app} is not loaded on {self.config.node_id}")
        try:
            return await self._forward(request, app, b"")
        except Unavailable as error:
            raise HttpError(503, str(error)) from None

    async def model_ready(self, request: web.Request) -> web.Response:
        app, entry = self._app(request)
        if app in self.routes["local"]:
            return json_response({"name": app, "ready": True, "node_id": self.config.node_id})
        ready = bool(entry.get("servable"))
        return json_response({"name": app, "ready": ready}, status=200 if ready else 503)

    async def client_routes(self, request: web.Request) -> web.Response:
        """The routing table clients keep; with `since_epoch` and `wait_s`, a long poll."""
        try:
            since_epoch = int(request.query.get("since_epoch", "-1"))
            wait_s = min(max(float(request.query.get("wait_s", "0")), 0.0), ROUTES_WAIT_S_MAX)
        except ValueError:
            raise HttpError(400, "since_epoch must be an integer and wait_s a number") from None
        deadline = time.monotonic() + wait_s
        while self.routes["epoch"] <= since_epoch and (left_s := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left_s):
                    await self._routes_changed.wait()
        return json_response(self.routes["client_routes"])

    # ------------------------------------------------------------------ inference

    async def infer(self, request: web.Request) -> web.Response:
        started_s = time.perf_counter()
        app, entry = self._app(request)
        forwarded = FORWARDED_HEADER in request.headers
        prefer_local = forwarded or request.headers.get(PREFER_LOCAL_HEADER, "") not in ("", "0", "false")
        local = self.routes["local"].get(app)
        # Serve here if the committed plan makes this node the primary, or if the caller
        # already failed with the primary (a backup answering at once is the point of it).
        serve_here = local is not None and (entry["primary_here"] or prefer_local)
        if local is None and forwarded:
            raise HttpError(503, f"{app} is not loaded on {self.config.node_id}")
        specs = _specs(local) if local is not None else None
        body, reserved = await self._admit(request, specs if serve_here else None)
        try:
            marks = Marks(started_s, time.perf_counter(), self._deadline_s(request))
            return await self._serve_or_hold(request, app, body, prefer_local, marks, forwarded)
        finally:
            self.budget.release(reserved)

    async def _serve_or_hold(self, request: web.Request, app: str, body: bytearray, prefer_local: bool,
                             marks: Marks, forwarded: bool) -> web.Response:
        """Route the request; while its app recovers, hold it and route it again with each new
        routing table, until its deadline (or its caller's `X-Redge-Hold-Ms`)."""
        hold_until_s = min(marks.deadline_s, time.monotonic() + self._hold_s(request))
        held_since_s: float | None = None
        try:
            while True:
                seen_version = self.routes_version
                try:
                    response = await self._route(request, app, body, prefer_local, marks, forwarded)
                except Unavailable as error:
                    entry = self.routes["apps"].get(app)
                    recovering = _recovering(entry)
                    # Hold while the app is being loaded somewhere, while its primary is
                    # confirmed failed and the new plan is not committed yet, or while a
                    # replica planned to serve it cannot be reached (its confirmation is
                    # milliseconds away). A forwarded request is held where it came from.
                    if forwarded or not (recovering or error.unreachable):
                        raise HttpError(503, str(error), headers=_recovering_headers(entry)) from None
                    if recovering and entry.get("interim"):
                        answer = await self._serve_interim(request, app, entry, body, marks)
                        if answer is not None:
                            self._held("interim", held_since_s if held_since_s is not None else time.monotonic())
                            return answer
                    if held_since_s is None:
                        if self.holding >= self.config.held_requests_max:
                            self._count(self.stats.held, "refused")
                            raise HttpError(503, f"{app} is recovering and this peer already holds {self.holding} "
                                            "requests: try again",
                                            headers={**_recovering_headers(entry), "Retry-After": "1"}) from None
                        held_since_s = time.monotonic()
                        self.holding += 1
                    if not await self._routes_change_before(hold_until_s, seen_version):
                        self._held("expired", held_since_s)
                        where = ", ".join(entry.get("loading_on", [])) if entry else ""
                        raise HttpError(
                            503, f"{app} is recovering ({'loading on ' + where if where else 'no replica reachable yet'}): "
                            f"held {(time.monotonic() - held_since_s) * 1000:.0f} ms, its deadline passed first",
                            headers=_recovering_headers(entry),
                        ) from None
                    continue
                if held_since_s is not None:
                    self._held("answered", held_since_s)
                return response
        finally:
            if held_since_s is not None:
                self.holding -= 1

    async def _route(self, request: web.Request, app: str, body: bytearray, prefer_local: bool,
                     marks: Marks, forwarded: bool) -> web.Response:
        """One attempt with the routes as they are now: serve here or forward."""
        entry = self.routes["apps"].get(app)
        if entry is None:
            raise HttpError(404, f"unknown app {app!r}")
        local = self.routes["local"].get(app)
        if local is None and forwarded:
            interim = self._interim_copy(app, entry, request.headers.get(SERVE_FROM_HEADER))
            if interim is None:
                raise Unavailable(f"{app} is not loaded on {self.config.node_id}")
            return await self._serve_locally(request, app, interim, _specs(interim), body, marks, entry["slo_ms"])
        if local is not None and (entry["primary_here"] or prefer_local):
            return await self._serve_locally(request, app, local, _specs(local), body, marks, entry["slo_ms"])
        try:
            return await self._forward(request, app, body, marks.started_s, marks.deadline_s)
        except Unavailable:
            if local is not None:
                return await self._serve_locally(request, app, local, _specs(local), body, marks, entry["slo_ms"])
            raise

    def _interim_copy(self, app: str, entry: dict[str, Any], holder: str | None) -> dict[str, Any] | None:
        """`holder`'s copy loaded here, to answer `app` with while it recovers: only if its
        variant is one of `app`'s own (the same model its operator registered for it)."""
        if holder is None or holder == app:
            return None
        copy = self.routes["local"].get(holder)
        if copy is None or copy["variant"] not in entry.get("variants", ()):
            return None
        return {**copy, "role": "interim", "epoch": self.routes["epoch"]}

    async def _serve_interim(self, request: web.Request, app: str, entry: dict[str, Any], body: bytearray,
                             marks: Marks) -> web.Response | None:
        """Answer `app`, which is recovering, from another app's copy of one of its variants
        (`routes.interim_targets`, best first); None when none of them answers."""
        for node_id, address, holder, _variant in entry["interim"]:
            try:
                if node_id != self.config.node_id:
                    return await self._forward(request, app, body, marks.started_s, marks.deadline_s,
                                               targets=[(node_id, address, holder)])
                copy = self._interim_copy(app, entry, holder)
                if copy is not None:
                    return await self._serve_locally(request, app, copy, _specs(copy), body, marks, entry["slo_ms"])
            except Unavailable:
                continue
        return None

    def _hold_s(self, request: web.Request) -> float:
        raw = request.headers.get(HOLD_HEADER)
        if raw is None:
            return self.config.request_timeout_s
        try:
            return max(0.0, float(raw) / 1000)
        except ValueError:
            return 0.0

    async def _routes_change_before(self, until_s: float, seen_version: int) -> bool:
        """Wait for a routing table newer than `seen_version` (one may have come while the
        last attempt ran); False when `until_s` (monotonic) comes first."""
        left_s = until_s - time.monotonic()
        if left_s <= 0:
            return False
        if self.routes_version != seen_version:
            return True
        try:
            async with asyncio.timeout(left_s):
                await self._routes_changed.wait()
            return True
        except TimeoutError:
            return False

    def _held(self, outcome: str, since_s: float) -> None:
        self._count(self.stats.held, outcome)
        if len(self.stats.held_ms) < STATS_SERVED_MAX:
            self.stats.held_ms.append(round((time.monotonic() - since_s) * 1000, 3))

    async def _admit(self, request: web.Request, specs: tuple[TensorSpec, ...] | None) -> tuple[bytearray, int]:
        """Read the body if it may be: its length known, within the bounds, and room for it
        in the budget. Returns the body and the bytes reserved for it (release them)."""
        length = request.content_length
        if length is None:
            self._count(self.stats.bodies_refused, "411")
            raise HttpError(411, "an inference request needs a Content-Length header")
        limit = self.config.request_body_bytes_max
        binary = oip.HEADER_LENGTH in request.headers
        if specs is not None:
            bound = oip.request_bytes_bound(specs, binary, self.config.dynamic_dimension_max)
            if bound < limit:
                limit = bound
        if length > limit:
            self._count(self.stats.bodies_refused, "413")
            raise HttpError(413, f"a body of {length} bytes is more than the {limit} this request may have"
                            + (" (the model's declared inputs)" if specs is not None and limit != self.config.request_body_bytes_max else ""),
                            headers={"Connection": "close"})
        reserved = length * (BINARY_MEMORY_FACTOR if binary else JSON_MEMORY_FACTOR)
        if reserved > self.budget.bytes_max:
            self._count(self.stats.bodies_refused, "413")
            raise HttpError(413, f"a {'binary' if binary else 'JSON'} body of {length} bytes needs {reserved} bytes here, "
                            f"more than this peer holds for request bodies ({self.budget.bytes_max}); send binary tensors",
                            headers={"Connection": "close"})
        if not self.budget.reserve(reserved):
            self._count(self.stats.bodies_refused, "503")
            raise HttpError(503, f"this peer holds {self.budget.held_bytes} bytes of request bodies, its bound is "
                            f"{self.budget.bytes_max}: try again, or another peer",
                            headers={"Retry-After": "1", "Connection": "close"})
        try:
            # aiohttp's own read is the fastest here (a loop of our own into a preallocated
            # buffer measured 3x slower); it holds two copies while it finishes, which the
            # reservation counts.
            return await request.read(), reserved
        except BaseException:
            self.budget.release(reserved)
            raise

    def _deadline_s(self, request: web.Request) -> float:
        raw = request.headers.get(DEADLINE_HEADER)
        budget_s = self.config.request_timeout_s
        if raw is not None:
            try:
                budget_s = min(budget_s, max(0.001, float(raw) / 1000))
            except ValueError:
                pass
        return time.monotonic() + budget_s

    async def _host_client(self) -> HostClient:
        """This worker's connection to the model host named in the routing table."""
        endpoint = self.routes.get("host")
        if endpoint is None:
            raise ModelNotLoaded("the model host is not running on this peer")
        wanted = (endpoint["address"], endpoint["token"])
        async with self._host_lock:
            if self._host is not None and self._host_endpoint == wanted and self._host.alive:
                return self._host
            if self._host is not None:
                self._host.close()
            client = HostClient(endpoint["address"], bytes.fromhex(endpoint["token"]), HostOptions())
            await client.connect()
            self._host, self._host_endpoint = client, wanted
            return client

    async def _serve_locally(
        self, request: web.Request, app: str, local: dict[str, Any], specs: tuple[TensorSpec, ...],
        body: bytearray, marks: Marks, slo_ms: float,
    ) -> web.Response:
        """Run `app` on this node's replica, within the request's deadline (`marks`)."""
        try:
            parsed = oip.parse_infer_request(
                body, request.headers.get(oip.HEADER_LENGTH), self.config.request_body_bytes_max,
                specs, self.config.dynamic_dimension_max,
            )
        except oip.BadRequest as error:
            raise HttpError(400, str(error)) from None
        started = time.perf_counter()
        try:
            host = await self._host_client()
            outputs, timing = await host.infer(local["key"], parsed.inputs, marks.deadline_s)
        except InvalidInput as error:
            raise HttpError(400, str(error)) from None
        except DeadlineExceeded as error:
            self.stats.timeouts += 1
            raise HttpError(504, str(error)) from None
        except HostBusy as error:
            self.stats.timeouts += 1  # the model host's queue is full: as slow as a timeout
            raise HttpError(503, str(error)) from None
        except (ModelNotLoaded, ModelNotServing, HostCrashed, HostClosed) as error:
            # Gone between the routing table and the host (a replica swapped or unloaded):
            # routed again with the next table, if the request may wait for one.
            raise Unavailable(str(error)) from None
        except RuntimeFailure as error:
            raise HttpError(500, f"inference failed: {error}") from None
        latency_ms = (time.perf_counter() - started) * 1000
        # An answer names the plan it was served under: the current one if it gives this node
        # a serving role, else the last one that did (a copy bridging to its successor).
        planned = self.routes["apps"].get(app, {}).get("planned_here", True)
        epoch = self.routes["epoch"] if planned else local.get("epoch", self.routes["epoch"])
        try:
            response_body, headers = oip.encode_infer_response(
                app, local["version"], outputs, parsed,
                {"node_id": self.config.node_id, "epoch": epoch, "variant": local["variant"], "role": local["role"]},
            )
        except oip.BadRequest as error:
            raise HttpError(400, str(error)) from None
        headers.update({NODE_HEADER: self.config.node_id, EPOCH_HEADER: str(epoch), VARIANT_HEADER: local["variant"]})
        handler_started_s, read_s = marks.started_s, marks.read_s
        total_ms = (time.perf_counter() - handler_started_s) * 1000
        headers[TIMING_HEADER] = server_timing(
            read=(read_s - handler_started_s) * 1000,
            parse=(started - read_s) * 1000,
            queue=timing.queued_ms,
            model=timing.compute_ms,
            hop=timing.transfer_ms,
            total=total_ms,
        )
        if len(self.stats.served) < STATS_SERVED_MAX:
            self.stats.served.append((app, round(latency_ms, 3), round(timing.compute_ms, 3), slo_ms))
        else:
            self.stats.served_untimed += 1
        return web.Response(body=response_body, headers=headers)

    async def _forward(self, request: web.Request, app: str, body: bytes | bytearray,
                       started_s: float | None = None, deadline_s: float | None = None,
                       targets: list[tuple[str, str, str | None]] | None = None) -> web.Response:
        """Pass the request to `targets` in turn, (node_id, address, the app whose copy may
        answer it there: `X-Redge-Serve-From`, or None), by default the app's replicas from
        the routing table, primary first; the first answer that is not a 503 is returned."""
        if targets is None:
            targets = [(node_id, address, None) for node_id, address, _role, _variant
                       in self.routes["apps"].get(app, {}).get("targets", [])]
        if not targets:
            raise Unavailable(f"no replica of {app} can serve now")
        unreachable = False
        assert self._session is not None
        headers = {name: request.headers[name] for name in ("Content-Type", oip.HEADER_LENGTH) if name in request.headers}
        headers[FORWARDED_HEADER] = self.config.node_id
        deadline = deadline_s if deadline_s is not None else self._deadline_s(request)  # one for every target
        failures = []
        for node_id, address, serve_from in targets:
            if serve_from is not None:
                headers[SERVE_FROM_HEADER] = serve_from
            else:
                headers.pop(SERVE_FROM_HEADER, None)
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                failures.append("deadline passed")
                break
            headers[DEADLINE_HEADER] = str(max(1, int(remaining_s * 1000)))
            attempt_s = min(self.config.forward_timeout_s, remaining_s)
            timeout = aiohttp.ClientTimeout(total=attempt_s, connect=min(1.0, attempt_s))
            url = f"http://{address}{request.rel_url.path}"
            try:
                async with self._session.request(request.method, url, data=body or None, headers=headers,
                                                 timeout=timeout) as response:
                    payload = await response.read()
                    if response.status == 503:
                        failures.append(f"{node_id}: 503")
                        continue
                    passed = {k: response.headers[k] for k in PASSED_HEADERS if k in response.headers}
                    if started_s is not None:
                        # The serving peer's own timings, then this hop's whole time.
                        upstream = response.headers.get(TIMING_HEADER)
                        forward = server_timing(forward=(time.perf_counter() - started_s) * 1000)
                        passed[TIMING_HEADER] = f"{upstream}, {forward}" if upstream else forward
                    self._count(self.stats.forwards, "interim" if serve_from else "ok" if response.status < 500 else "error")
                    return web.Response(body=payload, status=response.status, headers=passed)
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                failures.append(f"{node_id}: {type(error).__name__}")
                unreachable = True
                self._count(self.stats.forwards, "unreachable")
                if isinstance(error, TimeoutError):
                    self.stats.request_timeouts.append(node_id)  # slow, not gone: evidence of degradation
        raise Unavailable(f"no replica of {app} answered: {', '.join(failures)}", unreachable)

    # ------------------------------------------------------------------ artifacts

    async def artifact_manifest(self, request: web.Request) -> web.Response:
        self.config.require_read(request)
        name, version = request.match_info["name"], request.match_info["version"]
        try:
            manifest = await asyncio.get_running_loop().run_in_executor(None, self.store.get, name, version)
        except (ArtifactNotFound, ManifestInvalid) as error:
            raise HttpError(404, str(error)) from None
        return web.Response(body=manifest.to_json(), content_type="application/json")

    async def artifact_file(self, request: web.Request) -> web.StreamResponse:
        self.config.require_read(request)
        name, version, file = request.match_info["name"], request.match_info["version"], request.match_info["file"]
        loop = asyncio.get_running_loop()
        try:
            whole = await loop.run_in_executor(None, self.store.open_range, name, version, file, 0, None)
        except (RuntimeFailure, OSError, ValueError) as error:
            raise HttpError(404, str(error)) from None
        size = whole.size_bytes
        start, end, status = 0, size, 200
        range_header = request.headers.get("Range")
        if range_header:
            parsed = parse_range(range_header, size)
            if parsed is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"},
                                    body=orjson.dumps({"error": f"unsatisfiable range {range_header!r}"}),
                                    content_type="application/json")
            start, end, status = parsed[0], parsed[1], 206
        try:
            part = await loop.run_in_executor(None, self.store.open_range, name, version, file, start, end)
        except (RuntimeFailure, OSError, ValueError) as error:
            raise HttpError(404, f"artifact file went away: {error}") from None
        response = web.StreamResponse(status=status)
        response.content_length = part.length_bytes
        response.content_type = "application/octet-stream"
        response.headers["Accept-Ranges"] = "bytes"
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await response.prepare(request)
        chunks = part.chunks(CHUNK_BYTES)
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None:
                break
            await response.write(chunk)
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ the control process's API

    async def to_control(self, request: web.Request) -> web.Response:
        """Pass an admin or cluster call to the control process, body capped small."""
        if request.method in ("GET", "HEAD") and request.match_info.route.resource.canonical not in OPEN_CONTROL_ROUTES:
            self.config.require_read(request)
        length = request.content_length
        if length is not None and length > CONTROL_BODY_BYTES_MAX:
            raise HttpError(413, f"a control call carries at most {CONTROL_BODY_BYTES_MAX} bytes")
        headers = {name: request.headers[name] for name in CONTROL_HEADERS if name in request.headers}
        for name, value in headers.items():
            # A token or signature is printable ASCII; anything else is refused here, as a
            # wrong credential is, rather than failing on its way to the control process.
            if not (value.isascii() and value.isprintable()):
                raise HttpError(401 if name != "Content-Type" else 400, f"the {name} header must be printable ASCII")
        body = await request.read() if request.can_read_body else b""
        headers[CONTROL_TOKEN_HEADER] = self.config.control_token
        assert self._control is not None
        wait_s = 0.0
        with contextlib.suppress(ValueError):
            wait_s = min(max(float(request.query.get("wait_s", "0")), 0.0), ROUTES_WAIT_S_MAX)
        timeout = aiohttp.ClientTimeout(total=wait_s + CONTROL_TIMEOUT_S)
        try:
            async with self._control.request(request.method, f"http://control{request.rel_url}", data=body or None,
                                             headers=headers, timeout=timeout) as response:
                payload = await response.read()
                passed = {"Content-Type": response.headers.get("Content-Type", "application/json")}
                return web.Response(body=payload, status=response.status, headers=passed)
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise HttpError(503, f"the peer's control process did not answer: {type(error).__name__}") from None


def _recovering(entry: dict[str, Any] | None) -> bool:
    """Whether the app (its routing entry) has no ready replica but is getting one: loading
    somewhere, or its failed primary's successor about to be planned."""
    return entry is not None and not entry["servable"] and bool(entry.get("loading_on") or entry.get("failing_over"))


def _recovering_headers(entry: dict[str, Any] | None) -> dict[str, str]:
    """`X-Redge-Recovering: n2` (the nodes loading the app), or `plan` while the new plan
    after its primary's failure is not committed yet; nothing when it is not recovering."""
    if not _recovering(entry):
        return {}
    assert entry is not None
    return {RECOVERING_HEADER: ",".join(entry["loading_on"]) if entry.get("loading_on") else "plan"}


def _specs(local: dict[str, Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(spec) for spec in local["inputs"])


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=START-END` (END inclusive, optional) or `bytes=-SUFFIX` as [start, end)."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return None
            return max(0, size - length), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or start < 0 or end <= start:
        return None
    return start, min(end, size)


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent (the control process) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the closed socket pair still ends the worker
    if os.getppid() == 1:
        os._exit(1)  # the parent died before we asked


def main() -> None:
    _die_with_parent()
    config = WorkerConfig.from_json(sys.stdin.buffer.read())
    own_scheduling_group(config.nice)  # below the control process, in a group of its own
    from redge.agent import logs

    logs.configure(config.node_id, config.log_level)
    structlog.contextvars.bind_contextvars(worker=config.index)
    asyncio.run(Worker(config).run())


if __name__ == "__main__":
    main()
