"""The redge client: inference that fails over in milliseconds, sync and asyncio.

It keeps the cluster's routing table (per app: primary, then backups, with the epoch) by
long-polling any peer, sends each request straight to the primary, and on a refused
connection, a timeout or a 503 tries the next replica at once, asking it to serve from its
own copy (`X-Redge-Prefer-Local`). So a warm backup answers within milliseconds of a crash,
before the cluster has confirmed anything. When no copy is loaded anywhere but one is being
loaded (a cold backup), the peer tried second holds the request until it can be served
(`X-Redge-Hold-Ms`), and a 503 that says the app is recovering (`X-Redge-Recovering`) is
waited out within the deadline instead of counted as a failure. Every call has a deadline
and ends with a result or a definite error, never a hang; retries are bounded. A 4xx is the
caller's mistake and is never retried.

    client = Client(["http://127.0.0.1:8101"])
    result = client.infer("detector", {"input": array})
    result.outputs["output"], result.node_id, result.epoch
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

from redge.agent import oip
from redge.agent.profile import Profile, get_profile

PREFER_LOCAL_HEADER = "X-Redge-Prefer-Local"
DEADLINE_HEADER = "X-Redge-Deadline-Ms"
HOLD_HEADER = "X-Redge-Hold-Ms"
RECOVERING_HEADER = "X-Redge-Recovering"
# After a 503 that says "recovering" but came back without being held (the peer held its
# most already): the pause before asking again, unless the routing table changes first.
RECOVERING_PAUSE_S = 0.05
# A hold asked of a peer ends this long before the deadline, so that its "still recovering"
# answer arrives before the client gives up on the attempt.
HOLD_MARGIN_S = 0.05


class ClientError(Exception):
    """Base of the client's definite errors."""


class RequestRejected(ClientError):
    """The cluster answered with a 4xx: the request itself is wrong. Not retried."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class NoReplicaAvailable(ClientError):
    """Every replica and peer tried failed, or the deadline passed first."""

    def __init__(self, app: str, attempts: list[str]) -> None:
        super().__init__(f"no replica of {app} answered: {'; '.join(attempts) or 'nothing to try'}")
        self.app = app
        self.attempts = attempts


class AppRecovering(NoReplicaAvailable):
    """The deadline passed while the app had no ready replica but one was being loaded."""

    def __init__(self, app: str, attempts: list[str], loading_on: str) -> None:
        super().__init__(app, attempts)
        self.loading_on = loading_on
        self.args = (f"{app} is recovering (loading on {loading_on}) and the deadline passed first; "
                     f"tried: {'; '.join(attempts[-3:])}",)


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    node_id: str | None
    epoch: int | None
    variant: str | None
    attempts: int
    latency_ms: float
    failovers: list[str] = field(default_factory=list)
    # The copy's role: primary, warm (a backup answering before the plan moved), or interim
    # (another app's copy of one of this app's variants, while the app's own replica loads).
    role: str | None = None


class AsyncClient:
    """Use `async with AsyncClient(peers) as client:` or call `start()` / `close()`.

    `profile` (the cluster's, agent/profile.py) gives the deadlines not set here: a call's
    whole `deadline_s` and one attempt's `attempt_timeout_s`."""

    def __init__(
        self,
        peers: list[str],
        *,
        profile: str | Profile = "enterprise",
        deadline_s: float | None = None,
        attempt_timeout_s: float | None = None,
        attempts_max: int = 6,
        binary: bool = True,
        watch_routes: bool = True,
        hold_s: float = 1.0,
    ) -> None:
        timings = profile if isinstance(profile, Profile) else get_profile(profile)
        deadline_s = timings.client_deadline_s if deadline_s is None else deadline_s
        attempt_timeout_s = timings.client_attempt_timeout_s if attempt_timeout_s is None else attempt_timeout_s
        assert peers, "give at least one peer URL"
        assert attempts_max >= 1 and deadline_s > 0 and attempt_timeout_s > 0 and hold_s >= 0
        # How long a peer may hold one attempt while the app recovers; the attempt's timeout
        # grows by as much. Never asked of the first target (the primary): a hung primary
        # still costs only `attempt_timeout_s`.
        self.hold_s = hold_s
        self.peers = [p.rstrip("/") for p in peers]
        self.deadline_s = deadline_s
        self.attempt_timeout_s = attempt_timeout_s
        self.attempts_max = attempts_max
        self.binary = binary
        self.watch_routes = watch_routes
        self.routes: dict[str, Any] = {"epoch": -1, "apps": {}}
        self._session: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._routes_changed = asyncio.Event()

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector)
        await self.refresh_routes(wait_s=0)
        if self.watch_routes:
            self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ routes

    def _peer_order(self) -> list[str]:
        urls = []
        for app in self.routes.get("apps", {}).values():
            for replica in app.get("replicas", []):
                if replica.get("status") in ("alive", "suspected") and replica["url"] not in urls:
                    urls.append(replica["url"])
        return self.peers + [u for u in urls if u not in self.peers]

    async def refresh_routes(self, wait_s: float = 0.0) -> bool:
        """Fetch the routing table from the first peer that answers. True when it got one."""
        assert self._session is not None
        since = self.routes.get("epoch", -1) if wait_s > 0 else -1
        for url in self._peer_order():
            try:
                timeout = aiohttp.ClientTimeout(total=wait_s + 2.0, connect=1.0)
                async with self._session.get(f"{url}/cluster/routes", params={"since_epoch": since, "wait_s": wait_s}, timeout=timeout) as response:
                    if response.status == 200:
                        routes = orjson.loads(await response.read())
                        if routes.get("epoch", -1) >= self.routes.get("epoch", -1):
                            self.routes = routes
                            self._routes_changed.set()
                        return True
            except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
                continue
        return False

    async def _watch(self) -> None:
        while True:
            got = await self.refresh_routes(wait_s=10.0)
            if not got:
                await asyncio.sleep(0.2)

    def targets(self, app: str) -> list[tuple[str, bool]]:
        """(url, prefer_local) to try in order: the replicas, then any peer (which routes)."""
        replicas = self.routes.get("apps", {}).get(app, {}).get("replicas", [])
        ordered: list[tuple[str, bool]] = []
        for replica in replicas:
            if replica["role"] in ("primary", "warm") and replica.get("status") != "failed":
                ordered.append((replica["url"], replica["role"] != "primary"))
        for url in self.peers:
            if all(url != existing for existing, _ in ordered):
                ordered.append((url, False))
        return ordered

    # ------------------------------------------------------------------ inference

    async def infer(
        self, app: str, inputs: Mapping[str, np.ndarray], *, deadline_s: float | None = None,
        outputs: list[str] | None = None,
    ) -> InferResult:
        assert self._session is not None, "call start() first"
        started = time.monotonic()
        deadline = started + (deadline_s if deadline_s is not None else self.deadline_s)
        requested = [oip.RequestedOutput(name, self.binary) for name in outputs] if outputs else None
        body, headers = oip.encode_infer_request(dict(inputs), binary=self.binary, outputs=requested)
        attempts: list[str] = []
        tried_primary_failed = False
        failures = 0
        turn = 0
        recovering = ""
        while failures < self.attempts_max:
            targets = self.targets(app)
            if not targets:
                break
            url, prefer_local = targets[turn % len(targets)]
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            send_headers = dict(headers)
            send_headers[DEADLINE_HEADER] = str(int(remaining_s * 1000))
            hold_s = max(0.0, min(self.hold_s, remaining_s - HOLD_MARGIN_S)) if tried_primary_failed else 0.0
            send_headers[HOLD_HEADER] = str(int(hold_s * 1000))
            if prefer_local or tried_primary_failed:
                send_headers[PREFER_LOCAL_HEADER] = "1"
            timeout = aiohttp.ClientTimeout(total=min(self.attempt_timeout_s + hold_s, remaining_s),
                                            connect=min(0.5, remaining_s))
            sent_s = time.monotonic()
            try:
                async with self._session.post(f"{url}/v2/models/{app}/infer", data=body, headers=send_headers, timeout=timeout) as response:
                    payload = await response.read()
                    if response.status == 200:
                        header, arrays = oip.decode_infer_response(payload, response.headers.get(oip.HEADER_LENGTH))
                        parameters = header.get("parameters") or {}
                        return InferResult(
                            outputs=arrays,
                            node_id=parameters.get("node_id"),
                            epoch=parameters.get("epoch"),
                            variant=parameters.get("variant"),
                            attempts=len(attempts) + 1,
                            latency_ms=(time.monotonic() - started) * 1000,
                            failovers=attempts,
                            role=parameters.get("role"),
                        )
                    message = _error_message(payload)
                    # 404 may be a peer whose state lags behind the app's registration: try another.
                    if 400 <= response.status < 500 and response.status not in (404, 408, 429):
                        raise RequestRejected(response.status, message)
                    attempts.append(f"{url}: {response.status} {message}")
                    recovering = ""
                    if response.status == 503 and RECOVERING_HEADER in response.headers:
                        # Being loaded: not a failure. Ask the same peer again (it holds the
                        # request while it may), pausing first if it could not hold this one.
                        recovering = response.headers[RECOVERING_HEADER]
                        tried_primary_failed = True
                        # (An attempt that asked for no hold is followed at once by one that does.)
                        if hold_s > 0 and time.monotonic() - sent_s < hold_s / 2:
                            await self._routes_change_or(min(RECOVERING_PAUSE_S, max(0.0, deadline - time.monotonic())))
                        continue
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                attempts.append(f"{url}: {type(error).__name__}")
            failures += 1
            turn += 1
            tried_primary_failed = True
            if self._session is not None and not self.watch_routes:
                # refresh_routes handles its own network errors; only its bound can end it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.refresh_routes(0), max(0.001, min(0.5, deadline - time.monotonic())))
        if recovering:
            raise AppRecovering(app, attempts, recovering)
        raise NoReplicaAvailable(app, attempts)

    async def _routes_change_or(self, timeout_s: float) -> None:
        self._routes_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._routes_changed.wait(), timeout_s)

    # ------------------------------------------------------------------ administration and events

    async def register_app(self, app: Mapping[str, Any], token: str) -> dict[str, Any]:
        """Register or update an app (the JSON of POST /cluster/apps); needs the admin token."""
        assert self._session is not None, "call start() first"
        errors = []
        for url in self._peer_order():
            try:
                async with self._session.post(
                    f"{url}/cluster/apps", data=orjson.dumps(dict(app)),
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self.deadline_s),
                ) as response:
                    payload = await response.read()
                    if response.status == 200:
                        return orjson.loads(payload)
                    if 400 <= response.status < 500:
                        raise RequestRejected(response.status, _error_message(payload))
                    errors.append(f"{url}: {response.status} {_error_message(payload)}")
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                errors.append(f"{url}: {type(error).__name__}")
        raise NoReplicaAvailable("admin", errors)

    async def events(self, since: int = 0, wait_s: float = 10.0, token: str | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Yield the cluster's events as they are committed, from any peer that answers.
        `token`: the read token, for peers that require one (a 401 raises RequestRejected:
        no other peer of the cluster would answer otherwise)."""
        assert self._session is not None, "call start() first"
        headers = {"Authorization": f"Bearer {token}"} if token else None
        while True:
            got = False
            for url in self._peer_order():
                try:
                    async with self._session.get(
                        f"{url}/cluster/events", params={"since": since, "wait_s": wait_s}, headers=headers,
                        timeout=aiohttp.ClientTimeout(total=wait_s + 5.0),
                    ) as response:
                        if response.status == 401:
                            raise RequestRejected(401, _error_message(await response.read()))
                        if response.status != 200:
                            continue
                        body = orjson.loads(await response.read())
                except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
                    continue
                got = True
                for event in body["events"]:
                    since = max(since, event["seq"])
                    yield event
                break
            if not got:
                await asyncio.sleep(0.2)


def _error_message(payload: bytes) -> str:
    try:
        return str(orjson.loads(payload).get("error", ""))[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return payload[:200].decode(errors="replace")


class Client:
    """The synchronous client: an AsyncClient on a private event loop thread."""

    def __init__(self, peers: list[str], **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="redge-client", daemon=True)
        self._thread.start()
        self._client = AsyncClient(peers, **options)
        self._call(self._client.start(), timeout_s=30)

    def _call(self, coroutine: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    @property
    def routes(self) -> dict[str, Any]:
        return self._client.routes

    def infer(self, app: str, inputs: Mapping[str, np.ndarray], *, deadline_s: float | None = None,
              outputs: list[str] | None = None) -> InferResult:
        budget_s = deadline_s if deadline_s is not None else self._client.deadline_s
        return self._call(self._client.infer(app, inputs, deadline_s=budget_s, outputs=outputs), timeout_s=budget_s + 5)

    def close(self) -> None:
        self._call(self._client.close(), timeout_s=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
