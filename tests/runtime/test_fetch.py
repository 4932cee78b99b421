"""Fetch against a tiny artifact server on 127.0.0.1 that implements the documented URL scheme."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from redge.runtime import errors
from redge.runtime.fetch import FetchProgress, fetch_artifact
from redge.runtime.manifest import Manifest
from redge.runtime.store import STAGING_DIRNAME, Store


class ArtifactServer:
    """Serves a Store; `cut_after_bytes` makes each file's first N responses stop early."""

    def __init__(self, store: Store, cut_after_bytes: int | None = None, cuts_per_file: int = 1,
                 ignore_range: bool = False, corrupt: bool = False) -> None:
        self.store = store
        self.cut_after_bytes = cut_after_bytes
        self.cuts_left: dict[str, int] = {}
        self.cuts_per_file = cuts_per_file
        self.ignore_range = ignore_range
        self.corrupt = corrupt
        self.ranges_seen: list[str] = []
        self.runner: web.AppRunner | None = None

    async def artifact(self, request: web.Request) -> web.Response:
        try:
            manifest = self.store.get(request.match_info["name"], request.match_info["version"])
        except errors.ArtifactNotFound:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(body=manifest.to_json(), content_type="application/json")

    async def file(self, request: web.Request) -> web.StreamResponse:
        name, version, file = (request.match_info[k] for k in ("name", "version", "file"))
        header = request.headers.get("Range")
        start = 0
        if header and not self.ignore_range:
            self.ranges_seen.append(header)
            start = int(header.removeprefix("bytes=").split("-")[0])
        file_range = self.store.open_range(name, version, file, start)
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = file_range.length_bytes
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{file_range.end - 1}/{file_range.size_bytes}"
        await response.prepare(request)
        cuts = self.cuts_left.setdefault(file, self.cuts_per_file)
        sent = 0
        for chunk in file_range.chunks(chunk_bytes=4096):
            if self.corrupt:
                chunk = bytes(b ^ 0x01 for b in chunk)
            if self.cut_after_bytes is not None and cuts > 0 and sent + len(chunk) > self.cut_after_bytes:
                self.cuts_left[file] = cuts - 1
                await response.write(chunk[: max(0, self.cut_after_bytes - sent)])
                request.transport.close()  # the link drops mid-transfer
                return response
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
        return response

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_get("/models/{name}/{version}/artifact", self.artifact)
        app.router.add_get("/models/{name}/{version}/files/{file:.+}", self.file)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
def served(tmp_path: Path, family_source) -> tuple[Store, Manifest]:
    source, manifests = family_source
    origin = Store(tmp_path / "origin", budget_bytes=10**9)
    manifest = next(m for m in manifests if m.name == "mlp-medium" and m.format == "onnx")
    origin.add_directory(source / manifest.name / manifest.version)
    return origin, manifest


def test_fetch_over_http_verifies_and_reports_progress(tmp_path: Path, served) -> None:
    origin, manifest = served
    local = Store(tmp_path / "local", budget_bytes=10**9)
    seen: list[FetchProgress] = []

    async def scenario() -> Manifest:
        async with ArtifactServer(origin) as base:
            return await fetch_artifact(base, manifest.name, manifest.version, local, progress=seen.append)

    fetched = asyncio.run(scenario())
    assert fetched == manifest
    assert local.verify(*manifest.key) == manifest
    assert seen[-1].bytes_done == seen[-1].bytes_total == manifest.size_bytes
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)


def test_fetch_resumes_with_range_after_the_link_drops(tmp_path: Path, served) -> None:
    origin, manifest = served
    local = Store(tmp_path / "local", budget_bytes=10**9)
    quarter = manifest.size_bytes // 4
    server = ArtifactServer(origin, cut_after_bytes=quarter, cuts_per_file=2)

    async def scenario() -> Manifest:
        async with server as base:
            return await fetch_artifact(base, manifest.name, manifest.version, local)

    assert asyncio.run(scenario()) == manifest
    assert local.verify(*manifest.key) == manifest
    assert server.ranges_seen[:2] == [f"bytes={quarter}-", f"bytes={2 * quarter}-"]


def test_partial_files_survive_a_failed_fetch_for_the_next_call(tmp_path: Path, served) -> None:
    origin, manifest = served
    local = Store(tmp_path / "local", budget_bytes=10**9)

    async def scenario(server: ArtifactServer, attempts_max: int) -> Manifest:
        async with server as base:
            return await fetch_artifact(base, manifest.name, manifest.version, local, attempts_max=attempts_max)

    third = manifest.size_bytes // 3
    with pytest.raises(errors.FetchFailed, match="gave up after 1 attempts"):
        asyncio.run(scenario(ArtifactServer(origin, cut_after_bytes=third), attempts_max=1))
    staged = local.root / STAGING_DIRNAME / f"{manifest.name}@{manifest.version}" / manifest.files[0].path
    assert staged.stat().st_size == third
    assert local.usage_bytes() == third  # partial bytes on disk still count against the budget
    second = ArtifactServer(origin)
    assert asyncio.run(scenario(second, attempts_max=1)) == manifest
    assert second.ranges_seen == [f"bytes={third}-"]


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, served) -> None:
    origin, manifest = served
    local = Store(tmp_path / "local", budget_bytes=10**9)
    server = ArtifactServer(origin, cut_after_bytes=manifest.size_bytes // 2, ignore_range=True)

    async def scenario() -> Manifest:
        async with server as base:
            return await fetch_artifact(base, manifest.name, manifest.version, local)

    assert asyncio.run(scenario()) == manifest


def test_corrupted_transfer_is_refused_and_not_stored(tmp_path: Path, served) -> None:
    origin, manifest = served
    local = Store(tmp_path / "local", budget_bytes=10**9)

    async def scenario() -> Manifest:
        async with ArtifactServer(origin, corrupt=True) as base:
            return await fetch_artifact(base, manifest.name, manifest.version, local)

    with pytest.raises(errors.ArtifactCorrupt, match="sha256"):
        asyncio.run(scenario())
    assert not local.contains(*manifest.key)
    assert list((local.root / STAGING_DIRNAME).iterdir()) == []


def test_unknown_artifact_and_dead_peer(tmp_path: Path, served) -> None:
    origin, _ = served
    local = Store(tmp_path / "local", budget_bytes=10**9)

    async def missing() -> None:
        async with ArtifactServer(origin) as base:
            await fetch_artifact(base, "nope", "1", local)

    with pytest.raises(errors.ArtifactNotFound, match="nope/1"):
        asyncio.run(missing())
    with pytest.raises(errors.FetchFailed, match="gave up after 2 attempts"):
        asyncio.run(fetch_artifact("http://127.0.0.1:9", "nope", "1", local, attempts_max=2))


def test_fetch_from_a_source_directory(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    local = Store(tmp_path / "local", budget_bytes=10**9)
    manifest = manifests[0]
    assert asyncio.run(fetch_artifact(str(source), manifest.name, manifest.version, local)) == manifest
    assert asyncio.run(fetch_artifact(str(source), manifest.name, manifest.version, local)) == manifest
    with pytest.raises(errors.ArtifactNotFound):
        asyncio.run(fetch_artifact(str(source), "nope", "1", local))


def test_fetch_over_budget_raises_before_downloading(tmp_path: Path, served) -> None:
    origin, manifest = served
    local = Store(tmp_path / "local", budget_bytes=manifest.size_bytes - 1)

    async def scenario() -> None:
        async with ArtifactServer(origin) as base:
            await fetch_artifact(base, manifest.name, manifest.version, local)

    with pytest.raises(errors.StoreOverBudget):
        asyncio.run(scenario())
    assert local.usage_bytes() == 0
