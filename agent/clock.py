"""Clocks for the failure detector: the real monotonic one and a public fake.

The detector core never reads time; its callers pass `now_ms`. The heartbeat
shell and the simulations need *some* source for that value, and tests need
one they control. This module is that seam: `MonotonicClock` for peers,
`FakeClock` for tests and simulations (like trio.testing.MockClock, it is
public so other packages' tests can drive time the same way).

Times are float milliseconds on an arbitrary origin: only differences mean
anything, and two processes' clocks are never compared.

`wall_ms` is the one wall clock a peer reads, for the times it stamps on commands and logs
(never to time anything: see agent/sightings.py). `REDGE_FAULT_WALL_CLOCK_OFFSET_S` shifts
it, to try a peer whose clock is wrong (chaos and tests; docs/chaos.md).
"""

from __future__ import annotations

import os
import time
from typing import Protocol

WALL_CLOCK_OFFSET_ENV = "REDGE_FAULT_WALL_CLOCK_OFFSET_S"


def _wall_clock_offset_ms() -> float:
    raw = os.environ.get(WALL_CLOCK_OFFSET_ENV, "")
    try:
        return float(raw) * 1000 if raw else 0.0
    except ValueError:
        raise SystemExit(f"{WALL_CLOCK_OFFSET_ENV} must be a number of seconds, not {raw!r}") from None


_OFFSET_MS = _wall_clock_offset_ms()


def wall_ms() -> int:
    """This machine's wall clock in integer milliseconds since the epoch."""
    return int(time.time() * 1000 + _OFFSET_MS)


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
