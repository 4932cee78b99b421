"""A peer's background duty: one task, woken by an event, stopped within a bound.

The leader's planning and the reconciler are both loops that sleep until something
committed may have changed their answer. They share how they start, are woken and stop.
"""

from __future__ import annotations

import asyncio

STOP_TIMEOUT_S = 5.0


class Duty:
    def __init__(self, name: str) -> None:
        self.name = name
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop within STOP_TIMEOUT_S: the loop also checks the flag, since a cancellation
        that lands as its wait completes can be swallowed by asyncio.wait_for."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            self._wake.set()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
