from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.runtime import errors
from redge.runtime.manifest import Manifest
from redge.runtime.store import STAGING_DIRNAME, Store, StoredArtifact, is_pinned, plan_eviction


def artifact_dirs(source: Path, manifests: list[Manifest], format_name: str) -> list[tuple[Path, Manifest]]:
    return [(source / m.name / m.version, m) for m in manifests if m.format == format_name]


def test_add_list_get_verify_remove(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    store = Store(tmp_path / "store", budget_bytes=10**9)
    added = [store.add_directory(directory) for directory, _ in artifact_dirs(source, manifests, "onnx")]
    assert sorted(m.key for m in store.list()) == sorted(m.key for m in added)
    first = added[0]
    assert store.get(*first.key) == first
    assert store.verify(*first.key) == first
    assert store.usage_bytes() == sum(m.size_bytes for m in added)
    assert store.add_directory(source / first.name / first.version) == first  # idempotent
    assert store.remove(*first.key)
    assert not store.remove(*first.key)
    with pytest.raises(errors.ArtifactNotFound, match=first.name):
        store.get(*first.key)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_refuses_a_damaged_file(tmp_path: Path, family_source, damage: str) -> None:
    source, manifests = family_source
    store = Store(tmp_path / "store", budget_bytes=10**9)
    directory, manifest = artifact_dirs(source, manifests, "safetensors")[0]
    store.add_directory(directory)
    path = store.path(*manifest.key) / manifest.files[0].path
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    with pytest.raises(errors.ArtifactCorrupt) as caught:
        store.verify(*manifest.key)
    assert caught.value.file == manifest.files[0].path


def test_add_refuses_a_corrupt_source_and_leaves_nothing(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    directory, manifest = artifact_dirs(source, manifests, "onnx")[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in [*manifest.files]:
        (broken / entry.path).write_bytes((directory / entry.path).read_bytes()[:-1] + b"\x00")
    manifest.write(broken)
    store = Store(tmp_path / "store", budget_bytes=10**9)
    with pytest.raises(errors.ArtifactCorrupt, match="sha256"):
        store.add_directory(broken)
    assert store.list() == []
    assert list((store.root / STAGING_DIRNAME).iterdir()) == []
    assert store.usage_bytes() == 0


def test_over_budget_evicts_lru_but_never_pinned(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    dirs = artifact_dirs(source, manifests, "torchscript") + artifact_dirs(source, manifests, "onnx")
    sizes = [m.size_bytes for _, m in dirs]
    store = Store(tmp_path / "store", budget_bytes=sum(sizes[:3]))
    for (directory, manifest), stamp in zip(dirs[:3], (100, 200, 300), strict=True):
        store.add_directory(directory)
        os.utime(store.path(*manifest.key), (stamp, stamp))
    oldest = dirs[0][1]
    # The oldest is pinned: the next oldest goes instead.
    store.add_directory(dirs[3][0], pinned={oldest.key})
    assert store.contains(*oldest.key)
    assert not store.contains(*dirs[1][1].key)
    assert store.usage_bytes() <= store.budget_bytes


def test_over_budget_with_everything_pinned_raises_with_numbers(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    dirs = artifact_dirs(source, manifests, "onnx")
    store = Store(tmp_path / "store", budget_bytes=dirs[0][1].size_bytes)
    store.add_directory(dirs[0][0])
    with pytest.raises(errors.StoreOverBudget) as caught:
        store.add_directory(dirs[1][0], pinned={dirs[0][1].name})
    assert caught.value.budget_bytes == dirs[0][1].size_bytes
    assert caught.value.needed_bytes == dirs[1][1].size_bytes
    assert caught.value.evictable_bytes == 0
    assert "pinned" in str(caught.value)
    assert store.contains(*dirs[0][1].key)


artifact = st.builds(
    StoredArtifact,
    key=st.tuples(st.sampled_from("abcdef"), st.sampled_from("123")),
    size_bytes=st.integers(0, 1000),
    last_used_s=st.floats(0, 1000),
)


@settings(deadline=None, max_examples=100)
@given(
    artifacts=st.lists(artifact, max_size=12, unique_by=lambda a: a.key),
    needed_bytes=st.integers(0, 3000),
    budget_bytes=st.integers(0, 6000),
    pinned=st.sets(st.tuples(st.sampled_from("abcdef"), st.sampled_from("123")) | st.sampled_from("abcdef"), max_size=4),
)
def test_plan_eviction_never_evicts_pinned_and_makes_room_or_refuses(artifacts, needed_bytes, budget_bytes, pinned) -> None:
    usage_bytes = sum(a.size_bytes for a in artifacts)
    try:
        evicted = plan_eviction(artifacts, needed_bytes, usage_bytes, budget_bytes, pinned)
    except errors.StoreOverBudget as refused:
        unpinned = sum(a.size_bytes for a in artifacts if not is_pinned(a.key, pinned))
        assert usage_bytes - unpinned + needed_bytes > budget_bytes
        assert refused.evictable_bytes == unpinned
        return
    assert not any(is_pinned(key, pinned) for key in evicted)
    freed = sum(a.size_bytes for a in artifacts if a.key in evicted)
    assert usage_bytes - freed + needed_bytes <= budget_bytes
    assert len(set(evicted)) == len(evicted)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(0, None, slice(0, None)), (5, 17, slice(5, 17)), (0, 0, slice(0, 0)), (3, None, slice(3, None))],
)
def test_open_range_reads_exactly_the_range(tmp_path: Path, family_source, start, end, expected) -> None:
    source, manifests = family_source
    directory, manifest = artifact_dirs(source, manifests, "onnx")[0]
    store = Store(tmp_path / "store", budget_bytes=10**9)
    store.add_directory(directory)
    file = manifest.files[0].path
    whole = (directory / file).read_bytes()
    file_range = store.open_range(*manifest.key, file, start, end)
    assert b"".join(file_range.chunks(chunk_bytes=7)) == whole[expected]
    assert file_range.size_bytes == len(whole)


def test_open_range_refuses_outside_ranges_and_unknown_files(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    directory, manifest = artifact_dirs(source, manifests, "onnx")[0]
    store = Store(tmp_path / "store", budget_bytes=10**9)
    store.add_directory(directory)
    file = manifest.files[0].path
    with pytest.raises(errors.RangeNotSatisfiable):
        store.open_range(*manifest.key, file, 10, 5)
    with pytest.raises(errors.RangeNotSatisfiable):
        store.open_range(*manifest.key, file, 0, manifest.size_bytes + 1)
    with pytest.raises(errors.ArtifactNotFound, match="other.bin"):
        store.open_range(*manifest.key, "other.bin")
    with pytest.raises(errors.ManifestInvalid):
        store.open_range("../x", "1", file)


def test_staging_of_another_manifest_is_wiped_not_resumed(tmp_path: Path, family_source) -> None:
    from dataclasses import replace

    source, manifests = family_source
    directory, manifest = artifact_dirs(source, manifests, "onnx")[0]
    store = Store(tmp_path / "store", budget_bytes=10**9)
    stale = replace(manifest, files=(replace(manifest.files[0], sha256="0" * 64),))
    with store.begin(stale) as staging:
        staging.file_path(manifest.files[0].path).write_bytes(b"stale partial bytes")
    assert store.usage_bytes() == len(b"stale partial bytes")
    assert store.add_directory(directory) == manifest
    assert store.verify(*manifest.key) == manifest
    assert store.usage_bytes() == manifest.size_bytes
