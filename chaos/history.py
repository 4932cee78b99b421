"""The history: every client operation as a plain record, with an honest outcome.

As in Jepsen, an operation ends in one of three ways and the difference matters:

- `ok`: the cluster answered with a result (and says which node served it, in which epoch);
- `fail`: a definite error: the request was refused before it was sent, or the cluster
  answered 4xx/5xx and so certainly did not do it;
- `info`: unknown: a timeout, or the connection died after the request was sent. The request
  may have been served. An unknown outcome is never counted as a failure; the paper's "lost
  request" is exactly this.

Records carry wall-clock times in milliseconds (`start_ms`, `end_ms`), the same clock as the
cluster's event log on this machine, so a history can be read next to the events; the
latency comes from a monotonic clock. Records are frozen and the history is bounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK = "ok"
FAIL = "fail"
INFO = "info"
OUTCOMES = (OK, FAIL, INFO)
OPERATIONS_MAX = 200_000


@dataclass(frozen=True)
class Operation:
    index: int
    client: int
    kind: str  # "probe" or "infer"
    app: str  # the app called ("probe" for probe load)
    target: str  # the node the client sent the request to
    start_ms: float
    end_ms: float
    latency_ms: float
    outcome: str
    node: str | None = None  # the node that served it (from the answer), when known
    epoch: int | None = None  # the plan epoch it was served under, when known
    status: int | None = None  # the HTTP status, when there was an answer
    error: str = ""
    value: int | None = None  # what a write wrote (`write` load): its register's new value

    def __post_init__(self) -> None:
        assert self.outcome in OUTCOMES, self.outcome

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Operation:
        return cls(**data)


@dataclass
class History:
    operations: list[Operation] = field(default_factory=list)
    operations_max: int = OPERATIONS_MAX
    dropped: int = 0  # operations not recorded because the history was full

    def append(self, operation: Operation) -> bool:
        if len(self.operations) >= self.operations_max:
            self.dropped += 1
            return False
        self.operations.append(operation)
        return True

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    def __len__(self) -> int:
        return len(self.operations)

    def merge(self, other: History) -> None:
        """Take in another load's operations, in the order they started (bounded as always)."""
        merged = sorted([*self.operations, *other.operations], key=lambda o: (o.start_ms, o.kind, o.index))
        self.dropped += other.dropped + max(0, len(merged) - self.operations_max)
        self.operations = merged[: self.operations_max]

    def counts(self) -> dict[str, int]:
        counts = {outcome: 0 for outcome in OUTCOMES}
        for operation in self.operations:
            counts[operation.outcome] += 1
        return counts

    def write_jsonl(self, path: Path) -> None:
        with path.open("w") as stream:
            for operation in self.operations:
                stream.write(json.dumps(operation.to_dict()) + "\n")

    @classmethod
    def read_jsonl(cls, path: Path) -> History:
        return cls.of(Operation.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line)

    @classmethod
    def of(cls, operations: Iterable[Operation]) -> History:
        history = cls()
        for operation in sorted(operations, key=lambda o: (o.start_ms, o.index)):
            history.append(operation)
        return history
