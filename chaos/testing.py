"""Builders for synthetic histories, fault records and event logs, for tests of measure and checker.

Public like trio.testing: anyone writing a checker or a metric can build the exact run they
want to reason about in a few lines, without starting a cluster.
"""

from __future__ import annotations

from redge.chaos.faults import FaultRecord
from redge.chaos.history import Operation

_counter = iter(range(1, 10**9))


def op(start_ms: float, outcome: str = "ok", *, client: int = 0, node: str | None = "n2", target: str | None = None,
       latency_ms: float = 10.0, app: str = "det", epoch: int | None = None, kind: str = "infer") -> Operation:
    return Operation(
        index=next(_counter), client=client, kind=kind, app=app, target=target or node or "n1",
        start_ms=start_ms, end_ms=start_ms + latency_ms, latency_ms=latency_ms, outcome=outcome,
        node=node if outcome == "ok" else None, epoch=epoch, status=200 if outcome == "ok" else None,
    )


def fault(applied_at_ms: float, targets: tuple[str, ...] = ("n1",), kind: str = "crash", fault_id: int = 1,
          healed_at_ms: float | None = None) -> FaultRecord:
    return FaultRecord(fault_id, kind, f"{kind}({','.join(targets)})", targets, applied_at_ms, healed_at_ms)


def event(at_ms: float, kind: str, seq: int = 0, **fields) -> dict:
    return {"seq": seq or int(at_ms), "at_ms": at_ms, "kind": kind, **fields}
