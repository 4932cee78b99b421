"""Data-plane workers' own connections to the model host (`HostClient`): inference straight
to the host process, a token that strangers lack, and a crash that every client sees."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from redge.chaos.cluster import wait_until_async
from redge.runtime import errors
from redge.runtime.host import HostClient, HostOptions, ModelHost
from redge.runtime.manifest import Manifest

SMALL = {"input": np.ones((2, 16), np.float32)}
LARGE = {"input": np.ones((512, 16), np.float32)}  # 32 KiB: through shared memory


def artifact(source_and_manifests: tuple[Path, list[Manifest]], name: str) -> tuple[Path, Manifest]:
    source, manifests = source_and_manifests
    manifest = next(m for m in manifests if m.name == name and m.format == "onnx")
    return source / manifest.name / manifest.version, manifest


def test_clients_infer_straight_to_the_host_and_strangers_are_turned_away(family_source) -> None:
    async def scenario() -> None:
        host = ModelHost(HostOptions(threads=1, inline_bytes_max=1024), data_plane=True)
        await host.start()
        try:
            directory, manifest = artifact(family_source, "mlp-medium")
            await host.load("medium", directory, manifest, role="serving")
            address, token = host.data_endpoint
            expected = await host.infer("medium", LARGE, time.monotonic() + 10)
            clients = [HostClient(address, token, HostOptions(inline_bytes_max=1024)) for _ in range(2)]
            for client in clients:
                await client.connect()
            answers = await asyncio.gather(*(c.infer("medium", LARGE, time.monotonic() + 10) for c in clients))
            for outputs, timing in answers:
                np.testing.assert_allclose(outputs["output"], expected["output"], rtol=1e-6)
                assert timing.compute_ms > 0 and timing.total_ms >= timing.compute_ms
            with pytest.raises(errors.ModelNotLoaded):
                await clients[0].infer("nothing-here", SMALL, time.monotonic() + 10)

            stranger = HostClient(address, b"x" * len(token))
            with pytest.raises(errors.HostCrashed):
                await stranger.connect(timeout_s=3.0)
            with pytest.raises(errors.HostCrashed):
                await stranger.infer("medium", SMALL, time.monotonic() + 10)
            # A raw connection that never shows a token is dropped after the handshake timeout.
            loop = asyncio.get_running_loop()
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.setblocking(False)
            await loop.sock_connect(raw, address)
            assert await asyncio.wait_for(loop.sock_recv(raw, 1), 10) == b""
            raw.close()
            # The clients still work, and the host still answers its own pipe.
            outputs, _ = await clients[1].infer("medium", SMALL, time.monotonic() + 10)
            assert outputs["output"].shape == (2, 4)
            for client in clients:
                client.close()
        finally:
            await host.aclose()

    asyncio.run(scenario())


def test_a_host_crash_fails_every_client_at_once(family_source) -> None:
    async def scenario() -> None:
        crashed = asyncio.Event()
        host = ModelHost(HostOptions(threads=1), on_crash=lambda _: crashed.set(), data_plane=True)
        await host.start()
        try:
            directory, manifest = artifact(family_source, "mlp-small")
            await host.load("small", directory, manifest, role="serving")
            client = HostClient(*host.data_endpoint)
            await client.connect()
            await client.infer("small", SMALL, time.monotonic() + 10)
            host._process.kill()
            await asyncio.wait_for(crashed.wait(), 10)
            assert host.data_endpoint is None
            await wait_until_async(lambda: not client.alive, 5, what="the client to see its connection close")
            with pytest.raises(errors.HostCrashed):
                await client.infer("small", SMALL, time.monotonic() + 10)
        finally:
            await host.aclose()

    asyncio.run(scenario())
