"""Fetching an artifact from another peer (or a source directory) into the local store.

Recovery from a remote-only backup pays transfer plus loading, and on an IoBT link a
transfer is often cut half-way. So a fetch is resumable at two levels: within one call
a broken download is retried (bounded attempts, bounded backoff) from the byte it
stopped at, using HTTP Range; and the partial files stay in the store's staging
directory, so a later call for the same artifact continues where this one stopped.
Nothing is published until every file's sha256 matches the manifest.

The URL scheme, served by the agent's HTTP endpoint:

    GET {base}/models/{name}/{version}/artifact          -> the manifest JSON
    GET {base}/models/{name}/{version}/files/{file}      -> one file, Range supported

A source that is not an http(s) URL is a directory laid out as `<dir>/<name>/<version>/`
(what `redge zoo export` writes); it is copied with the same verification.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import structlog

from redge.runtime.errors import ArtifactCorrupt, ArtifactNotFound, FetchFailed, ManifestInvalid
from redge.runtime.manifest import MANIFEST_BYTES_MAX, Manifest
from redge.runtime.store import Pin, Store

log = structlog.get_logger(__name__)

CHUNK_BYTES = 1024 * 1024
ATTEMPTS_MAX = 5
BACKOFF_S_FIRST = 0.05
BACKOFF_S_MAX = 2.0
TIMEOUT_S_DEFAULT = 600.0
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FetchProgress:
    name: str
    version: str
    file: str
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[FetchProgress], None]


def artifact_url(base: str, name: str, version: str) -> str:
    return f"{base.rstrip('/')}/models/{quote(name)}/{quote(version)}/artifact"


def file_url(base: str, name: str, version: str, file: str) -> str:
    return f"{base.rstrip('/')}/models/{quote(name)}/{quote(version)}/files/{quote(file, safe='/')}"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


async def fetch_artifact(
    source: str,
    name: str,
    version: str,
    store: Store,
    *,
    pinned: Collection[Pin] = (),
    progress: ProgressCallback | None = None,
    session: aiohttp.ClientSession | None = None,
    timeout_s: float = TIMEOUT_S_DEFAULT,
    attempts_max: int = ATTEMPTS_MAX,
    chunk_bytes: int = CHUNK_BYTES,
    token: str = "",
) -> Manifest:
    """Bring `name/version` into `store` from a peer URL or a source directory. `token`: the
    read token a peer that requires one for artifacts expects (sent on a session made here).

    Idempotent: an artifact already stored is returned as is. Raises `ArtifactNotFound`,
    `ArtifactCorrupt` (hash mismatch after transfer), `StoreOverBudget` or `FetchFailed`.
    """
    if store.contains(name, version):
        return store.get(name, version)
    if not is_url(source):
        directory = Path(source) / name / version
        if not directory.is_dir():
            raise ArtifactNotFound(name, version, str(source))
        manifest = await asyncio.to_thread(store.add_directory, directory, pinned)
        if progress is not None:
            progress(FetchProgress(name, version, "", manifest.size_bytes, manifest.size_bytes))
        return manifest
    owned = session is None
    assert owned or not token, "a given session carries its own headers"
    client = session or aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S),
        headers={"Authorization": f"Bearer {token}"} if token else None,
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch_http(client, source, name, version, store, pinned, progress, attempts_max, chunk_bytes)
    except TimeoutError:
        raise FetchFailed(name, version, source, f"not done within {timeout_s} s; partial files kept for resume") from None
    finally:
        if owned:
            await client.close()


async def fetch_manifest(session: aiohttp.ClientSession, base: str, name: str, version: str) -> Manifest:
    url = artifact_url(base, name, version)
    try:
        async with session.get(url) as response:
            if response.status == 404:
                raise ArtifactNotFound(name, version, base)
            if response.status != 200:
                raise FetchFailed(name, version, base, f"GET {url} answered {response.status}")
            data = await response.content.read(MANIFEST_BYTES_MAX + 1)
    except aiohttp.ClientError as error:
        raise FetchFailed(name, version, base, f"GET {url}: {error}") from None
    try:
        manifest = Manifest.from_json(data)
    except ManifestInvalid as error:
        raise FetchFailed(name, version, base, f"the peer sent an invalid manifest: {error}") from None
    if manifest.key != (name, version):
        raise FetchFailed(name, version, base, f"the peer sent the manifest of {manifest.name}/{manifest.version}")
    return manifest


async def _fetch_http(
    session: aiohttp.ClientSession,
    base: str,
    name: str,
    version: str,
    store: Store,
    pinned: Collection[Pin],
    progress: ProgressCallback | None,
    attempts_max: int,
    chunk_bytes: int,
) -> Manifest:
    manifest = await _with_retries(lambda: fetch_manifest(session, base, name, version), attempts_max, name, version, base)
    staging = await asyncio.to_thread(store.begin, manifest, pinned)
    with staging:
        bytes_before = 0
        for entry in manifest.files:
            path = staging.file_path(entry.path)

            async def download(entry_path: str = entry.path, size_bytes: int = entry.size_bytes, target: Path = path, offset: int = bytes_before) -> None:
                await _download_file(
                    session, base, manifest, entry_path, size_bytes, target, progress, offset, chunk_bytes
                )

            await _with_retries(download, attempts_max, name, version, base)
            bytes_before += entry.size_bytes
        try:
            stored = await asyncio.to_thread(staging.commit)
        except ArtifactCorrupt:
            log.warning("artifact_fetch_corrupt", name=name, version=version, source=base)
            raise
    log.info("artifact_fetched", name=name, version=version, source=base, size_bytes=manifest.size_bytes)
    return stored


async def _download_file(
    session: aiohttp.ClientSession,
    base: str,
    manifest: Manifest,
    file: str,
    size_bytes: int,
    path: Path,
    progress: ProgressCallback | None,
    bytes_before: int,
    chunk_bytes: int,
) -> None:
    have_bytes = path.stat().st_size if path.exists() else 0
    if have_bytes > size_bytes:
        path.unlink()
        have_bytes = 0
    if have_bytes == size_bytes:
        return
    url = file_url(base, manifest.name, manifest.version, file)
    headers = {"Range": f"bytes={have_bytes}-"} if have_bytes else {}
    async with session.get(url, headers=headers) as response:
        if response.status == 404:
            raise ArtifactNotFound(manifest.name, manifest.version, base, file=file)
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have_bytes}-"):
                raise FetchFailed(manifest.name, manifest.version, base, f"bad Content-Range {content_range!r} for {file}")
            mode = "ab"
        elif response.status == 200:
            have_bytes = 0  # the server ignored the Range: start over
            mode = "wb"
        else:
            raise FetchFailed(manifest.name, manifest.version, base, f"GET {url} answered {response.status}")
        # Chunks of at most 1 MiB into the page cache: microseconds, not worth a thread each.
        with open(path, mode) as handle:  # noqa: ASYNC230
            async for chunk in response.content.iter_chunked(chunk_bytes):
                if have_bytes + len(chunk) > size_bytes:
                    raise ArtifactCorrupt(manifest.name, manifest.version, file, f"the peer sent more than {size_bytes} bytes")
                handle.write(chunk)
                have_bytes += len(chunk)
                if progress is not None:
                    progress(FetchProgress(manifest.name, manifest.version, file, bytes_before + have_bytes, manifest.size_bytes))
    if have_bytes != size_bytes:
        raise aiohttp.ClientPayloadError(f"{file}: got {have_bytes} of {size_bytes} bytes")


async def _with_retries(operation: Callable[[], object], attempts_max: int, name: str, version: str, source: str) -> object:
    """Retry transport errors with bounded backoff; typed errors of the artifact pass through."""
    backoff_s = BACKOFF_S_FIRST
    last_error: Exception | None = None
    for attempt in range(1, attempts_max + 1):
        try:
            return await operation()  # type: ignore[misc]
        except (aiohttp.ClientError, ConnectionError, FetchFailed) as error:
            last_error = error
            log.info("artifact_fetch_retry", name=name, version=version, source=source, attempt=attempt, error=str(error))
            if attempt < attempts_max:
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)
    raise FetchFailed(name, version, source, f"gave up after {attempts_max} attempts: {last_error}")
