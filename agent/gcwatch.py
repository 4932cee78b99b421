"""How long this process's garbage collector stops it, measured on every collection.

A peer's control process must never stall: a stall of its heartbeat thread looks, to its
watchers, like a hang. CPython's cyclic collector runs on whatever thread allocates when a
generation fills, holding the GIL for as long as it traverses; a full collection over a big
heap can take tens of milliseconds. The peer freezes what it allocated at start (it lives
for the process's life and need not be traversed again) and watches every pause, so that a
long one is seen in the logs and in `redge_gc_pause_ms_max`, not guessed at.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import structlog

log = structlog.get_logger("redge.gc")

# Pauses past this are logged (a heartbeat interval is 20 ms on the enterprise profile).
PAUSE_LOGGED_MS = 10.0


class GcWatch:
    def __init__(self) -> None:
        self.pause_ms_max = 0.0
        self.pauses_long = 0
        self.collections = 0
        self._started: float | None = None

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        pause_ms = (time.perf_counter() - self._started) * 1000
        self._started = None
        self.collections += 1
        self.pause_ms_max = max(self.pause_ms_max, pause_ms)
        if pause_ms >= PAUSE_LOGGED_MS:
            self.pauses_long += 1
            log.warning("gc_pause", pause_ms=round(pause_ms, 1), generation=info.get("generation"),
                        collected=info.get("collected"))


def freeze_startup_objects() -> None:
    """Move everything allocated so far out of the collector's reach (it lives as long as
    the process), and collect young objects less often: each young collection is cheap, but
    each one is a pause. No collection first: a full one here paused a starting peer ~100 ms."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(10_000, middle, old)
