"""Clocks for the failure detector: the real monotonic one and a public fake.

The detector core never reads time; its callers pass `now_ms`. The heartbeat
shell and the simulations need *some* source for that value, and tests need
one they control. This module is that seam: `MonotonicClock` for peers,
`FakeClock` for tests and simulations (like trio.testing.MockClock, it is
public so other packages' tests can drive time the same way).

Times are float milliseconds on an arbitrary origin: only differences mean
anything, and two processes' clocks are never compared.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> float:
        """Milliseconds since an arbitrary origin; never decreases."""
        ...


class MonotonicClock:
    """The process's monotonic clock (immune to wall-clock steps)."""

    def now_ms(self) -> float:
        return time.monotonic_ns() / 1_000_000.0


class FakeClock:
    """A clock that moves only when told to.

    Time never goes backwards: `advance` with a negative duration and
    `advance_to` an earlier instant are programmer errors.
    """

    def __init__(self, start_ms: float = 0.0) -> None:
        self._now_ms = float(start_ms)

    def now_ms(self) -> float:
        return self._now_ms

    def advance(self, duration_ms: float) -> float:
        assert duration_ms >= 0.0, f"time cannot go backwards: {duration_ms} ms"
        self._now_ms += duration_ms
        return self._now_ms

    def advance_to(self, instant_ms: float) -> float:
        assert instant_ms >= self._now_ms, (
            f"time cannot go backwards: {instant_ms} ms < {self._now_ms} ms"
        )
        self._now_ms = float(instant_ms)
        return self._now_ms

    def __repr__(self) -> str:
        return f"FakeClock(now_ms={self._now_ms})"
