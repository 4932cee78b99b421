"""The control process's side of the data plane: start the HTTP workers, feed them the
routing table, collect what they report, restart one that dies.

Why processes (not threads, not SO_REUSEPORT siblings): a request body is read, parsed and
copied in a worker, so a hostile or merely huge request costs that worker's CPU and memory
and never the control process's GIL, which heartbeats, probes and Raft need every
millisecond. Why one listening socket, bound here and inherited: the port is taken by the
peer once (a taken port fails `redge peer` at start, not a worker later), and while a
worker restarts the kernel queues new connections instead of refusing them. Workers run
`nice`r than the control process, so that on a saturated box the control process is
scheduled first; each worker is a session, and so a scheduling group, of its own
(runtime/priority.py), so that niceness means what it says under autogroup scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from redge.agent import channel
from redge.agent.dataplane import WorkerConfig

log = structlog.get_logger("redge.workers")

RESTART_S_FIRST = 0.05
RESTART_S_MAX = 5.0
# A worker that ran this long before it died had its crash forgiven: the next restart is quick.
STEADY_S = 30.0
STOP_TIMEOUT_S = 5.0
REAP_TIMEOUT_S = 2.0
FLUSH_TIMEOUT_S = 0.5
# What a worker does not need from the control process's environment.
PRIVATE_ENVIRONMENT = ("REDGE_SECRET", "REDGE_ADMIN_TOKEN", "REDGE_READ_TOKEN")


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    protocol: channel.MessageProtocol | None = None
    started_at_s: float = 0.0
    restart_delay_s: float = RESTART_S_FIRST
    restarts: int = 0


class DataPlaneWorkers:
    """`count` worker processes serving the HTTP socket `listener`."""

    def __init__(self, template: WorkerConfig, count: int, nice: int,
                 on_stats: Callable[[dict[str, Any]], None]) -> None:
        assert count >= 1
        self.template = template
        self.nice = nice
        self.on_stats = on_stats
        self._slots = [_Slot(index) for index in range(count)]
        self._listener: socket.socket | None = None
        self._table: bytes | None = None
        self._table_message: dict[str, Any] | None = None
        self._stopping = False
        self._restarts: set[asyncio.TimerHandle] = set()
        self.restarts_total = 0
        self._flushes: dict[int, tuple[asyncio.Future[None], set[int]]] = {}
        self._flush_ids = 0

    async def start(self, listener: socket.socket) -> None:
        self._listener = listener
        for slot in self._slots:
            await self._spawn(slot)

    def publish(self, table: dict[str, Any]) -> bool:
        """Send the routing table to every worker, if it changed; True when it did."""
        encoded = orjson.dumps(table)
        if encoded == self._table:
            return False
        self._table, self._table_message = encoded, table
        for slot in self._slots:
            if slot.protocol is not None and slot.protocol.open:
                slot.protocol.send(table)
        return True

    async def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Have every worker report what it served so far; returns once all have (or the
        timeout). A scrape of the metrics that follows counts every request answered."""
        self._flush_ids += 1
        flush_id = self._flush_ids
        waiting = {slot.index for slot in self._slots if slot.protocol is not None and slot.protocol.open}
        if not waiting:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes[flush_id] = (done, waiting)
        for slot in self._slots:
            if slot.index in waiting and slot.protocol is not None:
                slot.protocol.send({"type": "flush", "id": flush_id})
        try:
            await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            log.info("dataplane_flush_incomplete", waiting=sorted(self._flushes[flush_id][1]))
        finally:
            self._flushes.pop(flush_id, None)

    def pids(self) -> list[int]:
        return [slot.process.pid for slot in self._slots if slot.process is not None and slot.process.poll() is None]

    # ------------------------------------------------------------------ processes

    async def _spawn(self, slot: _Slot) -> None:
        assert self._listener is not None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = replace(self.template, index=slot.index, listen_fd=self._listener.fileno(),
                         channel_fd=child_end.fileno(), nice=self.nice)
        environment = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENVIRONMENT}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "redge.agent.dataplane"],
                stdin=subprocess.PIPE,
                pass_fds=(self._listener.fileno(), child_end.fileno()),
                env=environment,
            )
        finally:
            child_end.close()
        try:
            assert process.stdin is not None
            process.stdin.write(config.to_json())
            process.stdin.close()
        except OSError as error:  # it died at once; the channel's close restarts it
            log.warning("dataplane_worker_config_not_sent", index=slot.index, error=str(error))
        slot.process, slot.started_at_s = process, time.monotonic()
        slot.protocol = await channel.connect(
            parent_end, lambda message, slot=slot: self._on_message(slot, message), lambda slot=slot: self._on_lost(slot)
        )
        if self._table_message is not None:
            slot.protocol.send(self._table_message)
        log.info("dataplane_worker_spawned", index=slot.index, pid=process.pid, restarts=slot.restarts)

    def _on_message(self, slot: _Slot, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "stats":
            self.on_stats(message)
        elif kind == "flushed":
            entry = self._flushes.get(message.get("id"))
            if entry is not None:
                entry[1].discard(slot.index)
                if not entry[1] and not entry[0].done():
                    entry[0].set_result(None)
        elif kind == "hello":
            log.debug("dataplane_worker_ready", index=slot.index, pid=message.get("pid"))

    def _on_lost(self, slot: _Slot) -> None:
        """A worker's end of the pair closed: it exited (or is exiting). Reap it, restart it."""
        process, slot.protocol = slot.process, None
        for done, waiting in self._flushes.values():  # it reports nothing more
            waiting.discard(slot.index)
            if not waiting and not done.done():
                done.set_result(None)
        if process is not None:
            self._reap(process)
        if self._stopping:
            return
        exit_code = process.poll() if process is not None else None
        if time.monotonic() - slot.started_at_s > STEADY_S:
            slot.restart_delay_s = RESTART_S_FIRST
        delay_s = slot.restart_delay_s
        slot.restart_delay_s = min(slot.restart_delay_s * 2, RESTART_S_MAX)
        slot.restarts += 1
        self.restarts_total += 1
        log.warning("dataplane_worker_exited", index=slot.index, exit_code=exit_code, restart_in_s=delay_s)
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def restart() -> None:
            self._restarts.discard(handle)
            if not self._stopping:
                loop.create_task(self._spawn(slot), name=f"dataplane-worker-{slot.index}")

        handle = loop.call_later(delay_s, restart)
        self._restarts.add(handle)

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        """Collect an exited worker without blocking the loop: poll now, kill if it lingers."""
        if process.poll() is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + REAP_TIMEOUT_S

        def check() -> None:
            if process.poll() is not None:
                return
            if time.monotonic() >= deadline:
                process.kill()
            loop.call_later(0.05, check)

        loop.call_later(0.05, check)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every worker (they finish the requests in flight), then SIGKILL what remains."""
        self._stopping = True
        for handle in self._restarts:
            handle.cancel()
        processes = [slot.process for slot in self._slots if slot.process is not None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(process.poll() is None for process in processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
        for slot in self._slots:
            if slot.protocol is not None:
                slot.protocol.close()
