"""Closed-loop clients that keep calling the cluster during a scenario and record every call.

Each client has at most one request in flight (closed loop, as in the paper's experiments),
optionally paced to a rate. A client starts on its own peer (client i on peer i mod n) and,
when a call fails or its outcome is unknown, moves to the next peer, the way a client that
knows several endpoints fails over; so reconfiguration time is visible in the history.

Four kinds of load:

- `probe`: `POST /cluster/probe` (admin token) commits one no-op through Raft from the
  peer called. It works on any cluster and measures the control plane.
- `infer`: `POST /v2/models/{app}/infer` with Open Inference Protocol (KServe v2) JSON
  tensors. The answer names the serving node and plan epoch in `parameters`
  (`node_id`, `epoch`) and in the headers `X-Redge-Node` / `X-Redge-Epoch`.
- `client`: the same inference through the redge client (agent/client.py), which fails
  over between replicas by itself: every call ends with a result or a definite error
  within its deadline, which is what a user of redge sees.
- `write`: acknowledged writes. Each client owns a register (an app named `w<client>`
  that no artifact serves, so nothing is placed) and writes 1, 2, 3, ... into its
  `request_rate_per_s` with `POST /cluster/apps`; the checker compares the last
  acknowledged value with the committed one at the end (`lost_writes`).

Outcomes follow history.py: an answered error is `fail`, a timeout or a connection lost after
sending is `info`. A connection refused, or a netns portal's 502 `unreachable`, was never
delivered and so is `fail`. Every call has a deadline; the run is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from redge.chaos.history import FAIL, INFO, OK, History, Operation

KINDS = ("probe", "infer", "client", "write")
CLIENTS_MAX = 256
DATATYPES = ("FP32", "FP64", "INT32", "INT64", "UINT8", "BOOL")
INPUT_ELEMENTS_MAX = 1_000_000


@dataclass(frozen=True)
class LoadSpec:
    kind: str = "probe"
    app: str = ""  # the app to call; for probe load it only labels the history
    clients: int = 2
    rate_per_s: float = 0.0  # per client; 0 = as fast as the closed loop goes
    timeout_s: float = 2.0  # each call's deadline
    operations_max: int = 100_000
    input_name: str = "input"
    input_shape: tuple[int, ...] = (1, 3, 224, 224)
    input_datatype: str = "FP32"

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"load kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind in ("infer", "client") and not self.app:
            problems.append(f"{self.kind} load needs an app")
        if not 1 <= self.clients <= CLIENTS_MAX:
            problems.append(f"clients must be 1..{CLIENTS_MAX}")
        if self.rate_per_s < 0:
            problems.append("rate_per_s must be >= 0")
        if not 0 < self.timeout_s <= 60:
            problems.append("timeout_s must be in (0, 60]")
        if self.operations_max < 1:
            problems.append("operations_max must be >= 1")
        if self.input_datatype not in DATATYPES:
            problems.append(f"input_datatype must be one of {', '.join(DATATYPES)}")
        elements = 1
        for size in self.input_shape:
            elements *= size
        if not self.input_shape or any(size < 1 for size in self.input_shape) or elements > INPUT_ELEMENTS_MAX:
            problems.append(f"input_shape must be positive sizes with at most {INPUT_ELEMENTS_MAX} elements")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def label(self) -> str:
        return self.app or self.kind


def infer_body(spec: LoadSpec) -> dict[str, Any]:
    elements = 1
    for size in spec.input_shape:
        elements *= size
    value: Any = {"BOOL": False}.get(spec.input_datatype, 0.5 if spec.input_datatype.startswith("FP") else 1)
    return {
        "inputs": [
            {"name": spec.input_name, "shape": list(spec.input_shape), "datatype": spec.input_datatype,
             "data": [value] * elements}
        ]
    }


@dataclass
class LoadGenerator:
    """Runs `spec` against `targets` (node id -> base URL) in a thread of its own."""

    spec: LoadSpec
    targets: dict[str, str]
    token: str = ""
    history: History = field(default_factory=History)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _index: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _redge: Any = None  # the redge client of `client` load
    _written: dict[int, int] = field(default_factory=dict)  # write load: each client's last value

    def start(self, duration_s_max: float) -> None:
        assert self._thread is None, "a load generator runs once"
        self.history.operations_max = self.spec.operations_max
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(duration_s_max)), daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> History:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        return self.history

    async def _run(self, duration_s_max: float) -> None:
        deadline = time.monotonic() + duration_s_max
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.spec.clients * 2, force_close=False)
        if self.spec.kind == "client":
            from redge.agent.client import AsyncClient

            self._redge = AsyncClient([self.targets[n] for n in sorted(self.targets)], deadline_s=self.spec.timeout_s,
                                      attempt_timeout_s=max(0.1, self.spec.timeout_s / 4))
            await self._redge.start()
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                await asyncio.gather(*(self._client(session, client, deadline) for client in range(self.spec.clients)))
        finally:
            if self._redge is not None:
                await self._redge.close()

    async def _client(self, session: aiohttp.ClientSession, client: int, deadline: float) -> None:
        nodes = sorted(self.targets)
        position = client % len(nodes)
        interval_s = 1.0 / self.spec.rate_per_s if self.spec.rate_per_s else 0.0
        next_start = time.monotonic()
        while not self._stopping.is_set() and time.monotonic() < deadline:
            if len(self.history) >= self.spec.operations_max:
                return
            if interval_s:
                wait_s = next_start - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)  # pacing to the rate, not a wait for a condition
                next_start = max(next_start + interval_s, time.monotonic())
            node = nodes[position]
            operation = await self._call(session, client, node)
            self.history.append(operation)
            if operation.outcome != OK:
                position = (position + 1) % len(nodes)
                await asyncio.sleep(0.005)  # do not spin on a dead endpoint

    def _next_index(self) -> int:
        with self._lock:
            self._index += 1
            return self._index

    async def _call(self, session: aiohttp.ClientSession, client: int, node: str) -> Operation:
        spec = self.spec
        index = self._next_index()
        if spec.kind == "client":
            return await self._call_client(index, client, node)
        base = self.targets[node]
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        value = None
        if spec.kind == "write":
            value = self._written.get(client, 0) + 1
            self._written[client] = value
            url = base + "/cluster/apps"
            body = write_body(client, value)
        elif spec.kind == "probe":
            url = base + "/cluster/probe"
            attempt_timeout_s = min(0.5, spec.timeout_s / 2)
            body: dict[str, Any] = {"count": 1, "concurrency": 1, "attempt_timeout_s": attempt_timeout_s,
                                    "deadline_s": max(attempt_timeout_s, spec.timeout_s * 0.75)}
        else:
            url = f"{base}/v2/models/{spec.app}/infer"
            body = infer_body(spec)
        start_ms = time.time() * 1000
        started = time.perf_counter()
        outcome, served_by, epoch, status, error = INFO, None, None, None, ""
        try:
            async with session.post(url, json=body, headers=headers) as response:
                status = response.status
                try:
                    answer = await response.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    answer = None
                outcome, served_by, epoch, error = classify(spec.kind, status, answer, dict(response.headers))
        except (aiohttp.ClientError, OSError, TimeoutError) as exception:
            outcome, error = failed_outcome(exception, spec.timeout_s)
        latency_ms = (time.perf_counter() - started) * 1000
        return Operation(
            index=index, client=client, kind=spec.kind, app=spec.label, target=node,
            start_ms=start_ms, end_ms=start_ms + latency_ms, latency_ms=latency_ms,
            outcome=outcome, node=served_by, epoch=epoch, status=status, error=error[:300], value=value,
        )

    async def _call_client(self, index: int, client: int, node: str) -> Operation:
        """One inference through the redge client, which picks and fails over by itself."""
        from redge.agent.client import ClientError

        spec = self.spec
        inputs = {spec.input_name: infer_array(spec)}
        start_ms = time.time() * 1000
        started = time.perf_counter()
        outcome, served_by, epoch, error = INFO, None, None, ""
        try:
            result = await self._redge.infer(spec.app, inputs, deadline_s=spec.timeout_s)
            outcome, served_by, epoch = OK, result.node_id, result.epoch
        except ClientError as exception:  # a definite error: a rejected request, or nobody could serve
            outcome, error = FAIL, str(exception)
        except Exception as exception:  # noqa: BLE001 - anything else is an unknown outcome, and a bug
            error = f"{type(exception).__name__}: {exception}"
        latency_ms = (time.perf_counter() - started) * 1000
        return Operation(
            index=index, client=client, kind=spec.kind, app=spec.label, target=served_by or node,
            start_ms=start_ms, end_ms=start_ms + latency_ms, latency_ms=latency_ms,
            outcome=outcome, node=served_by, epoch=epoch, status=200 if outcome == OK else None, error=error[:300],
        )


WRITE_VARIANT = "w-register"  # no artifact has this name: the planner places nothing


def write_register(client: int) -> str:
    return f"w{client}"


def write_body(client: int, value: int) -> dict[str, Any]:
    return {"name": write_register(client), "variants": [WRITE_VARIANT], "priority": "best-effort", "slo_ms": 1000,
            "backup": "none", "request_rate_per_s": value}


def infer_array(spec: LoadSpec) -> Any:
    import numpy as np

    from redge.runtime.tensor import DATATYPE_NUMPY

    return np.full(spec.input_shape, 0.5 if spec.input_datatype.startswith("FP") else 1,
                   dtype=DATATYPE_NUMPY[spec.input_datatype])


def failed_outcome(exception: BaseException, timeout_s: float) -> tuple[str, str]:
    """How a request that raised counts: `fail` when it never reached the server (the
    connection was refused), `info` (unknown) when it may have been served."""
    if isinstance(exception, aiohttp.ClientConnectorError):
        return FAIL, f"not delivered: {exception.os_error or exception}"
    if isinstance(exception, TimeoutError):
        return INFO, f"no answer within {timeout_s}s"
    return INFO, f"{type(exception).__name__}: {exception}"


def classify(kind: str, status: int, answer: Any, headers: dict[str, str]) -> tuple[str, str | None, int | None, str]:
    """(outcome, serving node, epoch, error) for one HTTP answer; pure, so it has table tests."""
    message = answer.get("error", "") if isinstance(answer, dict) else ""
    if status == 502 and headers.get("X-Redge-Portal") == "unreachable":
        return FAIL, None, None, f"not delivered: {message}"
    if status == 504:
        return INFO, None, None, f"504 outcome unknown: {message}"
    if kind == "write" and status == 503:
        # The leader changed or was lost while it committed: the write may still land.
        return INFO, None, None, f"503 outcome unknown: {message}"
    if status != 200:
        return FAIL, None, None, f"{status}: {message}"
    if kind == "write":
        return OK, None, None, ""
    if not isinstance(answer, dict):
        return INFO, None, None, "200 without a JSON object"
    if kind == "probe":
        node = answer.get("node_id")
        if answer.get("committed") == 1:
            return OK, node, None, ""
        failures = answer.get("failures") or {}
        if "ProposalTimeout" in failures:
            return INFO, None, None, f"probe not confirmed: {failures}"
        return FAIL, None, None, f"probe not committed: {failures}"
    parameters = answer.get("parameters") or {}
    node = parameters.get("node_id") or headers.get("X-Redge-Node")
    epoch_raw = parameters.get("epoch", headers.get("X-Redge-Epoch"))
    try:
        epoch = int(epoch_raw) if epoch_raw is not None else None
    except (TypeError, ValueError):
        epoch = None
    if "outputs" not in answer:
        return FAIL, node, epoch, "200 without outputs"
    return OK, node, epoch, ""
