"""The model host process: load, infer, promote, unload, deadlines, bounds and crashes.

Starting a host costs seconds (a spawned interpreter imports torch), so one host serves
the whole module, on one event loop; the crash tests start their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from redge.chaos.cluster import wait_until_async
from redge.runtime import errors
from redge.runtime.host import HostOptions, ModelHost
from redge.runtime.manifest import Manifest
from redge.runtime.testing import EXIT_BELOW, EXIT_CODE, RAISE_ABOVE, SLOW_FROM

SMALL = {"input": np.ones((2, 16), np.float32)}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def host(loop: asyncio.AbstractEventLoop) -> Iterator[ModelHost]:
    host = ModelHost(HostOptions(threads=1, requests_pending_max=4, inline_bytes_max=1024))
    loop.run_until_complete(host.start())
    yield host
    host.close()


async def submitted(host: ModelHost, requests: list[asyncio.Future], timeout_s: float = 5.0) -> None:
    """Wait until these requests are on their way to the host (each took a pending slot)."""
    target = host.counters.requests_total + len(requests)
    # interval 0: the requests' tasks only need the loop to run up to their submission
    await wait_until_async(lambda: host.counters.requests_total >= target, timeout_s, interval_s=0,
                           what="the requests submitted")


def in_flight(host: ModelHost, key: str, ms: float) -> asyncio.Future:
    """A request to the tripwire model `key` that sleeps `ms` in the model."""
    return asyncio.ensure_future(host.infer(key, {"input": np.full((1, 16), SLOW_FROM + ms, np.float32)}, time.monotonic() + 10))


def artifact(source_and_manifests: tuple[Path, list[Manifest]], name: str, format_name: str) -> tuple[Path, Manifest]:
    source, manifests = source_and_manifests
    manifest = next(m for m in manifests if m.name == name and m.format == format_name)
    return source / manifest.name / manifest.version, manifest


def test_load_warm_refuses_traffic_until_promoted(loop, host: ModelHost, family_source) -> None:
    directory, manifest = artifact(family_source, "mlp-medium", "onnx")

    async def scenario() -> None:
        report = await host.load("medium", directory, manifest, role="warm")
        assert report.format == "onnx" and report.total_ms > 0
        assert host.role("medium") == "warm"
        with pytest.raises(errors.ModelNotServing, match="warm"):
            await host.infer("medium", SMALL)
        started = time.perf_counter()
        await host.promote("medium")
        promote_ms = (time.perf_counter() - started) * 1000
        assert promote_ms < 1.0
        output = await host.infer("medium", SMALL, deadline_s=time.monotonic() + 10)
        assert output["output"].shape == (2, 4)
        assert (await host.load("medium", directory, manifest)) == report  # idempotent, no reload
        assert host.role("medium") == "serving"
        await host.demote("medium")
        assert host.role("medium") == "warm"
        await host.unload("medium")
        await host.unload("medium")  # idempotent
        with pytest.raises(errors.ModelNotLoaded):
            await host.infer("medium", SMALL)

    loop.run_until_complete(scenario())


def test_large_tensors_travel_through_shared_memory(loop, host: ModelHost, family_source) -> None:
    directory, manifest = artifact(family_source, "mlp-small", "safetensors")
    batch = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)

    async def scenario() -> dict[str, np.ndarray]:
        await host.load("small", directory, manifest, role="serving")
        return await host.infer("small", {"input": batch}, deadline_s=time.monotonic() + 10)

    output = loop.run_until_complete(scenario())
    from redge.runtime.loader import load

    local, _ = load(directory, manifest)
    np.testing.assert_allclose(output["output"], local.infer({"input": batch})["output"], rtol=1e-5, atol=1e-6)


def test_typed_errors_cross_the_process_boundary(loop, host: ModelHost, tripwire_source, tmp_path: Path) -> None:
    directory, manifest = artifact(tripwire_source, "trip", "safetensors")

    async def scenario() -> None:
        await host.load("trip", directory, manifest, role="serving")
        with pytest.raises(errors.InferenceFailed, match="tripwire"):
            await host.infer("trip", {"input": np.full((1, 16), RAISE_ABOVE * 2, np.float32)})
        with pytest.raises(errors.InvalidInput, match="FP64"):
            await host.infer("trip", {"input": np.zeros((1, 16), np.float64)})
        with pytest.raises(errors.ArtifactNotFound):
            await host.load("ghost", tmp_path / "absent", manifest)
        assert (await host.infer("trip", SMALL))["output"].shape == (2, 4)  # still serving

    loop.run_until_complete(scenario())


def test_deadline_and_bounded_queue(loop, host: ModelHost, tripwire_source) -> None:
    directory, manifest = artifact(tripwire_source, "trip", "safetensors")
    slow = {"input": np.full((1, 16), SLOW_FROM + 300, np.float32)}  # a 300 ms inference

    async def scenario() -> None:
        await host.load("trip", directory, manifest, role="serving")
        with pytest.raises(errors.DeadlineExceeded):
            await host.infer("trip", slow, deadline_s=time.monotonic() + 0.05)
        with pytest.raises(errors.DeadlineExceeded):
            await host.infer("trip", SMALL, deadline_s=time.monotonic() - 1)
        requests = [asyncio.ensure_future(host.infer("trip", slow, time.monotonic() + 10)) for _ in range(4)]
        await submitted(host, requests)
        with pytest.raises(errors.HostBusy, match="limit 4"):
            await host.infer("trip", SMALL)
        await asyncio.gather(*requests)
        assert (await host.infer("trip", SMALL))["output"].shape == (2, 4)

    loop.run_until_complete(scenario())


def test_host_crash_fails_pending_calls_at_once(tripwire_source) -> None:
    directory, manifest = artifact(tripwire_source, "trip", "safetensors")
    crashes: list[errors.HostCrashed] = []

    async def scenario() -> None:
        host = ModelHost(HostOptions(threads=1), on_crash=crashes.append)
        await host.start()
        try:
            await host.load("trip", directory, manifest, role="serving")
            slow = asyncio.ensure_future(host.infer("trip", {"input": np.full((1, 16), SLOW_FROM + 200, np.float32)}, time.monotonic() + 30))
            started = time.monotonic()
            with pytest.raises(errors.HostCrashed) as caught:
                await host.infer("trip", {"input": np.full((1, 16), EXIT_BELOW * 2, np.float32)}, time.monotonic() + 30)
            assert caught.value.exit_code == EXIT_CODE
            with pytest.raises(errors.HostCrashed):
                await slow
            assert time.monotonic() - started < 5
            assert not host.alive and host.models() == {}
            with pytest.raises(errors.HostCrashed):
                await host.infer("trip", SMALL)
        finally:
            await host.aclose()

    asyncio.run(scenario())
    assert len(crashes) == 1


def test_killed_host_is_reported(tripwire_source) -> None:
    import os
    import signal

    directory, manifest = artifact(tripwire_source, "trip", "safetensors")

    async def scenario() -> None:
        crashed = asyncio.Event()
        host = ModelHost(HostOptions(threads=1, inline_bytes_max=1024), on_crash=lambda crash: crashed.set())
        await host.start()
        try:
            await host.load("trip", directory, manifest, role="serving")
            await host.infer("trip", {"input": np.zeros((64, 16), np.float32)}, time.monotonic() + 10)
            assert len(host._segments) == 1  # a pooled request segment, alive with the host
            pooled = host._segments._free[0].name
            os.kill(host.pid, signal.SIGKILL)
            await asyncio.wait_for(crashed.wait(), 10)  # the loop sees the pipe close
            with pytest.raises(errors.HostCrashed) as caught:
                await host.unload("nothing", timeout_s=10)
            assert caught.value.exit_code == -signal.SIGKILL
            assert len(host._segments) == 0 and not (Path("/dev/shm") / pooled).exists()
        finally:
            host.close()

    asyncio.run(scenario())


def test_promotion_is_a_flag_even_while_the_host_is_busy(loop, host: ModelHost, family_source, tripwire_source) -> None:
    trip_directory, trip_manifest = artifact(tripwire_source, "trip", "safetensors")
    backup_directory, backup_manifest = artifact(family_source, "mlp-small", "onnx")

    async def scenario() -> float:
        await host.load("trip", trip_directory, trip_manifest, role="serving")
        await host.load("backup", backup_directory, backup_manifest, role="warm")
        busy = in_flight(host, "trip", 300)
        await submitted(host, [busy])
        started = time.perf_counter()
        await host.promote("backup")
        promote_ms = (time.perf_counter() - started) * 1000
        assert not busy.done()
        await busy
        await host.unload("backup")
        return promote_ms

    assert loop.run_until_complete(scenario()) < 1.0


def test_request_segments_are_reused_but_never_while_the_host_may_read_one(loop, host: ModelHost, tripwire_source) -> None:
    """A segment goes back to the pool only once the host answered; a request that timed out
    keeps its segment (the host is still reading it), and later requests get fresh ones."""
    directory, manifest = artifact(tripwire_source, "trip", "safetensors")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((64, 16)).astype(np.float32) for _ in range(3)]  # 4 KB: over inline_bytes_max

    async def scenario() -> None:
        await host.load("trip", directory, manifest, role="serving")
        from redge.runtime.loader import load

        local, _ = load(directory, manifest)
        created = host._segments.created_total
        for batch in batches * 2:  # different contents through one reused segment
            output = await host.infer("trip", {"input": batch}, time.monotonic() + 10)
            np.testing.assert_allclose(output["output"], local.infer({"input": batch})["output"], rtol=1e-5, atol=1e-6)
        assert host._segments.created_total == created + (0 if created else 1)
        pooled = len(host._segments)
        slow = np.full((64, 16), SLOW_FROM + 300, np.float32)
        with pytest.raises(errors.DeadlineExceeded):
            await host.infer("trip", {"input": slow}, deadline_s=time.monotonic() + 0.05)
        assert len(host._segments) == pooled - 1  # dropped, not returned
        created = host._segments.created_total
        output = await host.infer("trip", {"input": batches[0]}, time.monotonic() + 10)
        np.testing.assert_allclose(output["output"], local.infer({"input": batches[0]})["output"], rtol=1e-5, atol=1e-6)
        assert host._segments.created_total == created + (1 if pooled == 1 else 0)

    loop.run_until_complete(scenario())


def test_infer_timed_says_where_the_time_went(loop, host: ModelHost, tripwire_source) -> None:
    directory, manifest = artifact(tripwire_source, "trip", "safetensors")

    async def scenario() -> None:
        await host.load("trip", directory, manifest, role="serving")
        outputs, timing = await host.infer_timed("trip", {"input": np.full((1, 16), SLOW_FROM + 40, np.float32)})
        assert outputs["output"].shape == (1, 4)
        assert timing.compute_ms >= 40  # the tripwire model sleeps 40 ms
        assert timing.total_ms >= timing.compute_ms + timing.queued_ms
        assert timing.transfer_ms == pytest.approx(timing.total_ms - timing.compute_ms - timing.queued_ms)

    loop.run_until_complete(scenario())


def test_close_after_the_loop_is_gone_still_frees_everything(tripwire_source) -> None:
    directory, manifest = artifact(tripwire_source, "trip", "safetensors")
    host = ModelHost(HostOptions(threads=1, inline_bytes_max=1024))

    async def scenario() -> str:
        await host.start()
        await host.load("trip", directory, manifest, role="serving")
        await host.infer("trip", {"input": np.zeros((64, 16), np.float32)}, time.monotonic() + 10)
        return host._segments._free[0].name

    pooled = asyncio.run(scenario())  # the loop is closed when this returns
    host.close()
    assert not host.alive and len(host._segments) == 0 and not (Path("/dev/shm") / pooled).exists()


def test_models_run_side_by_side_not_behind_each_other(loop, host: ModelHost, tripwire_source, family_source) -> None:
    """A slow request to one model does not hold up another model's requests (one worker
    per model, as Triton runs one instance of each)."""
    trip_directory, trip_manifest = artifact(tripwire_source, "trip", "safetensors")
    small_directory, small_manifest = artifact(family_source, "mlp-small", "onnx")

    async def scenario() -> None:
        await host.load("trip", trip_directory, trip_manifest, role="serving")
        await host.load("other", small_directory, small_manifest, role="serving")
        slow = in_flight(host, "trip", 1500)
        await submitted(host, [slow])
        await host.infer("other", SMALL, time.monotonic() + 10)
        assert not slow.done()  # the other model answered while this one still runs
        await slow
        await host.unload("other")
        with pytest.raises(errors.ModelNotLoaded):
            await host.infer("other", SMALL)
        assert (await host.infer("trip", SMALL))["output"].shape == (2, 4)

    loop.run_until_complete(scenario())
