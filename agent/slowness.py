"""The slowness judge: a peer that serves its apps too slowly for their SLOs says so about
itself (`Degraded` / `Restored`), from its own request latencies. Pure."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redge.agent.verdicts import (
    Degraded,
    DegradedReason,
    Restored,
    Verdict,
)

# ---------------------------------------------------------------------------
# slowness


@dataclass(frozen=True, slots=True)
class SlownessSettings:
    window_ms: float = 10_000.0
    # Degraded when the median latency / SLO over the window exceeds this...
    latency_factor: float = 2.0
    # ...and restored only once it is back under this (hysteresis against flapping).
    restore_factor: float = 1.5
    min_samples: int = 5
    # Timeouts in the window, while heartbeats still arrive, that make a node degraded.
    timeout_count_min: int = 3
    max_samples_per_node: int = 512
    max_nodes: int = 1024

    def __post_init__(self) -> None:
        if not self.window_ms > 0:
            raise ValueError("window_ms must be positive")
        if not self.latency_factor >= self.restore_factor > 0:
            raise ValueError("need latency_factor >= restore_factor > 0")
        if not 1 <= self.min_samples <= self.max_samples_per_node:
            raise ValueError("min_samples must be in [1, max_samples_per_node]")
        if not 1 <= self.timeout_count_min <= self.max_samples_per_node:
            raise ValueError("timeout_count_min must be in [1, max_samples_per_node]")


class SlownessJudge:
    """Tells "alive but too slow" apart from "down", from request outcomes.

    A node stays up but fails its apps when it is overloaded, thermally
    throttled or its accelerator is sick; heartbeats say nothing about that.
    The judge looks at inference latency relative to each request's SLO and at
    request timeouts, over a sliding window. A node without traffic keeps its
    last judgment: absence of requests is not evidence of health.
    """

    def __init__(self, settings: SlownessSettings | None = None) -> None:
        self.settings = settings or SlownessSettings()
        self._ratios: dict[str, deque[tuple[float, float]]] = {}
        self._timeouts: dict[str, deque[float]] = {}
        self._degraded: dict[str, DegradedReason] = {}
        self.dropped_nodes = 0

    def _admit(self, node_id: str) -> bool:
        if node_id in self._ratios:
            return True
        if len(self._ratios) >= self.settings.max_nodes:
            self.dropped_nodes += 1
            return False
        self._ratios[node_id] = deque(maxlen=self.settings.max_samples_per_node)
        self._timeouts[node_id] = deque(maxlen=self.settings.max_samples_per_node)
        return True

    def on_latency(self, node_id: str, latency_ms: float, slo_ms: float, now_ms: float) -> None:
        assert slo_ms > 0 and latency_ms >= 0
        if self._admit(node_id):
            self._ratios[node_id].append((now_ms, latency_ms / slo_ms))

    def on_timeout(self, node_id: str, now_ms: float) -> None:
        if self._admit(node_id):
            self._timeouts[node_id].append(now_ms)

    def forget(self, node_id: str) -> None:
        self._ratios.pop(node_id, None)
        self._timeouts.pop(node_id, None)
        self._degraded.pop(node_id, None)

    def degraded(self) -> dict[str, DegradedReason]:
        return dict(self._degraded)

    def judge(self, now_ms: float, is_down: Callable[[str], bool]) -> list[Verdict]:
        """Verdict changes at `now_ms`; `is_down(node)` says whether the heartbeat
        detector already suspects it (then it is down, not slow)."""
        settings = self.settings
        horizon_ms = now_ms - settings.window_ms
        verdicts: list[Verdict] = []
        for node_id, ratios in self._ratios.items():
            timeouts = self._timeouts[node_id]
            while ratios and ratios[0][0] < horizon_ms:
                ratios.popleft()
            while timeouts and timeouts[0] < horizon_ms:
                timeouts.popleft()
            median = _median([ratio for _, ratio in ratios]) if ratios else 0.0
            enough = len(ratios) >= settings.min_samples
            current = self._degraded.get(node_id)
            if is_down(node_id):
                continue
            if current is None:
                if len(timeouts) >= settings.timeout_count_min:
                    reason, measure = DegradedReason.TIMEOUTS, float(len(timeouts))
                elif enough and median > settings.latency_factor:
                    reason, measure = DegradedReason.SLOW, median
                else:
                    continue
                self._degraded[node_id] = reason
                verdicts.append(Degraded(node_id, reason, measure, now_ms))
            elif (
                len(timeouts) < settings.timeout_count_min
                and enough
                and median <= settings.restore_factor
            ):
                del self._degraded[node_id]
                verdicts.append(Restored(node_id, now_ms))
        return verdicts


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2.0
