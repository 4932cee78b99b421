"""The peer's own replicas: which app runs here, in which role, and running its inference.

The reconciler decides (from the committed plan) and this module carries it out through the
runtime: it starts the model host lazily (a peer that hosts nothing never imports torch),
loads artifacts from the local store, flips roles, unloads, and runs inference with a
deadline. A warm backup is loaded but idle; promoting it is a flag, not a load. A request
that reaches a warm backup directly is served too: the redge client only sends it there
after the primary failed it, and serving at once is what makes warm backups worth their
memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from redge.runtime.errors import HostClosed, HostCrashed, ModelNotLoaded, RuntimeFailure
from redge.runtime.host import HostOptions, InferTiming, ModelHost
from redge.runtime.loader import LoadReport
from redge.runtime.manifest import Manifest, choose_manifest
from redge.runtime.store import Store

log = structlog.get_logger("redge.replicas")


@dataclass
class LocalReplica:
    app: str
    variant: str
    manifest: Manifest
    role: str  # primary | warm
    key: str
    loaded_at_s: float
    report: LoadReport


class ReplicaManager:
    def __init__(self, store: Store, device_kind: str = "cpu", host_options: HostOptions | None = None) -> None:
        self.store = store
        self.device_kind = device_kind
        self.host_options = host_options or HostOptions()
        self.host: ModelHost | None = None
        self._host_lock = asyncio.Lock()
        self.replicas: dict[str, LocalReplica] = {}
        self.on_host_crash: Callable[[list[str]], None] | None = None
        self._closed = False
        self._warm_up: asyncio.Task[None] | None = None

    async def _ensure_host(self) -> ModelHost:
        async with self._host_lock:
            if self._closed:
                raise HostClosed()
            if self.host is None or not self.host.alive:
                if self.host is not None:
                    log.warning("model_host_restarting", reason=str(self.host.crashed))
                    self.replicas.clear()
                self.host = ModelHost(self.host_options, on_crash=self._host_crashed)
                await self.host.start()
            return self.host

    def _host_crashed(self, crash: HostCrashed) -> None:
        lost = sorted(self.replicas)
        self.replicas.clear()
        if self.on_host_crash is not None and not self._closed:
            self.on_host_crash(lost)

    def warm_up(self) -> None:
        """Start the model host in the background (its start-up imports torch: seconds)."""
        async def start() -> None:
            try:
                await self._ensure_host()
            except RuntimeFailure as error:
                log.warning("model_host_start_failed", error=str(error))

        self._warm_up = asyncio.create_task(start(), name="model_host_start")

    def manifests_of(self, variant: str, purpose: str) -> Manifest | None:
        """The stored artifact of `variant` this device should use for `purpose`."""
        return choose_manifest(self.store.versions(variant), self.device_kind, purpose)

    async def load(self, app: str, variant: str, role: str, timeout_s: float | None = None) -> LocalReplica:
        """Load `variant` for `app` as `role` (primary or warm); replaces another variant."""
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(None, self.manifests_of, variant, "serving")
        if manifest is None:
            raise ModelNotLoaded(f"{app}: no stored artifact of {variant} for {self.device_kind}")
        key = f"{app}:{variant}:{manifest.version}"
        current = self.replicas.get(app)
        host = await self._ensure_host()
        if current is not None and current.key == key:
            await self.set_role(app, role)
            return current
        directory = self.store.path(manifest.name, manifest.version)
        report = await host.load(key, directory, manifest, role="serving" if role == "primary" else "warm", timeout_s=timeout_s)
        await loop.run_in_executor(None, self.store.mark_used, manifest.name, manifest.version)
        replica = LocalReplica(app, variant, manifest, role, key, time.monotonic(), report)
        self.replicas[app] = replica
        if current is not None and current.key != key:
            await self._unload_key(current.key)
        return replica

    async def set_role(self, app: str, role: str) -> None:
        replica = self.replicas[app]
        assert self.host is not None
        if role == "primary":
            self.host.promote_now(replica.key)
        else:
            await self.host.demote(replica.key)
        replica.role = role

    async def unload(self, app: str) -> bool:
        replica = self.replicas.pop(app, None)
        if replica is None:
            return False
        await self._unload_key(replica.key)
        return True

    async def _unload_key(self, key: str) -> None:
        if self.host is not None and self.host.alive:
            try:
                await self.host.unload(key)
            except RuntimeFailure as error:
                log.warning("unload_failed", key=key, error=str(error))

    def serving(self, app: str) -> LocalReplica | None:
        return self.replicas.get(app)

    async def infer(
        self, app: str, inputs: Mapping[str, np.ndarray], deadline_s: float
    ) -> tuple[LocalReplica, dict[str, np.ndarray], InferTiming]:
        """Run `app` here. A warm backup asked directly is promoted locally first (see module doc)."""
        replica = self.replicas.get(app)
        if replica is None or self.host is None:
            raise ModelNotLoaded(f"{app} is not loaded on this node")
        if self.host.role(replica.key) != "serving":
            self.host.promote_now(replica.key)
            log.info("warm_backup_serving_directly", app=app, variant=replica.variant)
        outputs, timing = await self.host.infer_timed(replica.key, inputs, deadline_s)
        return replica, outputs, timing

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "app": r.app,
                "variant": r.variant,
                "version": r.manifest.version,
                "format": r.manifest.format,
                "role": r.role,
                "load_ms": round(r.report.total_ms, 2),
            }
            for r in sorted(self.replicas.values(), key=lambda r: r.app)
        ]

    async def close(self) -> None:
        self._closed = True
        if self._warm_up is not None:
            self._warm_up.cancel()
        async with self._host_lock:
            pass  # a host start in progress finishes first, then is closed below
        if self.host is not None:
            await self.host.aclose()
            self.host = None
