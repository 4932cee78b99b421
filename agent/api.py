"""HTTP API of a peer: health, the cluster snapshot, events, admin calls and metrics.

Every error is `{"error": "..."}` with a status that says whose fault it is: 4xx for the
caller's request, 503 when the cluster cannot answer now (no leader, no quorum), 504 when a
proposal's outcome is unknown. A handler never lets an exception reach aiohttp's default
500 page: the peer stays up and says what went wrong.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web

from redge.agent import metrics as metrics_module
from redge.agent import oip
from redge.agent.clock import wall_ms
from redge.agent.dataplane import CONTROL_TOKEN_HEADER
from redge.agent.errors import HttpError
from redge.agent.joining import JOIN_SIGNATURE_HEADER, sign_join
from redge.consensus import commands as c
from redge.consensus.errors import ConsensusError, MalformedCommand, ProposalTimeout

if TYPE_CHECKING:
    from redge.agent.peer import Peer

log = structlog.get_logger("redge.api")

EVENTS_LIMIT_MAX = 2000
EVENTS_WAIT_S_MAX = 30.0


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


CONTROL_BODY_BYTES_MAX = 1024 * 1024


def build_app(peer: Peer) -> web.Application:
    """The control process's API. It listens on an abstract Unix socket only and answers
    only calls that carry the peer's control token, which its data-plane workers add when
    they pass a client's call on (agent/dataplane.py); inference never comes here."""
    app = web.Application(client_max_size=CONTROL_BODY_BYTES_MAX,
                          middlewares=[_token_middleware(peer), _errors_middleware(peer)])
    app["peer"] = peer
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", health_live)
    app.router.add_get("/v2/health/ready", health_ready)
    app.router.add_get("/cluster", cluster_snapshot)
    app.router.add_get("/cluster/events", cluster_events)
    app.router.add_get("/cluster/apps", apps_list)
    app.router.add_post("/cluster/apps", apps_register)
    app.router.add_delete("/cluster/apps/{name}", apps_remove)
    app.router.add_post("/cluster/join", cluster_join)
    app.router.add_post("/cluster/probe", cluster_probe)
    app.router.add_get("/metrics", metrics_text)
    return app


def _token_middleware(peer: Peer):
    expected = peer.control_token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler):
        given = request.headers.get(CONTROL_TOKEN_HEADER, "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            return error_response(403, "this socket serves the peer's own HTTP workers only")
        return await handler(request)

    return middleware


def _errors_middleware(peer: Peer):
    @web.middleware
    async def middleware(request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            response = await handler(request)
        except HttpError as error:
            response = error_response(error.status, error.message)
        except ProposalTimeout as error:
            response = error_response(504, str(error))
        except ConsensusError as error:
            response = error_response(503, f"the cluster cannot commit now: {error}")
        except web.HTTPRequestEntityTooLarge as error:
            response = error_response(413, f"request body too large: {error.text}")
        except web.HTTPException as error:
            response = error_response(error.status, error.reason or "error")
        except Exception as error:  # the peer must stay up whatever a handler does
            log.exception("http_handler_failed", route=route)
            response = error_response(500, f"internal error: {type(error).__name__}: {error}")
        return response  # counted by the worker that passed the call on

    return middleware


def _peer(request: web.Request) -> Peer:
    return request.app["peer"]


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise HttpError(400, f"body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "body must be a JSON object")
    return data


def _require_admin(request: web.Request) -> None:
    token = _peer(request).config.admin_token
    if not token:
        raise HttpError(403, "admin calls are disabled: start the peer with REDGE_ADMIN_TOKEN or admin_token_file")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        raise HttpError(401, "admin calls need the header Authorization: Bearer TOKEN")


# ---------------------------------------------------------------------- health


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(oip.server_metadata())


async def health_live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def health_ready(request: web.Request) -> web.Response:
    ready, reason = _peer(request).is_ready()
    return json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


# ---------------------------------------------------------------------- cluster


async def cluster_snapshot(request: web.Request) -> web.Response:
    return json_response(_peer(request).snapshot())


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, f"query parameter {name} must be an integer") from None
    if not low <= value <= high:
        raise HttpError(400, f"query parameter {name} must be between {low} and {high}")
    return value


async def cluster_events(request: web.Request) -> web.Response:
    """Events after `since` (a sequence number), oldest first; `wait_s` long-polls for new ones."""
    peer = _peer(request)
    since = _int_query(request, "since", 0, 0, 2**62)
    limit = _int_query(request, "limit", 500, 1, EVENTS_LIMIT_MAX)
    try:
        wait_s = min(float(request.query.get("wait_s", "0")), EVENTS_WAIT_S_MAX)
    except ValueError:
        raise HttpError(400, "query parameter wait_s must be a number") from None
    assert peer.raft is not None
    deadline = time.monotonic() + max(wait_s, 0.0)

    def read(state):
        return [e for e in state.events if e.seq > since][:limit], state.event_seq

    events, last_seq = peer.raft.read(read)
    while not events and time.monotonic() < deadline:
        await peer.wait_for_commit(deadline - time.monotonic())
        events, last_seq = peer.raft.read(read)
    applied = peer.raft.applied_times([e.seq for e in events])
    # `at_ms`: when the command was proposed (its proposer's clock, replicated); `applied_ms`:
    # when this peer applied it, i.e. saw it committed (local, absent if not known here).
    return json_response(
        {
            "events": [
                {"seq": e.seq, "at_ms": e.at_ms, "kind": e.kind, **e.fields}
                | ({"applied_ms": round(applied[e.seq], 3)} if e.seq in applied else {})
                for e in events
            ],
            "last_seq": last_seq,
        }
    )


async def cluster_join(request: web.Request) -> web.Response:
    """Add a new peer to the Raft group. The body is signed with the cluster secret."""
    peer = _peer(request)
    body = await request.read()
    signature = request.headers.get(JOIN_SIGNATURE_HEADER, "")
    if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), sign_join(peer.config.secret, body).encode()):
        raise HttpError(403, "join refused: the signature does not match this cluster's secret")
    try:
        command = c.decode(body)
    except MalformedCommand as error:
        raise HttpError(400, f"join body must be an encoded Join command: {error}") from None
    if not isinstance(command, c.Join):
        raise HttpError(400, "join body must be an encoded Join command")
    # No clock is compared here: a replayed body is harmless because the state machine takes
    # a Join only with a higher incarnation than the member's, and a voter is added only for
    # the Raft address the cluster state holds for that member now.
    raft_address = command.raft_address
    assert peer.raft is not None
    # Record the member first, then make it a voter (see Peer._request_join).
    outcome = await peer.propose(command)
    if not outcome.accepted:
        raise HttpError(409, f"join refused: {outcome.reason}")
    member = peer.raft.read(lambda state: state.members.get(command.node_id))
    if member is None or member.raft_address != raft_address or member.incarnation != command.incarnation:
        raise HttpError(409, "join refused: the cluster state holds another address or incarnation for this node")
    if raft_address == peer.config.raft or raft_address in peer.raft.status().partners:
        return json_response({"joined": True, "detail": "already a member of the Raft group"})
    await peer.raft.add_member(raft_address, timeout_s=peer.profile.proposal_timeout_s)
    log.info("raft_member_added", raft_address=raft_address, node_id=command.node_id)
    return json_response({"joined": True})


PROBE_COUNT_MAX = 20_000
PROBE_CONCURRENCY_MAX = 256
PROBE_DEADLINE_S_MAX = 120.0


async def cluster_probe(request: web.Request) -> web.Response:
    """Commit no-op probes from this peer and report each commit's latency as this peer saw it.

    A measuring tool (admin only): `count` probes, `concurrency` in flight, each attempt
    bounded by `attempt_timeout_s` and retried until it commits or `deadline_s` passes, so
    it also measures how long a cluster takes to commit again after losing its leader.
    """
    _require_admin(request)
    peer = _peer(request)
    body = await _json_body(request)
    try:
        count = int(body.get("count", 1))
        concurrency = int(body.get("concurrency", 1))
        attempt_timeout_s = float(body.get("attempt_timeout_s", peer.profile.proposal_timeout_s))
        deadline_s = float(body.get("deadline_s", peer.profile.proposal_timeout_s))
    except (TypeError, ValueError) as error:
        raise HttpError(400, f"bad probe parameter: {error}") from None
    if not (1 <= count <= PROBE_COUNT_MAX and 1 <= concurrency <= PROBE_CONCURRENCY_MAX):
        raise HttpError(400, f"count must be 1..{PROBE_COUNT_MAX} and concurrency 1..{PROBE_CONCURRENCY_MAX}")
    if not (0 < attempt_timeout_s <= deadline_s <= PROBE_DEADLINE_S_MAX):
        raise HttpError(400, f"need 0 < attempt_timeout_s <= deadline_s <= {PROBE_DEADLINE_S_MAX}")
    started = time.monotonic()
    deadline = started + deadline_s
    latencies_ms: list[float] = []
    committed_at_ms: list[int] = []
    failures: dict[str, int] = {}
    remaining = iter(range(count))

    async def worker() -> None:
        for index in remaining:
            while True:
                attempt_started = time.perf_counter()
                try:
                    await peer.propose(c.Probe(peer.node_id, f"{index}", wall_ms()), timeout_s=attempt_timeout_s)
                    latencies_ms.append((time.perf_counter() - attempt_started) * 1000)
                    committed_at_ms.append(wall_ms())
                    break
                except ConsensusError as error:
                    failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
                    if time.monotonic() >= deadline:
                        return
                    if not isinstance(error, ProposalTimeout):
                        await asyncio.sleep(0.005)  # no leader known yet: let the election run

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert peer.raft is not None
    return json_response(
        {
            "node_id": peer.node_id,
            "is_leader": peer.raft.status().is_leader,
            "committed": len(latencies_ms),
            "latencies_ms": latencies_ms,
            "first_committed_at_ms": min(committed_at_ms) if committed_at_ms else None,
            "duration_s": time.monotonic() - started,
            "failures": failures,
        }
    )


# ---------------------------------------------------------------------- apps

APP_FIELDS = {"name", "variants", "priority", "slo_ms", "backup", "request_rate_per_s"}


def parse_app(data: dict[str, Any], at_ms: int, proposer_id: str = "") -> c.RegisterApp:
    unknown = sorted(set(data) - APP_FIELDS)
    if unknown:
        raise HttpError(400, f"unknown app fields: {', '.join(unknown)}")
    missing = [name for name in ("name", "variants") if name not in data]
    if missing:
        raise HttpError(400, f"missing app fields: {', '.join(missing)}")
    variants = data["variants"]
    if isinstance(variants, str):
        variants = [variants]
    if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
        raise HttpError(400, "variants must be a list of artifact names, largest first")
    try:
        return c.RegisterApp(
            name=str(data["name"]),
            variants=tuple(variants),
            priority=str(data.get("priority", "standard")),
            slo_ms=float(data.get("slo_ms", 1000.0)),
            backup=str(data.get("backup", "auto")),
            at_ms=at_ms,
            request_rate_per_s=float(data.get("request_rate_per_s", 0.0)),
            proposer_id=proposer_id,
        )
    except (TypeError, ValueError) as error:
        raise HttpError(400, f"bad app field: {error}") from None


async def apps_list(request: web.Request) -> web.Response:
    peer = _peer(request)
    snapshot = peer.snapshot()
    return json_response({"apps": snapshot["apps"], "plan": snapshot["plan"], "epoch": snapshot["epoch"]})


async def apps_register(request: web.Request) -> web.Response:
    _require_admin(request)
    peer = _peer(request)
    command = parse_app(await _json_body(request), wall_ms(), proposer_id=peer.node_id)
    outcome = await peer.propose(command)
    if not outcome.accepted:
        raise HttpError(400, f"app refused: {outcome.reason}")
    return json_response({"app": command.name, "registered": True, "detail": outcome.reason or "registered"})


async def apps_remove(request: web.Request) -> web.Response:
    _require_admin(request)
    peer = _peer(request)
    name = request.match_info["name"]
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
        raise HttpError(400, f"invalid app name {name!r}")
    outcome = await peer.propose(c.RemoveApp(name, wall_ms(), proposer_id=peer.node_id))
    if outcome.duplicate:
        raise HttpError(404, f"no app named {name}")
    return json_response({"app": name, "removed": True})


# ---------------------------------------------------------------------- metrics


async def metrics_text(request: web.Request) -> web.Response:
    peer = _peer(request)
    if peer.workers is not None:
        await peer.workers.flush()  # what the HTTP workers served up to now, counted
    body = peer.metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics_module.CONTENT_TYPE})
