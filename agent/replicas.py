"""The peer's own replicas: which app runs here, in which role, on which model host.

The reconciler decides (from the committed plan) and this module carries it out through the
runtime: it starts the model host lazily (a peer that hosts nothing never imports torch),
loads artifacts from the local store, flips roles and unloads. Inference does not pass
through here: the data-plane workers run it on their own connections to the host, from
the routing table, which says what is loaded here (`local_models`) and where the host
takes them (`host_endpoint`). Every change calls `on_change`, so the table follows at once.
A warm backup is loaded but idle; promoting it is a flag, not a load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from redge.agent.routes import LocalModel
from redge.runtime.errors import HostClosed, HostCrashed, ModelNotLoaded, RuntimeFailure
from redge.runtime.host import HostOptions, ModelHost
from redge.runtime.loader import LoadReport, preparations_for
from redge.runtime.manifest import Manifest, choose_manifest
from redge.runtime.store import Store

log = structlog.get_logger("redge.replicas")

# A copy replaced by another of the same app (a faster format) stays loaded this long after
# the routing table names its successor: requests already on their way to it still finish.
RETIRE_AFTER_S = 2.0


@dataclass
class LocalReplica:
    app: str
    variant: str
    manifest: Manifest
    role: str  # primary | warm
    key: str
    loaded_at_s: float
    report: LoadReport
    # The last plan epoch that gave this replica its role: what an answer from it names
    # once a newer plan has moved the app away and the copy only bridges to its successor.
    epoch: int = 0


class ReplicaManager:
    def __init__(self, store: Store, device_kind: str = "cpu", host_options: HostOptions | None = None) -> None:
        self.store = store
        self.device_kind = device_kind
        self.host_options = host_options or HostOptions()
        self.host: ModelHost | None = None
        self._host_lock = asyncio.Lock()
        self.replicas: dict[str, LocalReplica] = {}
        self.on_host_crash: Callable[[list[str]], None] | None = None
        self.on_change: Callable[[], None] = lambda: None
        self._closed = False
        self._warm_up: asyncio.Task[None] | None = None
        # Artifacts this node may be asked to load besides its own store's (a source's).
        self.expected: list[Manifest] = []
        self._retiring: set[asyncio.Task[None]] = set()

    async def _ensure_host(self) -> ModelHost:
        async with self._host_lock:
            if self._closed:
                raise HostClosed()
            if self.host is None or not self.host.alive:
                if self.host is not None:
                    log.warning("model_host_restarting", reason=str(self.host.crashed))
                    self.replicas.clear()
                self.host = ModelHost(self._options_for_host(), on_crash=self._host_crashed, data_plane=True)
                await self.host.start()
                self.on_change()
            return self.host

    def _options_for_host(self) -> HostOptions:
        """The host keeps optimised graphs and the stamps of hashed files beside the store, and
        gets its backends ready for what this node stores or may be sent (`expected`, set by
        `warm_up`)."""
        return replace(
            self.host_options,
            derived_dir=self.host_options.derived_dir or str(self.store.derived_dir),
            stamps_dir=self.host_options.stamps_dir or str(self.store.stamps_dir),
            prepare=self.host_options.prepare or preparations_for([*self.store.list(), *self.expected]),
        )

    def _host_crashed(self, crash: HostCrashed) -> None:
        lost = sorted(self.replicas)
        self.replicas.clear()
        self.on_change()
        if self.on_host_crash is not None and not self._closed:
            self.on_host_crash(lost)

    def host_endpoint(self) -> tuple[str, bytes] | None:
        return self.host.data_endpoint if self.host is not None else None

    def local_models(self) -> list[LocalModel]:
        """What is loaded here, for the routing table."""
        return [
            LocalModel(
                app=r.app, key=r.key, variant=r.variant, version=r.manifest.version, format=r.manifest.format,
                role=r.role, epoch=r.epoch, inputs=tuple(spec.to_json() for spec in r.manifest.inputs),
                outputs=tuple(spec.to_json() for spec in r.manifest.outputs),
            )
            for r in sorted(self.replicas.values(), key=lambda r: r.app)
        ]

    def warm_up(self, expected: list[Manifest] | None = None) -> None:
        """Start the model host in the background (its start-up imports torch: seconds),
        ready for the backends of the store's artifacts and of `expected`."""
        self.expected = list(expected or [])
        async def start() -> None:
            try:
                await self._ensure_host()
            except RuntimeFailure as error:
                log.warning("model_host_start_failed", error=str(error))

        self._warm_up = asyncio.create_task(start(), name="model_host_start")

    def manifests_of(self, variant: str, purpose: str) -> Manifest | None:
        """The stored artifact of `variant` this device should use for `purpose`."""
        return choose_manifest(self.store.versions(variant), self.device_kind, purpose)

    async def load(self, app: str, variant: str, role: str, timeout_s: float | None = None,
                   epoch: int = 0, version: str | None = None) -> LocalReplica:
        """Load `variant` for `app` as `role` (primary or warm): the stored artifact this device
        serves best, or `version`. Replaces another copy of the app (another variant, or the
        same one in another format); the one replaced is unloaded `RETIRE_AFTER_S` later."""
        loop = asyncio.get_running_loop()
        if version is not None:
            manifest = await loop.run_in_executor(None, self.store.get, variant, version)
        else:
            manifest = await loop.run_in_executor(None, self.manifests_of, variant, "serving")
        if manifest is None:
            raise ModelNotLoaded(f"{app}: no stored artifact of {variant} for {self.device_kind}")
        key = f"{app}:{variant}:{manifest.version}"
        current = self.replicas.get(app)
        host = await self._ensure_host()
        if current is not None and current.key == key:
            await self.set_role(app, role, epoch)
            return current
        directory = self.store.path(manifest.name, manifest.version)
        report = await host.load(key, directory, manifest, role="serving" if role == "primary" else "warm", timeout_s=timeout_s)
        await loop.run_in_executor(None, self.store.mark_used, manifest.name, manifest.version)
        replica = LocalReplica(app, variant, manifest, role, key, time.monotonic(), report, epoch)
        self.replicas[app] = replica
        self.on_change()
        if current is not None and current.key != key:
            self._retire(current.key)
        return replica

    def _retire(self, key: str) -> None:
        """Unload `key` once requests routed to it before the table changed have finished."""
        async def retire() -> None:
            await asyncio.sleep(RETIRE_AFTER_S)
            if all(replica.key != key for replica in self.replicas.values()):
                await self._unload_key(key)

        task = asyncio.get_running_loop().create_task(retire(), name=f"retire {key}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def prepare(self, variant: str) -> bool:
        """Make a later load of `variant` fast without loading it now: the host derives the
        stored serving artifact's optimised form. True when there was one to derive."""
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(None, self.manifests_of, variant, "serving")
        if manifest is None or manifest.format != "onnx":
            return False
        host = await self._ensure_host()
        await host.derive(self.store.path(manifest.name, manifest.version), manifest)
        return True

    async def set_role(self, app: str, role: str, epoch: int | None = None) -> None:
        replica = self.replicas[app]
        if epoch is not None:
            replica.epoch = max(replica.epoch, epoch)
        assert self.host is not None
        if role == "primary":
            self.host.promote_now(replica.key)
        else:
            await self.host.demote(replica.key)
        replica.role = role
        self.on_change()

    async def unload(self, app: str) -> bool:
        replica = self.replicas.pop(app, None)
        if replica is None:
            return False
        self.on_change()  # the workers stop sending it requests before it goes
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
        for task in list(self._retiring):
            task.cancel()
        async with self._host_lock:
            pass  # a host start in progress finishes first, then is closed below
        if self.host is not None:
            await self.host.aclose()
            self.host = None
