"""Inference over HTTP: the Open Inference Protocol on every peer, routing, artifact transfer.

Any peer answers for any app. A peer that holds the app's replica serves it; one that does
not forwards the request to the app's current primary, then to its warm backups, and says in
every response which node and which epoch served it. A request that already went through
one peer (`X-Redge-Forwarded`) is never forwarded again, so two peers with stale plans
cannot bounce it between them. `X-Redge-Prefer-Local` asks a peer to serve from its own
replica without trying the primary first: the redge client sends it to a backup after the
primary failed it, which is how a warm backup serves within milliseconds of a crash.

Peers also serve their stores' artifacts (`/models/{name}/{version}/artifact` for the
manifest, `/files/{file}` for a file, with Range), which is how cold backups are fetched.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from redge.agent import oip
from redge.consensus.state import ALIVE, SUSPECTED, ClusterState
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

if TYPE_CHECKING:
    from redge.agent.peer import Peer

log = structlog.get_logger("redge.inference")

FORWARDED_HEADER = "X-Redge-Forwarded"
PREFER_LOCAL_HEADER = "X-Redge-Prefer-Local"
DEADLINE_HEADER = "X-Redge-Deadline-Ms"
NODE_HEADER = "X-Redge-Node"
EPOCH_HEADER = "X-Redge-Epoch"
VARIANT_HEADER = "X-Redge-Variant"
TIMING_HEADER = "Server-Timing"
PASSED_HEADERS = ("Content-Type", oip.HEADER_LENGTH, NODE_HEADER, EPOCH_HEADER, VARIANT_HEADER)
CHUNK_BYTES = 1024 * 1024


class Unavailable(Exception):
    """No replica can serve now (503)."""


def route_targets(state: ClusterState, app: str, self_id: str) -> list[tuple[str, str, str, str]]:
    """(node_id, http_address, role, variant) to try for `app`: primary, then warm backups."""
    order = {"primary": 0, "warm": 1}
    targets = []
    for replica in state.plan.get(app, ()):
        member = state.members.get(replica.node_id)
        if replica.role not in order or member is None or member.status not in (ALIVE, SUSPECTED):
            continue
        if replica.node_id == self_id:
            continue
        targets.append((order[replica.role], member.status != ALIVE, replica.node_id, member.http_address, replica.role, replica.variant))
    targets.sort()
    return [t[2:] for t in targets]


def routes(state: ClusterState) -> dict[str, Any]:
    """The routing table that clients keep: per app, its replicas in the order to try."""
    apps: dict[str, Any] = {}
    for app in sorted(state.apps):
        replicas = []
        for replica in state.plan.get(app, ()):
            member = state.members.get(replica.node_id)
            if member is None:
                continue
            replicas.append(
                {
                    "node_id": replica.node_id,
                    "url": f"http://{member.http_address}",
                    "role": replica.role,
                    "variant": replica.variant,
                    "status": member.status,
                    "report": state.replica_reports.get((app, replica.node_id)),
                }
            )
        order = {"primary": 0, "warm": 1, "cold": 2}
        replicas.sort(key=lambda r: (order.get(r["role"], 9), r["status"] != ALIVE, r["node_id"]))
        apps[app] = {"replicas": replicas}
    return {"epoch": state.epoch, "apps": apps}


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


class InferenceService:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def register(self, app: web.Application) -> None:
        app.router.add_get("/v2/models/{app}", self.model_metadata)
        app.router.add_get("/v2/models/{app}/ready", self.model_ready)
        app.router.add_post("/v2/models/{app}/infer", self.infer)
        app.router.add_get("/v2/models/{app}/versions/{version}", self.model_metadata)
        app.router.add_get("/v2/models/{app}/versions/{version}/ready", self.model_ready)
        app.router.add_post("/v2/models/{app}/versions/{version}/infer", self.infer)
        app.router.add_get("/cluster/routes", self.routes)
        app.router.add_get("/models/{name}/{version}/artifact", self.artifact_manifest)
        app.router.add_get("/models/{name}/{version}/files/{file:.+}", self.artifact_file)

    # ------------------------------------------------------------------ helpers

    def _state_read(self, reader):
        assert self.peer.raft is not None
        return self.peer.raft.read(reader)

    def _known(self, app: str) -> bool:
        return self._state_read(lambda s: app in s.apps)

    def _epoch(self) -> int:
        return self._state_read(lambda s: s.epoch)

    # ------------------------------------------------------------------ metadata

    async def model_metadata(self, request: web.Request) -> web.Response:
        from redge.agent.api import HttpError, json_response

        app = request.match_info["app"]
        if not self._known(app):
            raise HttpError(404, f"unknown app {app!r}")
        local = self.peer.replicas.serving(app) if self.peer.replicas else None
        if local is not None:
            manifest = local.manifest
            return json_response(
                {
                    "name": app,
                    "versions": [manifest.version],
                    "platform": manifest.format,
                    "inputs": [spec.to_json() for spec in manifest.inputs],
                    "outputs": [spec.to_json() for spec in manifest.outputs],
                    "parameters": {"node_id": self.peer.node_id, "variant": local.variant, "epoch": self._epoch()},
                }
            )
        if FORWARDED_HEADER in request.headers:
            raise HttpError(503, f"{app} is not loaded on {self.peer.node_id}")
        try:
            return await self._forward(request, app, b"")
        except Unavailable as error:
            raise HttpError(503, str(error)) from None

    async def model_ready(self, request: web.Request) -> web.Response:
        from redge.agent.api import HttpError, json_response

        app = request.match_info["app"]
        if not self._known(app):
            raise HttpError(404, f"unknown app {app!r}")
        if self.peer.replicas is not None and self.peer.replicas.serving(app) is not None:
            return json_response({"name": app, "ready": True, "node_id": self.peer.node_id})

        def served(state: ClusterState) -> bool:
            for replica in state.plan.get(app, ()):
                member = state.members.get(replica.node_id)
                if (
                    replica.role in ("primary", "warm")
                    and member is not None
                    and member.status in (ALIVE, SUSPECTED)
                    and state.replica_reports.get((app, replica.node_id)) in ("serving", "load_done")
                ):
                    return True
            return False

        ready = self._state_read(served)
        return json_response({"name": app, "ready": ready}, status=200 if ready else 503)

    async def routes(self, request: web.Request) -> web.Response:
        """The routing table; with `since_epoch` and `wait_s`, waits for a newer epoch (long poll)."""
        from redge.agent.api import HttpError, json_response

        try:
            since_epoch = int(request.query.get("since_epoch", "-1"))
            wait_s = min(max(float(request.query.get("wait_s", "0")), 0.0), 30.0)
        except ValueError:
            raise HttpError(400, "since_epoch must be an integer and wait_s a number") from None
        deadline = time.monotonic() + wait_s
        while self._epoch() <= since_epoch and time.monotonic() < deadline:
            await self.peer.wait_for_commit(deadline - time.monotonic())
        return json_response(self._state_read(routes))

    # ------------------------------------------------------------------ inference

    async def infer(self, request: web.Request) -> web.Response:
        from redge.agent.api import HttpError

        started_s = time.perf_counter()
        app = request.match_info["app"]
        me = self.peer.node_id
        # One read of the state per request: is the app known, its SLO, and does the plan make
        # us its primary?
        known, slo_ms, planned_primary = self._state_read(
            lambda s: (
                app in s.apps,
                s.apps[app].slo_ms if app in s.apps else 0.0,
                (p := s.primary_of(app)) is not None and p.node_id == me,
            )
        )
        if not known:
            raise HttpError(404, f"unknown app {app!r}")
        body = await request.read()
        read_s = time.perf_counter()
        forwarded = FORWARDED_HEADER in request.headers
        prefer_local = forwarded or request.headers.get(PREFER_LOCAL_HEADER, "") not in ("", "0", "false")
        local = self.peer.replicas.serving(app) if self.peer.replicas else None
        # Serve here if the committed plan makes this node the primary, or if the caller
        # already failed with the primary (a backup answering at once is the point of it).
        if local is not None and (planned_primary or prefer_local):
            return await self._serve_locally(request, app, body, (started_s, read_s), slo_ms)
        if forwarded:
            raise HttpError(503, f"{app} is not loaded on {self.peer.node_id}")
        try:
            return await self._forward(request, app, body, started_s)
        except Unavailable as error:
            if local is not None:
                return await self._serve_locally(request, app, body, (started_s, read_s), slo_ms)
            raise HttpError(503, str(error)) from None

    def _deadline_s(self, request: web.Request) -> float:
        raw = request.headers.get(DEADLINE_HEADER)
        budget_s = self.peer.profile.request_timeout_s
        if raw is not None:
            try:
                budget_s = min(budget_s, max(0.001, float(raw) / 1000))
            except ValueError:
                pass
        return time.monotonic() + budget_s

    async def _serve_locally(
        self, request: web.Request, app: str, body: bytes, marks: tuple[float, float], slo_ms: float
    ) -> web.Response:
        """Run `app` on this node's replica. `marks`: when the handler started, and when it
        had read the body (perf_counter seconds), for the `Server-Timing` header."""
        from redge.agent.api import HttpError

        try:
            parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), self.peer.config.request_body_bytes_max)
        except oip.BadRequest as error:
            raise HttpError(400, str(error)) from None
        assert self.peer.replicas is not None
        started = time.perf_counter()
        try:
            replica, outputs, timing = await self.peer.replicas.infer(app, parsed.inputs, self._deadline_s(request))
        except InvalidInput as error:
            raise HttpError(400, str(error)) from None
        except DeadlineExceeded as error:
            self.peer.on_timed_out()
            raise HttpError(504, str(error)) from None
        except HostBusy as error:
            self.peer.on_timed_out()  # the model host's queue is full: as slow as a timeout
            raise HttpError(503, str(error)) from None
        except (ModelNotLoaded, ModelNotServing, HostCrashed, HostClosed) as error:
            raise HttpError(503, str(error)) from None
        except RuntimeFailure as error:
            raise HttpError(500, f"inference failed: {error}") from None
        latency_ms = (time.perf_counter() - started) * 1000
        self.peer.metrics.inference_seconds.labels(app=app).observe(latency_ms / 1000)
        epoch = self._epoch()
        try:
            response_body, headers = oip.encode_infer_response(
                app, replica.manifest.version, outputs, parsed,
                {"node_id": self.peer.node_id, "epoch": epoch, "variant": replica.variant, "role": replica.role},
            )
        except oip.BadRequest as error:
            raise HttpError(400, str(error)) from None
        headers.update({NODE_HEADER: self.peer.node_id, EPOCH_HEADER: str(epoch), VARIANT_HEADER: replica.variant})
        handler_started_s, read_s = marks
        total_ms = (time.perf_counter() - handler_started_s) * 1000
        headers[TIMING_HEADER] = server_timing(
            read=(read_s - handler_started_s) * 1000,
            parse=(started - read_s) * 1000,
            queue=timing.queued_ms,
            model=timing.compute_ms,
            hop=timing.transfer_ms,
            total=total_ms,
        )
        self.peer.metrics.model_seconds.labels(app=app).observe(timing.compute_ms / 1000)
        if slo_ms > 0:
            # From the parsed request to the answer: not the client's upload, nor a failed
            # forward to the primary that came before serving here.
            self.peer.on_served(slo_ms, latency_ms)
        return web.Response(body=response_body, headers=headers)

    async def _forward(self, request: web.Request, app: str, body: bytes, started_s: float | None = None) -> web.Response:
        targets = self._state_read(lambda s: route_targets(s, app, self.peer.node_id))
        if not targets:
            raise Unavailable(f"no replica of {app} can serve now")
        headers = {name: request.headers[name] for name in ("Content-Type", oip.HEADER_LENGTH) if name in request.headers}
        headers[FORWARDED_HEADER] = self.peer.node_id
        deadline = self._deadline_s(request)  # one deadline for every target tried
        failures = []
        for node_id, address, _role, _variant in targets:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                failures.append("deadline passed")
                break
            headers[DEADLINE_HEADER] = str(max(1, int(remaining_s * 1000)))
            attempt_s = min(self.peer.profile.forward_timeout_s, remaining_s)
            timeout = aiohttp.ClientTimeout(total=attempt_s, connect=min(1.0, attempt_s))
            url = f"http://{address}{request.rel_url.path}"
            try:
                async with self.session().request(request.method, url, data=body or None, headers=headers, timeout=timeout) as response:
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
                    self.peer.metrics.forwards.labels(outcome="ok" if response.status < 500 else "error").inc()
                    return web.Response(body=payload, status=response.status, headers=passed)
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                failures.append(f"{node_id}: {type(error).__name__}")
                self.peer.metrics.forwards.labels(outcome="unreachable").inc()
                if isinstance(error, TimeoutError) and self.peer.detection is not None:
                    self.peer.detection.on_request_timeout(node_id)  # slow, not gone: evidence of degradation
        raise Unavailable(f"no replica of {app} answered: {', '.join(failures)}")

    # ------------------------------------------------------------------ artifacts

    async def artifact_manifest(self, request: web.Request) -> web.Response:
        from redge.agent.api import HttpError

        store = self.peer.store
        if store is None:
            raise HttpError(404, "this peer has no model store")
        name, version = request.match_info["name"], request.match_info["version"]
        try:
            manifest = await asyncio.get_running_loop().run_in_executor(None, store.get, name, version)
        except (ArtifactNotFound, ManifestInvalid) as error:
            raise HttpError(404, str(error)) from None
        return web.Response(body=manifest.to_json(), content_type="application/json")

    async def artifact_file(self, request: web.Request) -> web.StreamResponse:
        from redge.agent.api import HttpError

        store = self.peer.store
        if store is None:
            raise HttpError(404, "this peer has no model store")
        name, version, file = request.match_info["name"], request.match_info["version"], request.match_info["file"]
        loop = asyncio.get_running_loop()
        try:
            whole = await loop.run_in_executor(None, store.open_range, name, version, file, 0, None)
        except (RuntimeFailure, OSError, ValueError) as error:
            raise HttpError(404, str(error)) from None
        size = whole.size_bytes
        start, end, status = 0, size, 200
        range_header = request.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"},
                                    body=orjson.dumps({"error": f"unsatisfiable range {range_header!r}"}),
                                    content_type="application/json")
            start, end, status = parsed[0], parsed[1], 206
        try:
            part = await loop.run_in_executor(None, store.open_range, name, version, file, start, end)
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


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
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
