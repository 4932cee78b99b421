"""The peer's local artifact store: `<root>/<name>/<version>/`, held under a byte budget.

A cold backup is only as good as the bytes on disk, so the store never exposes a
half-written artifact: new artifacts are written into `<root>/.staging/`, every file is
checked against the manifest's sha256, and only then is the directory renamed into
place (one atomic rename on one filesystem). A staging directory survives a failed
transfer so that a retry resumes where it stopped.

Disk is finite on an edge node: before anything is written the store makes room by
evicting the least recently used artifacts, but never one that the current plan needs
(`pinned`), and it refuses with `StoreOverBudget` and the numbers rather than fill the
disk. Which artifacts to evict is a pure function, `plan_eviction`, tested on its own.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson
import structlog

from redge.runtime.errors import (
    ArtifactConflict,
    ArtifactCorrupt,
    ArtifactNotFound,
    ManifestInvalid,
    RangeNotSatisfiable,
    StoreOverBudget,
)
from redge.runtime.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    check_file_path,
    check_name,
    sha256_file,
)

log = structlog.get_logger(__name__)

STAGING_DIRNAME = ".staging"
# What a node derives from its artifacts to load them faster (optimised ONNX graphs), named
# by the sha256 of the file each was derived from; removed with that artifact.
DERIVED_DIRNAME = ".derived"
# Proof that a file was hashed: its sha256 with the (inode, size, mtime) it had then. A load
# re-hashes a file whose stamp is missing or whose inode, size or mtime changed since.
STAMPS_DIRNAME = ".verified"
# Artifacts that failed their check or their load, moved out of the way, and how often.
QUARANTINE_DIRNAME = ".quarantine"
FAILURES_FILENAME = "failures.json"
# After this many bad copies of one artifact, a node stops fetching it until an operator
# clears it (`redge store clear`).
QUARANTINE_FAILURES_MAX = 3
COPY_CHUNK_BYTES = 4 * 1024 * 1024
RANGE_CHUNK_BYTES = 1024 * 1024
ARTIFACTS_MAX = 10_000

ArtifactKey = tuple[str, str]
# A pin is either (name, version) or a bare name that pins every version of it.
Pin = tuple[str, str] | str


@dataclass(frozen=True)
class StoredArtifact:
    key: ArtifactKey
    size_bytes: int
    last_used_s: float


def is_pinned(key: ArtifactKey, pinned: Collection[Pin]) -> bool:
    return key in pinned or key[0] in pinned


def plan_eviction(
    artifacts: Collection[StoredArtifact],
    needed_bytes: int,
    usage_bytes: int,
    budget_bytes: int,
    pinned: Collection[Pin],
) -> tuple[ArtifactKey, ...]:
    """Which artifacts to evict so that `needed_bytes` more fit, least recently used first.

    Never names a pinned artifact; raises `StoreOverBudget` when even evicting every
    unpinned artifact would not make enough room.
    """
    assert needed_bytes >= 0 and usage_bytes >= 0 and budget_bytes >= 0
    excess_bytes = usage_bytes + needed_bytes - budget_bytes
    if excess_bytes <= 0:
        return ()
    candidates = sorted(
        (a for a in artifacts if not is_pinned(a.key, pinned)),
        key=lambda a: (a.last_used_s, -a.size_bytes, a.key),
    )
    evictable_bytes = sum(a.size_bytes for a in candidates)
    if evictable_bytes < excess_bytes:
        pinned_bytes = sum(a.size_bytes for a in artifacts if is_pinned(a.key, pinned))
        raise StoreOverBudget(needed_bytes, usage_bytes, budget_bytes, evictable_bytes, pinned_bytes)
    chosen: list[ArtifactKey] = []
    freed_bytes = 0
    for artifact in candidates:
        if freed_bytes >= excess_bytes:
            break
        chosen.append(artifact.key)
        freed_bytes += artifact.size_bytes
    return tuple(chosen)


@dataclass(frozen=True)
class FileRange:
    """A byte range `[start, end)` of one stored file, read in bounded chunks."""

    path: Path
    file: str
    start: int
    end: int
    size_bytes: int

    @property
    def length_bytes(self) -> int:
        return self.end - self.start

    def chunks(self, chunk_bytes: int = RANGE_CHUNK_BYTES) -> Iterator[bytes]:
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            remaining = self.length_bytes
            while remaining > 0:
                chunk = handle.read(min(chunk_bytes, remaining))
                if not chunk:
                    raise ArtifactCorrupt("?", "?", self.file, "file shrank while it was read")
                remaining -= len(chunk)
                yield chunk


class Staging:
    """An artifact being written: files go into `directory`, `commit()` verifies and publishes.

    Use as a context manager: leaving it without `commit()` keeps the partial files for a
    resumed transfer (`keep=True`, the default) or removes them.
    """

    def __init__(self, store: Store, manifest: Manifest, directory: Path, keep_on_error: bool) -> None:
        self.store = store
        self.manifest = manifest
        self.directory = directory
        self.keep_on_error = keep_on_error
        self.committed = False

    def file_path(self, file: str) -> Path:
        path = self.directory / check_file_path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, replace_existing: bool = False) -> Manifest:
        manifest = self.store._commit(self, replace_existing)
        self.committed = True
        return manifest

    def abort(self, keep: bool = False) -> None:
        self.store._release(self, keep)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if not self.committed:
            keep = self.keep_on_error and not isinstance(error, ArtifactCorrupt)
            self.abort(keep=keep)


class Store:
    """One peer's artifact directory. Thread-safe; every method is blocking file I/O."""

    def __init__(self, root: Path | str, budget_bytes: int) -> None:
        assert budget_bytes >= 0
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STAGING_DIRNAME).mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._reserved_bytes: dict[ArtifactKey, int] = {}

    # -- reading

    @property
    def derived_dir(self) -> Path:
        return self.root / DERIVED_DIRNAME

    @property
    def stamps_dir(self) -> Path:
        return self.root / STAMPS_DIRNAME

    @property
    def quarantine_dir(self) -> Path:
        return self.root / QUARANTINE_DIRNAME

    def artifact_dir(self, name: str, version: str) -> Path:
        return self.root / check_name("name", name) / check_name("version", version)

    def contains(self, name: str, version: str) -> bool:
        return (self.artifact_dir(name, version) / MANIFEST_FILENAME).is_file()

    def get(self, name: str, version: str) -> Manifest:
        directory = self.artifact_dir(name, version)
        try:
            return Manifest.read(directory)
        except FileNotFoundError:
            raise ArtifactNotFound(name, version, str(self.root)) from None

    def path(self, name: str, version: str) -> Path:
        """The artifact's directory; raises `ArtifactNotFound` when it is not stored."""
        if not self.contains(name, version):
            raise ArtifactNotFound(name, version, str(self.root))
        return self.artifact_dir(name, version)

    def list(self) -> list[Manifest]:
        manifests = []
        for key in self._keys():
            try:
                manifests.append(self.get(*key))
            except (ArtifactNotFound, ManifestInvalid) as error:
                log.warning("store_manifest_unreadable", name=key[0], version=key[1], error=str(error))
        return manifests

    def versions(self, name: str) -> list[Manifest]:
        return [m for m in self.list() if m.name == name]

    def _keys(self) -> list[ArtifactKey]:
        keys: list[ArtifactKey] = []
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for version_dir in sorted(name_dir.iterdir()):
                if (version_dir / MANIFEST_FILENAME).is_file():
                    keys.append((name_dir.name, version_dir.name))
                    assert len(keys) <= ARTIFACTS_MAX, "store holds more artifacts than ARTIFACTS_MAX"
        return keys

    def stored(self) -> list[StoredArtifact]:
        stored = []
        for manifest in self.list():
            directory = self.artifact_dir(manifest.name, manifest.version)
            stored.append(StoredArtifact(manifest.key, manifest.size_bytes, directory.stat().st_mtime))
        return stored

    def usage_bytes(self) -> int:
        """Committed artifacts, plus staging: its reservation or its size on disk, the larger."""
        with self._lock:
            committed = sum(m.size_bytes for m in self.list())
            staging = 0
            staging_root = self.root / STAGING_DIRNAME
            seen: set[ArtifactKey] = set()
            for directory in staging_root.iterdir():
                key = _staging_key(directory.name)
                on_disk = _directory_bytes(directory)
                staging += max(on_disk, self._reserved_bytes.get(key, 0)) if key else on_disk
                if key:
                    seen.add(key)
            staging += sum(size for key, size in self._reserved_bytes.items() if key not in seen)
            return committed + staging

    def mark_used(self, name: str, version: str) -> None:
        """Record a use (a load) so that eviction takes the least recently used first."""
        os.utime(self.path(name, version))

    def verify(self, name: str, version: str) -> Manifest:
        """Check every file's size and sha256; raise `ArtifactCorrupt` on the first mismatch."""
        manifest = self.get(name, version)
        verify_directory(self.artifact_dir(name, version), manifest)
        return manifest

    def open_range(self, name: str, version: str, file: str, start: int = 0, end: int | None = None) -> FileRange:
        """A readable byte range `[start, end)` of one file; `end=None` reads to the end."""
        manifest = self.get(name, version)
        try:
            manifest.file(file)
        except KeyError:
            raise ArtifactNotFound(name, version, str(self.root), file=file) from None
        path = self.artifact_dir(name, version) / file
        size_bytes = path.stat().st_size
        stop = size_bytes if end is None else end
        if not 0 <= start <= stop <= size_bytes:
            raise RangeNotSatisfiable(file, start, end, size_bytes)
        return FileRange(path=path, file=file, start=start, end=stop, size_bytes=size_bytes)

    # -- writing

    def make_room(self, needed_bytes: int, pinned: Collection[Pin] = ()) -> tuple[ArtifactKey, ...]:
        """Evict unpinned artifacts until `needed_bytes` more fit; return what was evicted."""
        with self._lock:
            evicted = plan_eviction(self.stored(), needed_bytes, self.usage_bytes(), self.budget_bytes, pinned)
            for key in evicted:
                self.remove(*key)
                log.info("artifact_evicted", name=key[0], version=key[1], needed_bytes=needed_bytes)
            return evicted

    def begin(self, manifest: Manifest, pinned: Collection[Pin] = (), keep_on_error: bool = True) -> Staging:
        """Reserve room for `manifest` and open (or resume) its staging directory."""
        with self._lock:
            key = manifest.key
            directory = self.root / STAGING_DIRNAME / f"{manifest.name}@{manifest.version}"
            if directory.exists():
                try:
                    previous = Manifest.read(directory)
                except (FileNotFoundError, ManifestInvalid):
                    previous = None
                if previous != manifest:
                    shutil.rmtree(directory)
            already_bytes = _directory_bytes(directory) if directory.exists() else 0
            self._reserved_bytes.pop(key, None)
            # The staged bytes are counted in usage already; only the rest must fit.
            self.make_room(max(0, manifest.size_bytes - already_bytes), pinned=set(pinned) | {key})
            self._reserved_bytes[key] = manifest.size_bytes
            directory.mkdir(parents=True, exist_ok=True)
            manifest.write(directory)
            return Staging(self, manifest, directory, keep_on_error)

    def _commit(self, staging: Staging, replace_existing: bool) -> Manifest:
        manifest = staging.manifest
        verify_directory(staging.directory, manifest)
        with self._lock:
            target = self.artifact_dir(manifest.name, manifest.version)
            if target.exists():
                existing = self.get(manifest.name, manifest.version) if self.contains(*manifest.key) else None
                if existing is not None and existing.files == manifest.files and not replace_existing:
                    self._release(staging, keep=False)
                    return existing
                if not replace_existing and existing is not None:
                    self._release(staging, keep=False)
                    raise ArtifactConflict(manifest.name, manifest.version)
                self.remove(manifest.name, manifest.version)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging.directory, target)
            self._reserved_bytes.pop(manifest.key, None)
            write_stamps(self.stamps_dir, target, manifest)  # hashed just above: the first load need not again
            log.info("artifact_stored", name=manifest.name, version=manifest.version, size_bytes=manifest.size_bytes)
            return manifest

    def _release(self, staging: Staging, keep: bool) -> None:
        with self._lock:
            self._reserved_bytes.pop(staging.manifest.key, None)
            if not keep and staging.directory.exists():
                shutil.rmtree(staging.directory, ignore_errors=True)

    def add_directory(
        self, source_dir: Path | str, pinned: Collection[Pin] = (), replace_existing: bool = False
    ) -> Manifest:
        """Copy the artifact in `source_dir` (its manifest and files) into the store, verified."""
        source = Path(source_dir)
        try:
            manifest = Manifest.read(source)
        except FileNotFoundError:
            raise ArtifactNotFound(source.parent.name, source.name, str(source)) from None
        with self.begin(manifest, pinned, keep_on_error=False) as staging:
            for entry in manifest.files:
                origin = source / entry.path
                if not origin.is_file():
                    raise ArtifactNotFound(manifest.name, manifest.version, str(source), file=entry.path)
                with open(origin, "rb") as reader, open(staging.file_path(entry.path), "wb") as writer:
                    shutil.copyfileobj(reader, writer, COPY_CHUNK_BYTES)
            return staging.commit(replace_existing)

    def quarantine(self, name: str, version: str, reason: str) -> int:
        """Move a stored artifact that failed its check or its load out of the store (kept
        under `.quarantine/` for an operator to look at) and count the failure; returns how
        many bad copies of it this node has had. Fetching it again is then allowed until
        `QUARANTINE_FAILURES_MAX`."""
        with self._lock:
            directory = self.artifact_dir(name, version)
            failures = self._failures()
            key = f"{name}/{version}"
            count = int(failures.get(key, {}).get("count", 0)) + 1
            failures[key] = {"count": count, "reason": reason[:300]}
            self.quarantine_dir.mkdir(exist_ok=True)
            if directory.exists():
                self._drop_derived(name, version)
                os.replace(directory, self.quarantine_dir / f"{name}@{version}.{count}")
                try:
                    directory.parent.rmdir()
                except OSError:
                    pass
            self._write_failures(failures)
            log.warning("artifact_quarantined", name=name, version=version, failures=count, reason=reason[:300])
            return count

    def excluded(self, name: str, version: str) -> str | None:
        """Why this node no longer fetches the artifact (too many bad copies), or None."""
        entry = self._failures().get(f"{name}/{version}")
        if entry is None or int(entry.get("count", 0)) < QUARANTINE_FAILURES_MAX:
            return None
        return f"{entry['count']} bad copies here (last: {entry.get('reason', '?')})"

    def quarantined(self) -> dict[str, Any]:
        """`NAME/VERSION` -> {count, reason} for each artifact that failed here."""
        return self._failures()

    def clear_quarantine(self, name: str | None = None, version: str | None = None) -> list[str]:
        """Forget the failures of one artifact (or of all) and delete their quarantined
        copies; returns the artifacts cleared."""
        with self._lock:
            failures = self._failures()
            cleared = [key for key in failures if name is None or key == f"{name}/{version}"]
            for key in cleared:
                del failures[key]
                artifact, artifact_version = key.split("/", 1)
                for copy in self.quarantine_dir.glob(f"{artifact}@{artifact_version}.*"):
                    shutil.rmtree(copy, ignore_errors=True)
            self._write_failures(failures)
            return cleared

    def _failures(self) -> dict[str, Any]:
        try:
            data = orjson.loads((self.quarantine_dir / FAILURES_FILENAME).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_failures(self, failures: dict[str, Any]) -> None:
        self.quarantine_dir.mkdir(exist_ok=True)
        temporary = self.quarantine_dir / f".{FAILURES_FILENAME}.{os.getpid()}"
        temporary.write_bytes(orjson.dumps(failures, option=orjson.OPT_SORT_KEYS))
        os.replace(temporary, self.quarantine_dir / FAILURES_FILENAME)

    def _drop_derived(self, name: str, version: str) -> None:
        """Delete what this node made from the artifact's files: their stamps and their
        derived graphs (named by the files' sha256)."""
        try:
            digests = [entry.sha256 for entry in self.get(name, version).files]
        except (ArtifactNotFound, ManifestInvalid):
            digests = []
        for digest in digests:
            (self.stamps_dir / digest).unlink(missing_ok=True)
            for derived in self.derived_dir.glob(f"{digest}-*"):
                if derived.is_dir():
                    shutil.rmtree(derived, ignore_errors=True)
                else:
                    derived.unlink(missing_ok=True)

    def remove(self, name: str, version: str) -> bool:
        """Remove one artifact; True if it was there. Idempotent."""
        with self._lock:
            directory = self.artifact_dir(name, version)
            if not directory.exists():
                return False
            self._drop_derived(name, version)
            # Rename first so a crash half-way never leaves a directory that looks complete.
            trash = self.root / STAGING_DIRNAME / f".removing-{name}@{version}-{os.getpid()}"
            os.replace(directory, trash)
            shutil.rmtree(trash, ignore_errors=True)
            try:
                directory.parent.rmdir()
            except OSError:
                pass
            return True


def verify_directory(directory: Path, manifest: Manifest, hashes: bool = True) -> None:
    """Raise `ArtifactCorrupt` unless every file has the manifest's size (and sha256)."""
    for entry in manifest.files:
        path = Path(directory) / entry.path
        try:
            size_bytes = path.stat().st_size
        except FileNotFoundError:
            raise ArtifactCorrupt(manifest.name, manifest.version, entry.path, "missing") from None
        if size_bytes != entry.size_bytes:
            raise ArtifactCorrupt(
                manifest.name, manifest.version, entry.path,
                f"size {size_bytes} bytes, manifest says {entry.size_bytes}",
            )
        if not hashes:
            continue
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ArtifactCorrupt(
                manifest.name, manifest.version, entry.path,
                f"sha256 {digest[:16]}..., manifest says {entry.sha256[:16]}...",
            )


def _file_identity(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_ino, status.st_size, status.st_mtime_ns]


def write_stamps(stamps_dir: Path, directory: Path, manifest: Manifest) -> None:
    """Record that `directory`'s files, as they are now, have the manifest's sha256."""
    stamps_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        stamp = stamps_dir / entry.sha256
        temporary = stamps_dir / f".{entry.sha256}.{os.getpid()}.{threading.get_ident()}"
        temporary.write_bytes(orjson.dumps({"path": str(Path(directory) / entry.path),
                                            "identity": _file_identity(Path(directory) / entry.path)}))
        os.replace(temporary, stamp)


def verify_stamped(directory: Path, manifest: Manifest, stamps_dir: Path) -> bool:
    """Check `directory` against the manifest: sha256 of every file whose stamp is missing
    or whose inode, size or mtime changed since it was hashed; the cheap stat otherwise.
    Raises `ArtifactCorrupt` on a mismatch; returns whether any file was hashed."""
    stale = []
    for entry in manifest.files:
        path = Path(directory) / entry.path
        try:
            stamp = orjson.loads((stamps_dir / entry.sha256).read_bytes())
            current = _file_identity(path)
        except (FileNotFoundError, orjson.JSONDecodeError):
            stale.append(entry)
            continue
        if not isinstance(stamp, dict) or stamp.get("path") != str(path) or stamp.get("identity") != current:
            stale.append(entry)
    if not stale:
        verify_directory(directory, manifest, hashes=False)  # sizes: a file cut short since
        return False
    verify_directory(directory, manifest, hashes=True)
    write_stamps(stamps_dir, directory, manifest)
    return True


def _staging_key(directory_name: str) -> ArtifactKey | None:
    if directory_name.startswith(".") or "@" not in directory_name:
        return None
    name, version = directory_name.split("@", 1)
    return (name, version)


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and path.name != MANIFEST_FILENAME)
