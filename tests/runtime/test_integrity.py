"""Every artifact is checked against its sha256 before its first load on a node and after
any change to its files; a bad copy is quarantined, counted, and after three excluded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from redge.runtime import errors
from redge.runtime import store as store_module
from redge.runtime.loader import LoadOptions, load
from redge.runtime.store import QUARANTINE_FAILURES_MAX, Store, verify_stamped

INPUT = {"input": np.ones((2, 16), np.float32)}


@pytest.fixture
def stored(family_source, tmp_path: Path):
    source, manifests = family_source
    manifest = next(m for m in manifests if m.name == "mlp-medium" and m.format == "onnx")
    store = Store(tmp_path / "store", 1 << 30)
    store.add_directory(source / manifest.name / manifest.version)
    return store, manifest, store.path(manifest.name, manifest.version) / manifest.files[0].path


def test_a_stored_artifact_is_stamped_and_its_first_load_hashes_nothing(stored, monkeypatch):
    store, manifest, _ = stored
    hashed = []
    monkeypatch.setattr(store_module, "sha256_file", lambda path, *a, **k: hashed.append(path) or "x")
    assert verify_stamped(store.path(*manifest.key), manifest, store.stamps_dir) is False
    assert hashed == []  # the store hashed it when it stored it


def test_same_size_other_bytes_are_caught_and_the_load_refused(family_source, tmp_path: Path):
    source, manifests = family_source
    manifest = next(m for m in manifests if m.name == "mlp-medium" and m.format == "safetensors")
    store = Store(tmp_path / "store", 1 << 30)
    store.add_directory(source / manifest.name / manifest.version)
    path = store.path(*manifest.key) / manifest.files[0].path
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = np.random.default_rng(1).integers(0, 256, len(data) - header, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))  # the weights replaced, the header and the size kept; a new mtime
    # The size check alone loads it and serves garbage, as the default did before.
    model, _ = load(store.path(*manifest.key), manifest, options=LoadOptions(threads=1, verify="size"))
    assert model.infer(INPUT)["output"].shape == (2, 4)
    options = LoadOptions(threads=1, verify="stamped", stamps_dir=str(store.stamps_dir))
    with pytest.raises(errors.ArtifactCorrupt, match="sha256"):
        load(store.path(*manifest.key), manifest, options=options)


def test_a_touched_but_intact_file_is_hashed_again_and_loads(stored):
    store, manifest, path = stored
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert verify_stamped(store.path(*manifest.key), manifest, store.stamps_dir) is True  # re-hashed
    assert verify_stamped(store.path(*manifest.key), manifest, store.stamps_dir) is False  # stamped again
    options = LoadOptions(threads=1, verify="stamped", stamps_dir=str(store.stamps_dir))
    model, _ = load(store.path(*manifest.key), manifest, options=options)
    assert model.infer(INPUT)["output"].shape == (2, 4)


def test_bad_copies_are_quarantined_counted_excluded_and_cleared(stored, family_source):
    store, manifest, path = stored
    source, _ = family_source
    for count in range(1, QUARANTINE_FAILURES_MAX + 1):
        assert store.excluded(*manifest.key) is None
        assert store.quarantine(*manifest.key, "sha256 mismatch") == count
        assert not store.contains(*manifest.key)
        assert (store.quarantine_dir / f"{manifest.name}@{manifest.version}.{count}").is_dir()  # kept to look at
        assert not (store.stamps_dir / manifest.files[0].sha256).exists()
        store.add_directory(source / manifest.name / manifest.version)  # fetched again
    assert "3 bad copies" in store.excluded(*manifest.key)
    assert store.quarantined()[f"{manifest.name}/{manifest.version}"]["count"] == QUARANTINE_FAILURES_MAX
    assert store.clear_quarantine(*manifest.key) == [f"{manifest.name}/{manifest.version}"]
    assert store.excluded(*manifest.key) is None and not list(store.quarantine_dir.glob("mlp-medium@*"))
    assert [m.key for m in store.list()] == [manifest.key]  # neither directory is an artifact
