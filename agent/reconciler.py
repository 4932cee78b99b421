"""The reconciler: make this peer's models match its part of the committed plan.

Runs on every peer after each committed plan (and store change). It works in the order that
keeps recovery short: promotions first (a warm backup becomes primary with a flag, no load),
then loads in priority order (critical apps first), then cold backups' artifacts are
pre-positioned on disk, then whatever this node no longer needs is unloaded, and last the
copies that serve from a format that loads fast but runs slower (a cold backup's
safetensors) are switched to the format this device serves best (ONNX Runtime on a CPU),
fetched if need be: serve at once from what is on disk, run fast soon after. A newer epoch
interrupts the work between steps: acting on a stale plan only delays the current one.
Everything it does is reported into the event log (`load_started`, `load_done`,
`serving`, `load_failed`, `unloaded`), which is where failure timelines are read from.
Every action is idempotent, so a replay after a crash or a duplicate notification is
harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from redge.agent.clock import wall_ms
from redge.agent.duty import Duty
from redge.agent.replicas import LocalReplica, ReplicaManager
from redge.agent.routes import loading_on, servable
from redge.consensus import commands as c
from redge.consensus.errors import ConsensusError
from redge.consensus.state import ALIVE, SUSPECTED, ClusterState
from redge.runtime.errors import ArtifactCorrupt, LoadFailed, RuntimeFailure, StoreOverBudget
from redge.runtime.fetch import fetch_artifact
from redge.runtime.manifest import FORMAT_PREFERENCE, MANIFEST_FILENAME, Manifest
from redge.runtime.store import ARTIFACTS_MAX, QUARANTINE_FAILURES_MAX, Store

if TYPE_CHECKING:
    from redge.agent.ports import ClusterPort

log = structlog.get_logger("redge.reconciler")

PRIORITY_ORDER = {"critical": 0, "standard": 1, "best-effort": 2}
REPORT_TIMEOUT_S = 2.0
LOAD_ATTEMPTS_MAX = 5
RETRY_S = 1.0
# Cold-backup prefetches wait this long after another node's recovery was last seen, and for
# a recovery at most this long.
COLD_AFTER_RECOVERY_S = 2.0
RECOVERY_FIRST_MAX_S = 30.0
# How long a copy the plan no longer wants is kept while its successor elsewhere loads.
KEEP_FOR_SUCCESSOR_S = 30.0


def now_ms() -> int:
    return wall_ms()


def summarize(manifest: Manifest) -> c.ArtifactSummary:
    return c.ArtifactSummary(
        name=manifest.name,
        version=manifest.version,
        format=manifest.format,
        size_bytes=manifest.size_bytes,
        parameter_count=manifest.parameter_count,
        family=manifest.family,
        accuracy=manifest.accuracy,
        profiles=tuple(
            c.ArtifactProfile(p.device_kind, p.load_ms, p.latency_ms, p.memory_bytes) for p in manifest.profiles
        ),
    )


def format_order(device_kind: str, purpose: str) -> tuple[str, ...]:
    """The formats this device takes for `purpose`, preferred first."""
    return FORMAT_PREFERENCE.get((device_kind, purpose)) or FORMAT_PREFERENCE[("cpu", purpose)]


def choose_artifact(state: ClusterState, variant: str, device_kind: str, purpose: str) -> c.ArtifactSummary | None:
    """The artifact of `variant` to fetch for `purpose`, from what the cluster knows."""
    order = format_order(device_kind, purpose)
    known = [s for (name, _), s in state.catalog.items() if name == variant and s.format in order]
    if not known:
        return None
    newest_first = sorted(known, key=lambda s: s.version, reverse=True)
    return min(newest_first, key=lambda s: order.index(s.format))


def choose_version(state: ClusterState, variant: str, device_kind: str, purpose: str) -> str | None:
    """The version (format) of `variant` to fetch for `purpose`, from what the cluster knows."""
    chosen = choose_artifact(state, variant, device_kind, purpose)
    return chosen.version if chosen is not None else None


class Reconciler(Duty):
    def __init__(
        self,
        cluster: ClusterPort,
        replicas: ReplicaManager,
        store: Store,
        source: str | None,
        *,
        registered: Callable[[], Awaitable[None]],
        cold_serving_format: bool = True,
        read_token: str = "",
    ) -> None:
        super().__init__("reconciler")
        # The ports it works through (agent/ports.py), and what it needs of the config.
        self.cluster = cluster
        self._registered = registered
        self.cold_serving_format = cold_serving_format
        self.read_token = read_token
        self.replicas = replicas
        self.store = store
        self.source = source
        # (app, variant, epoch) -> (failed attempts, monotonic time of the next try)
        self._failed: dict[tuple[str, str, int], tuple[int, float]] = {}
        self._kept_since: dict[str, float] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()  # refetches after a quarantine
        self._fetching: dict[str, asyncio.Lock] = {}  # variant -> held while it is fetched
        self._last_store_report: tuple | None = None
        self._recovering_seen_s = -COLD_AFTER_RECOVERY_S  # monotonic: when a recovery elsewhere was last seen
        self._recovering_since_s: float | None = None  # and since when it has been going on
        self._prepared: set[tuple[str, str]] = set()  # (variant, version) prepared for a cold backup here

    def start(self) -> None:
        self.replicas.on_host_crash = self._on_host_crash
        super().start()

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await super().stop()

    def _on_host_crash(self, lost_apps: list[str]) -> None:
        """The model host died: what it held is gone; reload what the plan wants here."""
        log.warning("model_host_crashed", apps=lost_apps)
        for app in lost_apps:
            asyncio.get_running_loop().create_task(self._report("load_failed", app, "", 0, detail="model host crashed"))
        self._wake.set()

    def on_commit(self, command: c.Command | None, outcome) -> None:
        if not outcome.accepted:
            return
        if command is None or isinstance(command, (c.CommitPlan, c.RemoveApp, c.StoreReport, c.Join)):
            self._wake.set()
        elif isinstance(command, c.Report) and command.kind in ("serving", "load_done") and command.node_id != self.cluster.node_id:
            self._wake.set()  # a new primary is up: an old copy kept for it can go now

    async def _run(self) -> None:
        await self._registered()
        loop = asyncio.get_running_loop()
        expected = await loop.run_in_executor(None, source_manifests, self.source) if self.source else []
        if self.source or await loop.run_in_executor(None, self.store.list):
            # This peer will host models: start the model host now rather than on the
            # first load, where its start-up (importing torch) would count as loading time.
            self.replicas.warm_up(expected)
        await self.report_store()
        while not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            if not self.cluster.following():
                continue  # the state this replica holds is not the cluster's: act on none of it
            try:
                await self.reconcile()
            except ConsensusError as error:
                log.info("reconcile_report_failed", error=str(error) or type(error).__name__)
                await asyncio.sleep(0.1)
                self._wake.set()
            except Exception:
                log.exception("reconcile_failed")
                await asyncio.sleep(1.0)
                self._wake.set()

    # ------------------------------------------------------------------ the work

    def _desired(self) -> tuple[int, dict[str, c.Replica], dict[str, str]]:
        me = self.cluster.node_id

        def read(state: ClusterState) -> tuple[int, dict[str, c.Replica], dict[str, str]]:
            mine = {}
            for app, replicas in state.plan.items():
                for replica in replicas:
                    if replica.node_id == me:
                        mine[app] = replica
            priorities = {name: app.priority for name, app in state.apps.items()}
            return state.epoch, mine, priorities
        return self.cluster.read(read)

    def _stale(self, epoch: int) -> bool:
        return self.cluster.read(lambda s: s.epoch) != epoch

    async def reconcile(self) -> None:
        epoch, desired, priorities = self._desired()
        ordered = sorted(desired.items(), key=lambda item: (PRIORITY_ORDER.get(priorities.get(item[0], ""), 9), item[0]))
        # 1. Roles of what is already loaded: flags, no loads. Demotions first, so that a
        #    node the plan no longer makes primary stops acting as one before anything else.
        for app in sorted(self.replicas.replicas):
            wanted = desired.get(app)
            local = self.replicas.replicas[app]
            if local.role == "primary" and (wanted is None or wanted.role != "primary" or wanted.variant != local.variant):
                await self.replicas.set_role(app, "warm")
        for app, replica in ordered:
            local = self.replicas.serving(app)
            if local is not None and local.variant == replica.variant and replica.role in ("primary", "warm"):
                if local.role == replica.role:
                    local.epoch = max(local.epoch, epoch)  # the new plan keeps it where it was
                    continue
                await self.replicas.set_role(app, replica.role, epoch)
                if replica.role == "primary":
                    await self._report("serving", app, replica.variant, epoch, detail="promoted")
        # 2. Loads, critical apps first.
        for app, replica in ordered:
            if self._stale(epoch):
                self._wake.set()
                return
            if replica.role not in ("primary", "warm"):
                continue
            local = self.replicas.serving(app)
            if local is not None and local.variant == replica.variant:
                continue
            if not self._may_try((app, replica.variant, epoch)):
                continue
            await self._load(app, replica, epoch)
        # 3. Cold backups: the artifact on disk, not in memory; recoveries elsewhere first.
        prefetch = self._cold_prefetch_allowed()
        if not prefetch:
            self._retry_later()
        for app, replica in ordered if prefetch else []:
            if self._stale(epoch):
                self._wake.set()
                return
            if replica.role != "cold":
                continue
            if self.replicas.serving(app) is not None and self._successor_serving(app):
                await self.replicas.unload(app)
                await self._report("unloaded", app, replica.variant, epoch, detail="now a cold backup")
            try:
                await self._ensure_stored(app, replica.variant, "cold_backup", epoch)
            except (RuntimeFailure, OSError) as error:
                # One artifact that cannot be fetched now must not stop the rest of the work.
                log.warning("prefetch_failed", app=app, variant=replica.variant, error=str(error))
                self._retry_later()
                continue
            if self.cold_serving_format:
                await self._prepare_cold(app, replica.variant, epoch)
        # 4. Whatever this node no longer runs, once its successor serves (a copy that is no
        #    longer planned still answers clients that reach it until then).
        for app in sorted(set(self.replicas.replicas) - set(desired)):
            if not self._successor_serving(app):
                self._retry_later()
                continue
            variant = self.replicas.replicas[app].variant
            await self.replicas.unload(app)
            await self._report("unloaded", app, variant, epoch)
        # 5. Copies serving from a slower-running format than the best one known: switched.
        for app, replica in ordered:
            if self._stale(epoch):
                self._wake.set()
                return
            await self._switch_format(app, replica, epoch)
        self._failed = {key: value for key, value in self._failed.items() if key[2] == epoch}
        await self.report_store()

    async def _switch_format(self, app: str, replica: c.Replica, epoch: int) -> None:
        """Load the best serving format of what `app` runs here beside it, then swap."""
        local = self.replicas.serving(app)
        if local is None or local.variant != replica.variant or replica.role not in ("primary", "warm"):
            return
        device_kind = self.replicas.device_kind
        chosen = self.cluster.read(lambda state: choose_artifact(state, replica.variant, device_kind, "serving"))
        order = format_order(device_kind, "serving")
        current = order.index(local.manifest.format) if local.manifest.format in order else len(order)
        if chosen is None or order.index(chosen.format) >= current:
            return  # serving from the best format known already
        best = chosen.version
        if not self._may_try((app, best, epoch)):
            return
        started = time.perf_counter()
        previous = local.manifest.format
        try:
            await self._ensure_stored(app, replica.variant, "serving", epoch, version=best)
            switched = await self.replicas.load(app, replica.variant, local.role, epoch=local.epoch, version=best)
        except (RuntimeFailure, OSError) as error:
            self._note_failure((app, best, epoch))
            # The copy already serving goes on serving: only the faster one is missing.
            log.warning("format_switch_failed", app=app, variant=replica.variant, version=best, error=str(error))
            return
        log.info("format_switched", app=app, variant=replica.variant, previous=previous,
                 format=switched.manifest.format)
        await self._report("load_done", app, replica.variant, epoch,
                           detail=f"switched from {previous}; {load_phases(switched)}",
                           duration_ms=(time.perf_counter() - started) * 1000)

    async def _prepare_cold(self, app: str, variant: str, epoch: int) -> None:
        """Beside a cold backup's own artifact, the format this device serves best, with its
        optimised form derived: the recovery then loads at about the read of its bytes and
        serves at full speed at once. Only what fits the store: without it, the recovery
        serves from the cold artifact and switches later (`_switch_format`)."""
        device_kind = self.replicas.device_kind
        best = self.cluster.read(lambda state: choose_version(state, variant, device_kind, "serving"))
        key = (app, f"cold:{best}", epoch)
        if best is None or not self._may_try(key):
            return
        loop = asyncio.get_running_loop()
        if (variant, best) in self._prepared and await loop.run_in_executor(None, self.store.contains, variant, best):
            return  # done on an earlier pass: nothing to fetch, nothing to derive
        try:
            await self._ensure_stored(app, variant, "serving", epoch, version=best)
            await self.replicas.prepare(variant)
            self._prepared.add((variant, best))
        except StoreOverBudget as error:
            self._note_failure(key, final=True)  # no room: not tried again this epoch
            log.info("cold_serving_format_skipped", app=app, variant=variant, version=best, error=str(error))
        except (RuntimeFailure, OSError) as error:
            self._note_failure(key)
            log.info("cold_serving_format_not_fetched", app=app, variant=variant, version=best, error=str(error))

    def _may_try(self, key: tuple[str, str, int]) -> bool:
        """Whether the work `key` names may be tried now: not failed too often this epoch,
        and its pause after the last failure over."""
        failure = self._failed.get(key)
        return failure is None or (failure[0] < LOAD_ATTEMPTS_MAX and time.monotonic() >= failure[1])

    def _note_failure(self, key: tuple[str, str, int], final: bool = False) -> int:
        """Count a failure of `key` (`final`: no more tries this epoch) and wake for the next
        try after a pause that doubles: a fetch source may be back soon. Returns the count."""
        attempts = LOAD_ATTEMPTS_MAX if final else self._failed.get(key, (0, 0.0))[0] + 1
        pause_s = RETRY_S * 2 ** (attempts - 1)
        self._failed[key] = (attempts, time.monotonic() + pause_s)
        if attempts < LOAD_ATTEMPTS_MAX:
            asyncio.get_running_loop().call_later(pause_s, self._wake.set)
        return attempts

    def _cold_prefetch_allowed(self) -> bool:
        """Not while another node is loading an app that nothing serves, nor in the 2 s after:
        fetching, hashing and deriving here take CPU and disk from that recovery and from its
        first answers (measured on 2 cores under the demo's load: mobilenet_v3_large's cold
        MTTR p50 222-240 ms with the prefetch beside it, 177 ms without). A recovery that
        never reports (a wedged node) holds prefetches back for 30 s at most."""
        now_s = time.monotonic()
        if not self._recovery_elsewhere():
            self._recovering_since_s = None
        else:
            if self._recovering_since_s is None:
                self._recovering_since_s = now_s
            if now_s - self._recovering_since_s < RECOVERY_FIRST_MAX_S:
                self._recovering_seen_s = now_s
        return now_s - self._recovering_seen_s >= COLD_AFTER_RECOVERY_S

    def _recovery_elsewhere(self) -> bool:
        """Whether another node is loading an app that no replica serves now."""
        me = self.cluster.node_id

        def check(state: ClusterState) -> bool:
            return any(not servable(state, app) and any(node != me for node in loading_on(state, app))
                       for app in state.apps)
        return self.cluster.read(check)

    def _successor_serving(self, app: str) -> bool:
        """Whether `app`'s planned primary elsewhere reports itself loaded (or there is none
        to wait for). Until then an old copy here is kept, bounded by KEEP_FOR_SUCCESSOR_S."""
        me = self.cluster.node_id

        def check(state: ClusterState) -> bool:
            primary = state.primary_of(app)
            if primary is None or primary.node_id == me or app not in state.apps:
                return True
            member = state.members.get(primary.node_id)
            if member is None or member.status not in (ALIVE, SUSPECTED):
                return True
            return state.replica_reports.get((app, primary.node_id)) in ("serving", "load_done")
        if self.cluster.read(check):
            self._kept_since.pop(app, None)
            return True
        since = self._kept_since.setdefault(app, time.monotonic())
        return time.monotonic() - since > KEEP_FOR_SUCCESSOR_S

    def _retry_later(self) -> None:
        """Wake again in RETRY_S (once, however often it is asked meanwhile)."""
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_S, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._wake.set()

    async def _load(self, app: str, replica: c.Replica, epoch: int) -> None:
        started = time.perf_counter()
        await self._report("load_started", app, replica.variant, epoch, detail=replica.role)
        try:
            await self._ensure_stored(app, replica.variant, "serving", epoch)
            local = await self.replicas.load(app, replica.variant, replica.role, epoch=epoch)
        except (RuntimeFailure, OSError) as error:
            await self._quarantine_if_bad(error)
            attempts = self._note_failure((app, replica.variant, epoch))
            log.warning("load_failed", app=app, variant=replica.variant, attempts=attempts, error=str(error))
            await self._report("load_failed", app, replica.variant, epoch, detail=str(error)[:300],
                               duration_ms=(time.perf_counter() - started) * 1000)
            return
        await self._report("load_done", app, replica.variant, epoch, detail=load_phases(local),
                           duration_ms=(time.perf_counter() - started) * 1000)
        if replica.role == "primary":
            await self._report("serving", app, replica.variant, epoch)

    async def _quarantine_if_bad(self, error: BaseException) -> None:
        """A stored artifact whose bytes do not match its manifest, or that its backend could
        not load, is moved out of the store: the retry fetches a good copy from a peer or the
        source, and after `QUARANTINE_FAILURES_MAX` bad copies this node stops trying it."""
        bad_bytes = isinstance(error, ArtifactCorrupt)
        bad_artifact = isinstance(error, LoadFailed) and error.phase in ("read", "deserialize", "warmup")
        if not (bad_bytes or bad_artifact) or not await asyncio.get_running_loop().run_in_executor(
                None, self.store.contains, error.name, error.version):
            return
        count = await asyncio.get_running_loop().run_in_executor(
            None, self.store.quarantine, error.name, error.version, str(error))
        log.warning("artifact_quarantined", name=error.name, version=error.version, failures=count,
                    fetch_again=count < QUARANTINE_FAILURES_MAX)
        await self.report_store()
        if count < QUARANTINE_FAILURES_MAX:
            # The leader places the replica elsewhere for a while (agent/leader.py): heal the
            # store now anyway, so that this node holds a good copy when it is chosen again.
            task = asyncio.get_running_loop().create_task(self._refetch(error.name, error.version))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _refetch(self, name: str, version: str) -> None:
        try:
            await self._ensure_stored(name, name, "serving", 0, version=version)
        except (RuntimeFailure, OSError) as error:
            log.warning("refetch_failed", name=name, version=version, error=str(error))

    async def _ensure_stored(self, app: str, variant: str, purpose: str, epoch: int, version: str | None = None) -> None:
        """Have an artifact of `variant` for `purpose` (or exactly `version`) in the store,
        fetching it from a peer that holds it or from the source. One fetch of a variant at a
        time (a refetch after a quarantine and a retried load share its staging files)."""
        async with self._fetching.setdefault(variant, asyncio.Lock()):
            await self._ensure_stored_now(app, variant, purpose, epoch, version)

    async def _ensure_stored_now(self, app: str, variant: str, purpose: str, epoch: int, version: str | None) -> None:
        loop = asyncio.get_running_loop()
        if version is not None:
            if await loop.run_in_executor(None, self.store.contains, variant, version):
                return
        elif await loop.run_in_executor(None, self.replicas.manifests_of, variant, purpose) is not None:
            return
        wanted = version
        device_kind = self.replicas.device_kind
        me = self.cluster.node_id

        def sources(state: ClusterState) -> tuple[str | None, list[str]]:
            version = wanted or choose_version(state, variant, device_kind, purpose)
            if version is None:
                return None, []
            holders = [
                state.members[node].http_address
                for node, held in sorted(state.stores.items())
                if node != me and (variant, version) in held and state.members.get(node)
                and state.members[node].status in (ALIVE, SUSPECTED)
            ]
            return version, holders

        version, holders = self.cluster.read(sources)
        if version is None:
            raise RuntimeFailure(f"no artifact of {variant} is known to the cluster")
        excluded = await loop.run_in_executor(None, self.store.excluded, variant, version)
        if excluded is not None:
            raise RuntimeFailure(f"{variant}/{version} is excluded on this node: {excluded}; "
                                 f"`redge store clear --data-dir DIR {variant}/{version}` lets it fetch again")
        # Peers get this cluster's read token (they may require it); the --source does not.
        token = self.read_token
        candidates = [(f"http://{address}", token) for address in holders]
        if self.source:
            candidates.append((self.source, ""))
        errors = []
        for source, token in candidates:
            try:
                log.info("fetch_started", app=app, variant=variant, version=version, source=source)
                await fetch_artifact(source, variant, version, self.store, pinned=self._pinned(), token=token)
                log.info("fetch_done", app=app, variant=variant, version=version, source=source)
                await self.report_store()
                return
            except StoreOverBudget:
                raise  # no source can make room here
            except (RuntimeFailure, OSError) as error:
                errors.append(f"{source}: {error}")
        raise RuntimeFailure(f"cannot fetch {variant}/{version}: " + "; ".join(errors) if errors else "no source")

    def _pinned(self) -> list[tuple[str, str]]:
        """Artifacts the plan needs on this node: never evicted to make room."""
        _, desired, _ = self._desired()
        wanted = {replica.variant for replica in desired.values()}
        return [manifest.key for manifest in self.store.list() if manifest.name in wanted]  # one listing

    async def _report(self, kind: str, app: str, variant: str, epoch: int, detail: str = "", duration_ms: float = 0.0) -> None:
        command = c.Report(
            node_id=self.cluster.node_id, kind=kind, at_ms=now_ms(), app=app, variant=variant, epoch=epoch,
            detail=detail, duration_ms=round(duration_ms, 3),
        )
        try:
            await self.cluster.propose(command, timeout_s=REPORT_TIMEOUT_S)
        except ConsensusError as error:
            # A report is a record, not an action: losing one must not stop the work.
            log.info("report_not_committed", kind=kind, app=app, error=str(error) or type(error).__name__)

    async def report_store(self) -> None:
        loop = asyncio.get_running_loop()

        def collect() -> tuple[tuple[c.ArtifactSummary, ...], int, tuple[c.ArtifactSummary, ...]]:
            manifests = self.store.list()
            from_source = source_manifests(self.source) if self.source else []
            return (
                tuple(summarize(m) for m in manifests),
                self.store.usage_bytes(),
                tuple(summarize(m) for m in from_source),
            )

        artifacts, used_bytes, from_source = await loop.run_in_executor(None, collect)
        key = (artifacts, from_source)
        if key == self._last_store_report:
            return
        command = c.StoreReport(self.cluster.node_id, artifacts, used_bytes, now_ms(), from_source)
        try:
            outcome = await self.cluster.propose(command, timeout_s=REPORT_TIMEOUT_S)
            if outcome.accepted:
                self._last_store_report = key
        except ConsensusError as error:
            log.info("store_report_not_committed", error=str(error) or type(error).__name__)
            self._wake.set()


def load_phases(local: LocalReplica) -> str:
    """A load's phases as the `load_done` report's detail says them."""
    report = local.report
    return (f"{local.manifest.format}: verify {report.verify_ms:.1f} read {report.read_ms:.1f} "
            f"deserialize {report.deserialize_ms:.1f} to_device {report.to_device_ms:.1f} warmup {report.warmup_ms:.1f} ms"
            + (" (derived graph)" if report.derived else ""))


def source_manifests(source: str) -> list[Manifest]:
    """The artifacts in a source directory laid out as `<dir>/<name>/<version>/` (read only)."""
    root = Path(source)
    if source.startswith(("http://", "https://")) or not root.is_dir():
        return []
    manifests = []
    for manifest_path in sorted(root.glob("*/*/" + MANIFEST_FILENAME))[:ARTIFACTS_MAX]:
        try:
            manifests.append(Manifest.read(manifest_path.parent))
        except (RuntimeFailure, OSError, ValueError) as error:
            log.warning("source_manifest_unreadable", path=str(manifest_path), error=str(error))
    return manifests
